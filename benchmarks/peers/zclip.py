"""ZClip, an independent reference implementation for benchmarks.

Source: A. Kumar, L. Owen, N. R. Chowdhury, F. Gura, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv:2504.02507 (2025); authors' code https://github.com/bluorion-com/ZClip (``zclip/zclip.py``, commit
584ce4f). Written from that code's behaviour, not copied; single process only (the original's FSDP
all-reduce is left out).

Rule (defaults: ``alpha=0.97``, ``z_thresh=2.5``, ``warmup_steps=25``, ``eps=1e-6``, ``mode="zscore"``,
``clip_option="adaptive_scaling"``, ``clip_factor=1.0``, ``max_grad_norm=None``):

- ``g`` is the global L2 norm of all gradients; as in the original each tensor's norm is taken in the dtype
  of the first parameter, and the result is read on the host (``.item()``).
- Warm-up: the first ``warmup_steps`` norms are collected, no adaptive clipping. At the last of them the mean
  ``mu`` and the *population* variance ``var`` of the collected norms initialise the statistics. If
  ``max_grad_norm`` is set, warm-up steps are clipped to it (``torch.nn.utils.clip_grad_norm_``).
- After warm-up: ``z = (g - mu) / (sqrt(var) + eps)``. If ``z > z_thresh`` the step is a spike and, with
  ``adaptive_scaling``, ``threshold = clip_factor * (mu + z_thresh * std / (z / z_thresh))``
  (``clip_option="mean"``: ``threshold = mu``; ``mode="percentile"``: ``threshold = mu + z_thresh * std``
  whenever ``g`` exceeds it). The limit is ``threshold`` (or ``g`` when no spike), lowered to
  ``max_grad_norm`` when that is set; when ``g`` exceeds the limit every gradient is multiplied by
  ``limit / (g + 1e-6)``.
- EMA update with the *threshold* on a spike and with ``g`` otherwise (not with the ``max_grad_norm``-lowered
  limit, as in the original): ``mu <- alpha mu + (1 - alpha) x`` and then, with the *new* ``mu``,
  ``var <- alpha var + (1 - alpha) (x - mu)^2``. ``skip_update_on_spike=True`` leaves the EMA alone on a
  spike.

Behaviour worth knowing in a benchmark (inherited from the original, on purpose): a NaN norm is never a
spike (``NaN > z_thresh`` is false), is not clipped, and is fed into the EMA, so ``mu``/``var`` become NaN and
ZClip never clips again; a NaN during warm-up does the same through the initial mean. An infinite norm is a
spike with ``threshold = mu``, the coefficient is ``mu / inf = 0`` and ``inf * 0`` leaves NaN in the
gradients handed to the optimizer.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import lightning.pytorch as pl
import torch

ParamsLike = Union[torch.nn.Module, Iterable[torch.nn.Parameter], Iterable[torch.Tensor]]


def _with_grads(parameters: ParamsLike) -> list[torch.Tensor]:
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    elif isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


class ZClip:
    """Adaptive (z-score) clipping of the global gradient norm. Call :meth:`step` after ``backward()`` and
    before ``optimizer.step()``."""

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: Optional[float] = None,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        mode = mode.lower()
        if mode not in ("zscore", "percentile"):
            raise ValueError("mode must be 'zscore' or 'percentile'")
        clip_option = clip_option.lower()
        if mode == "zscore" and clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError("with mode='zscore', clip_option must be 'adaptive_scaling' or 'mean'")
        if warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.clip_option = clip_option if mode == "zscore" else None
        self.clip_factor = clip_factor
        self.skip_update_on_spike = skip_update_on_spike

        self.mean: Optional[float] = None  # EMA of the norm; None until the warm-up is over
        self.var: Optional[float] = None
        self._warmup_norms: list[float] = []
        self.steps = 0  # calls to step()
        self.clipped_steps: list[int] = []  # step indices where the gradients were scaled down
        self.spike_steps: list[int] = []  # step indices where the z-score test fired (before max_grad_norm)
        self.last_threshold: Optional[float] = None  # adaptive threshold of the last spike step

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    # -- statistics -------------------------------------------------------------------------------------
    def _init_stats(self) -> None:
        n = len(self._warmup_norms)
        mean = sum(self._warmup_norms) / n
        self.var = sum((x - mean) ** 2 for x in self._warmup_norms) / n  # population variance
        self.mean = mean
        self._warmup_norms = []

    def _update_stats(self, x: float) -> None:
        assert self.mean is not None and self.var is not None
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * x
        # the original uses the freshly updated mean here
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (x - self.mean) ** 2

    def _threshold(self, g: float) -> Optional[float]:
        """The adaptive clip value for norm ``g``, or None when ``g`` is not an outlier."""
        assert self.mean is not None and self.var is not None
        std = math.sqrt(self.var)
        if self.mode == "percentile":
            limit = self.mean + self.z_thresh * std
            return limit if g > limit else None
        z = (g - self.mean) / (std + self.eps)
        if not z > self.z_thresh:  # also false for NaN
            return None
        if self.clip_option == "mean":
            return self.mean
        eta = z / self.z_thresh  # > 1: the further out, the tighter the threshold
        return (self.mean + self.z_thresh * std / eta) * self.clip_factor

    # -- gradients --------------------------------------------------------------------------------------
    @staticmethod
    def total_norm(params: list[torch.Tensor]) -> float:
        """Global L2 norm of the gradients, per-tensor norms taken in the first parameter's dtype."""
        if not params:
            return 0.0
        dtype = params[0].dtype
        device = params[0].device
        norms = torch.stack([p.grad.to(dtype).norm(2) for p in params]).to(device)
        return torch.sqrt(torch.sum(norms.pow(2))).item()

    @staticmethod
    def _scale_to(params: list[torch.Tensor], g: float, limit: float) -> bool:
        if not g > limit:
            return False
        coef = limit / (g + 1e-6)
        for p in params:
            p.grad.mul_(coef)
        return True

    @torch.no_grad()
    def step(self, parameters: ParamsLike, step_index: Optional[int] = None) -> float:
        """Clip the gradients of ``parameters`` in place; return the global norm *before* clipping.

        ``step_index`` is what :attr:`clipped_steps` records (default: the number of earlier calls)."""
        params = _with_grads(parameters)
        index = self.steps if step_index is None else step_index
        self.steps += 1
        g = self.total_norm(params)

        if not self.initialized:
            self._warmup_norms.append(g)
            if len(self._warmup_norms) >= self.warmup_steps:
                self._init_stats()
            if self.max_grad_norm is not None and params:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                if g > self.max_grad_norm:
                    self.clipped_steps.append(index)
            return g

        threshold = self._threshold(g)
        limit = g if threshold is None else threshold
        if threshold is not None:
            self.spike_steps.append(index)
            self.last_threshold = threshold
        if self.max_grad_norm is not None:
            limit = min(limit, self.max_grad_norm)
        if self._scale_to(params, g, limit):
            self.clipped_steps.append(index)
        if threshold is not None and self.skip_update_on_spike:
            return g
        self._update_stats(g if threshold is None else threshold)
        return g


class ZClipCallback(pl.Callback):
    """Runs :class:`ZClip` in ``on_before_optimizer_step`` (after backward, after AMP unscaling, before
    Lightning's own ``gradient_clip_val`` clipping and the optimizer step). Step indices are
    ``trainer.global_step``."""

    def __init__(self, **zclip_kwargs) -> None:
        super().__init__()
        self.zclip = ZClip(**zclip_kwargs)
        self.norms: list[float] = []  # pre-clip global norm of every optimizer step

    @property
    def clipped_steps(self) -> list[int]:
        return self.zclip.clipped_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(self.zclip.step(params, step_index=trainer.global_step))
