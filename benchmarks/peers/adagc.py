"""AdaGC, an independent reference implementation for benchmarks.

Source: G. Wang, S. Li, C. Chen, J. Zeng, J. Yang, D. Yu, Y. Ma, L. Shen, "AdaGC: Enhancing LLM Pretraining
Stability via Adaptive Gradient Clipping", arXiv:2502.11034 (ICML 2026; v1 titled "AdaGC: Improving Training
Stability for Large Language Model Pretraining"); authors' code https://github.com/lishuai-97/AdaGC (class
``AdaGC`` in ``megatron/optimizer/clip_grads.py`` of ``megatron-gpt2.patch``, commit 32c249f). Written from
the paper's rule and that code's behaviour, not copied; single process (no tensor-parallel all-reduce).

Rule, per parameter tensor ``i`` with gradient ``g_i`` (steps counted from 1):

- Warm-up, ``t <= warmup_steps`` (the paper's and the code's ``T_start`` is 100; the default here is 25,
  the same as ZClip's warm-up, because the benchmarks are short fine-tunes of a few hundred steps; pass
  ``warmup_steps=100`` for the paper's setting): global-norm clipping with ``lambda_abs``
  (``g <- g * lambda_abs / (||g|| + eps)`` when that factor is < 1), then
  ``gamma_i = min(gamma_{i}, ||g_hat_i||)``, the running minimum of the *clipped* per-tensor norms, started
  at the first step's clipped norm.
- After warm-up: ``h_i = min(lambda_rel * gamma_i / ||g_i||, 1)`` (the code: if
  ``||g_i|| > lambda_rel * gamma_i`` multiply by ``lambda_rel * gamma_i / (||g_i|| + eps)``),
  ``g_i <- h_i g_i``, then ``gamma_i <- beta * gamma_i + (1 - beta) * ||g_hat_i||`` with the clipped norm
  (``= lambda_rel * gamma_i`` when clipped). A tensor first seen after warm-up starts at its own norm.
- Defaults as the paper gives them: ``lambda_rel=1.05``, ``beta=0.98``, ``lambda_abs=1.0``. (The released
  GPT-2 script runs ``clip_ratio=1.04``, ``clip_beta=0.99``, ``start_clip_steps=100``; ``eps=1e-6``.)

Behaviour worth knowing in a benchmark (inherited from the original, on purpose):

- After a spike the threshold can rise by at most a factor ``1 + (1 - beta)(lambda_rel - 1)`` per step
  (1.001 with the defaults): when the normal norm of a tensor drifts up (LR warm-up, a new phase of
  training), or ``gamma`` was started low by the warm-up running minimum, AdaGC keeps clipping that tensor
  for hundreds of steps. Counted in :attr:`clipped_steps` like any other clip.
- A NaN per-tensor norm is never clipped (``NaN > x`` is false) and turns that tensor's ``gamma`` into NaN,
  so the tensor is never clipped again; during warm-up a NaN norm is ignored by the running minimum unless
  it is the first one. A NaN global norm skips the warm-up global clip. An infinite norm is clipped by a
  factor ``0`` and ``inf * 0`` leaves NaN in the gradient handed to the optimizer. (Megatron's
  ``check_for_nan_in_grad`` would stop the run before this point; nothing here does.)
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple, Union

import lightning.pytorch as pl
import torch

NamedParams = Union[torch.nn.Module, Iterable[Tuple[str, torch.Tensor]]]


class AdaGC:
    """Per-tensor adaptive gradient clipping. Call :meth:`step` after ``backward()`` and before
    ``optimizer.step()``."""

    def __init__(
        self,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        lambda_abs: float = 1.0,
        warmup_steps: int = 25,
        eps: float = 1e-6,
    ) -> None:
        if lambda_rel < 0:
            raise ValueError(f"lambda_rel must be >= 0, got {lambda_rel}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.lambda_rel = lambda_rel
        self.beta = beta
        self.lambda_abs = lambda_abs
        self.warmup_steps = warmup_steps
        self.eps = eps

        self.gamma: dict[str, float] = {}  # per-tensor EMA (running minimum in warm-up) of clipped norms
        self.steps = 0  # calls to step()
        self.clipped_steps: list[int] = []  # step indices where any gradient was scaled (both phases)
        self.warmup_clipped_steps: list[int] = []  # the subset of clipped_steps made by the warm-up clip
        self.clipped_tensors = 0  # (step, tensor) pairs scaled, both phases
        self.last_clipped: list[str] = []  # names of the tensors clipped at the last step

    @property
    def in_warmup(self) -> bool:
        """True while the *next* call to :meth:`step` is a warm-up step."""
        return self.steps < self.warmup_steps

    @staticmethod
    def _items(named_parameters: NamedParams) -> list[tuple[str, torch.Tensor]]:
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        return [(n, p) for n, p in named_parameters if p.grad is not None]

    @torch.no_grad()
    def step(self, named_parameters: NamedParams, step_index: Optional[int] = None) -> float:
        """Clip in place; return the global gradient norm *before* clipping.

        ``named_parameters``: ``(name, parameter)`` pairs (``module.named_parameters()``) or a module; names
        key the per-tensor state. ``step_index`` is what :attr:`clipped_steps` records (default: the number
        of earlier calls)."""
        items = self._items(named_parameters)
        index = self.steps if step_index is None else step_index
        self.steps += 1
        self.last_clipped = []
        if not items:
            return 0.0
        norms = [torch.linalg.vector_norm(p.grad, 2) for _, p in items]
        total = torch.linalg.vector_norm(torch.stack([n.double() for n in norms]), 2).item()

        if self.steps <= self.warmup_steps:
            coef = self.lambda_abs / (total + self.eps)
            if coef < 1.0:  # false for NaN
                for _, p in items:
                    p.grad.mul_(coef)
                self.last_clipped = [n for n, _ in items]
                self.clipped_tensors += len(items)
                self.clipped_steps.append(index)
                self.warmup_clipped_steps.append(index)
            for name, p in items:
                clipped_norm = torch.linalg.vector_norm(p.grad, 2).item()
                if name not in self.gamma or clipped_norm < self.gamma[name]:
                    self.gamma[name] = clipped_norm
            return total

        for (name, p), norm_t in zip(items, norms):
            norm = norm_t.item()
            gamma = self.gamma.setdefault(name, norm)
            limit = self.lambda_rel * gamma
            if norm > limit:  # false for NaN
                p.grad.mul_(limit / (norm + self.eps))
                norm = limit
                self.last_clipped.append(name)
            self.gamma[name] = self.beta * gamma + (1.0 - self.beta) * norm
        if self.last_clipped:
            self.clipped_tensors += len(self.last_clipped)
            self.clipped_steps.append(index)
        return total

    def threshold(self, name: str) -> float:
        """The clip limit ``lambda_rel * gamma`` the next adaptive step will apply to tensor ``name``."""
        return self.lambda_rel * self.gamma.get(name, math.nan)


class AdaGCCallback(pl.Callback):
    """Runs :class:`AdaGC` in ``on_before_optimizer_step`` on ``pl_module.named_parameters()`` that have
    gradients. Step indices are ``trainer.global_step``."""

    def __init__(self, **adagc_kwargs) -> None:
        super().__init__()
        self.adagc = AdaGC(**adagc_kwargs)
        self.norms: list[float] = []  # pre-clip global norm of every optimizer step

    @property
    def clipped_steps(self) -> list[int]:
        return self.adagc.clipped_steps

    @property
    def clipped_tensors(self) -> int:
        return self.adagc.clipped_tensors

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        self.norms.append(self.adagc.step(named, step_index=trainer.global_step))
