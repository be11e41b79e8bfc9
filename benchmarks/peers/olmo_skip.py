"""OLMo-core's skip-step optimizer (``SkipStepAdamW``), driven from Lightning, for benchmarks.

Source: AI2 OLMo-core, https://github.com/allenai/OLMo-core, package ``ai2-olmo-core`` 3.0.0:
``olmo_core/optim/skip_step_optimizer.py`` (``SkipStepOptimizer``), ``olmo_core/optim/adamw.py``
(``SkipStepAdamW``, ``adamw_step``, ``foreach_adamw_step``) and the way
``olmo_core/train/train_module/transformer/train_module.py`` feeds it. The optimizer is OLMo-core's own,
imported, not re-implemented; this file only supplies what OLMo's train module would: the batch loss and the
pre-clip global grad norm before each ``step()``.

Rule (OLMo-core's, defaults ``rolling_interval_length=128``, ``sigma_factor=6``): the optimizer keeps the
last ``rolling_interval_length + 1`` losses and grad norms. Once it holds at least
``max(2, rolling_interval_length // 2)`` losses, a step is skipped when
``loss - mean(previous losses) > sigma_factor * std(previous losses)`` or the same for the grad norm
(``torch.std_mean``: Bessel-corrected std). The skip is branch-free: the AdamW update, the weight decay and
the moment updates are multiplied by ``step_factor`` (1.0 or 0.0), and the step counter is advanced by
``step_factor``. The skipped step's loss and grad norm stay in the history.

Behaviour worth knowing in a benchmark (measured in ``test_peers.py``):

- A NaN loss or grad norm compares false, so the step is skipped; and the NaN stays in the rolling
  history, so ``mean``/``std`` are NaN and *every* following step is skipped until it leaves the window
  (``rolling_interval_length`` steps).
- A skipped step with a NaN (or inf) *gradient* is not harmless: ``0 * NaN = NaN``, so the masked update still
  writes NaN into ``exp_avg``, ``exp_avg_sq`` and the parameters (both the foreach and the per-tensor path).
  The foreach path (``SkipStepAdamWConfig``'s default) squares the gradient before masking it, so a finite
  gradient whose square overflows (fp32 above ~1.8e19; fp16 parameters above ~256) poisons ``exp_avg_sq``
  and the parameters in the same way; the per-tensor path masks first and stays clean.
- With fewer than ``rolling_interval_length // 2`` steps of history (64 by default) nothing is skipped.

Install: ``pip install --no-deps ai2-olmo-core==3.0.0 dataclass-extensions bettermap``. A plain
``pip install ai2-olmo-core`` pulls ``cached-path``, which pins ``huggingface-hub<2``, ``filelock<4``,
``rich<14`` and (through ``botocore``) ``python-dateutil<3``, and would downgrade the versions transformers
5 runs on. ``olmo_core`` imports ``cached_path`` at module level although the optimizer never uses it; when
``cached_path`` is not installed this file registers a small stand-in module (see
:func:`_ensure_cached_path`) whose functions raise if called.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Iterable, Optional, Tuple

import lightning.pytorch as pl
import torch

_FIX = (
    "OLMo-core is needed for benchmarks.peers.olmo_skip: "
    "pip install --no-deps ai2-olmo-core==3.0.0 dataclass-extensions bettermap "
    "(a plain `pip install ai2-olmo-core` would downgrade huggingface-hub, filelock, rich and "
    "python-dateutil)"
)


def _ensure_cached_path() -> None:
    """``olmo_core`` imports ``cached_path`` (remote-file caching: S3, GCS, HF) at module level; its
    optimizers never call it. If the real package is absent, register a stand-in with the names olmo_core
    imports; calling any of them raises."""
    try:
        import cached_path  # noqa: F401
        return
    except ImportError:
        pass

    def _unavailable(*args, **kwargs):
        raise RuntimeError("cached_path is a stand-in registered by benchmarks.peers.olmo_skip; "
                           "install the real `cached-path` package to read remote files with olmo_core")

    class SchemeClient:
        recoverable_errors: tuple = ()
        scheme: tuple = ()

        def __init__(self, resource: str) -> None:
            self.resource = resource

    class S3Client(SchemeClient):
        scheme = ("s3",)

    root = types.ModuleType("cached_path")
    root.__doc__ = "stand-in registered by benchmarks.peers.olmo_skip (the real package is not installed)"
    root.__tick_peers_stand_in__ = True
    root.cached_path = _unavailable
    root.get_bytes_range = _unavailable
    schemes = types.ModuleType("cached_path.schemes")
    schemes.SchemeClient = SchemeClient
    schemes.S3Client = S3Client
    schemes.add_scheme_client = lambda client: None
    root.schemes = schemes
    sys.modules["cached_path"] = root
    sys.modules["cached_path.schemes"] = schemes


# Importing olmo_core otherwise points TRITON_CACHE_DIR at a fresh per-process directory under
# /tmp/olmo-triton-cache (against multi-rank races), so every benchmark process would recompile its Triton
# kernels (torch.compile included) and time the compilation. Set the variable to "" to get OLMo's behaviour.
os.environ.setdefault("OLMO_DISABLE_PER_RANK_TRITON_CACHE", "1")

try:
    _ensure_cached_path()
    from olmo_core.optim import SkipStepAdamW, SkipStepOptimizer
except ImportError as exc:  # pragma: no cover - depends on the environment
    if getattr(sys.modules.get("cached_path"), "__tick_peers_stand_in__", False):
        sys.modules.pop("cached_path.schemes", None)
        sys.modules.pop("cached_path", None)
    raise ImportError(f"{_FIX} ({type(exc).__name__}: {exc})") from exc


def make_skip_step_adamw(
    params,
    lr: float = 1e-3,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    rolling_interval_length: int = 128,
    sigma_factor: int = 6,
    foreach: bool = True,
) -> SkipStepAdamW:
    """OLMo-core's ``SkipStepAdamW`` as its ``SkipStepAdamWConfig`` builds it (``foreach=True``,
    ``step_increment_bugfix=True``, moments in the parameters' dtype)."""
    return SkipStepAdamW(
        params,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        rolling_interval_length=rolling_interval_length,
        sigma_factor=sigma_factor,
        foreach=foreach,
        step_increment_bugfix=True,
    )


def _unwrap(optimizer):
    # Lightning hands hooks the torch optimizer; unwrap a LightningOptimizer if one comes anyway
    return getattr(optimizer, "_optimizer", optimizer)


def _global_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    grads = list(grads)
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2) for g in grads]), 2)


class OlmoSkipStepCallback(pl.Callback):
    """Feeds an OLMo ``SkipStepOptimizer`` the loss and grad norm OLMo's train module would, and records the
    skipped steps.

    - ``on_before_backward``: the detached loss of each micro-batch, summed over the accumulation window
      (Lightning has already divided it by ``accumulate_grad_batches``, so the sum is the batch mean, as
      OLMo's ``ce_batch_loss``).
    - ``on_before_optimizer_step``: ``latest_loss`` and ``latest_grad_norm`` (global L2 norm of the
      gradients, on the device, before Lightning's ``gradient_clip_val`` clipping, as OLMo records the
      pre-clip norm). Lightning runs the forward/backward closure inside ``optimizer.step(closure)``,
      and ``SkipStepAdamW`` calls the closure before it decides, so both are set in time.
    - ``on_train_batch_end``: reads ``step_skipped`` on the host after a step and records the step's index
      (``trainer.global_step`` when it began) in :attr:`skipped_steps`. (Under 16-bit AMP, a step the
      GradScaler drops never reaches the optimizer; ``step_skipped`` then still holds the previous step's.)

    Other optimizers are left alone. Automatic optimization only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._loss_sum: Optional[torch.Tensor] = None
        self._pending: Optional[Tuple[int, SkipStepOptimizer]] = None
        self.skipped_steps: list[int] = []
        self.steps_seen = 0

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss, self._loss_sum = self._loss_sum, None
        optim = _unwrap(optimizer)
        if not isinstance(optim, SkipStepOptimizer):
            return
        if loss is not None:
            optim.latest_loss = loss
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        optim.latest_grad_norm = _global_norm(grads)
        self._pending = (trainer.global_step, optim)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is None:
            return
        index, optim = self._pending
        self._pending = None
        self.steps_seen += 1
        if float(optim.step_skipped.item()) > 0.0:  # host read: fine for a reference
            self.skipped_steps.append(index)
