"""Step arithmetic shared by every callback: which counter a tick is, and the run's total in that unit.

- **Automatic optimization** (one optimizer): a tick step is ``trainer.global_step``, the number of
  optimizer steps taken (accumulation micro-batches share one step).
- **Manual optimization**: Lightning's ``global_step`` moves once per ``optimizer.step()`` call, so with
  two optimizers it moves by 2 per batch and ``every:5`` would hit only every 10th step. A tick step is
  then the number of training batches done (``trainer.fit_loop.epoch_loop._batches_that_stepped``, the
  counter Lightning gives its loggers): ``every:5`` is every 5th batch whatever the number of optimizers.

Example:
    >>> class Loop: _batches_that_stepped = 7
    >>> class FitLoop: epoch_loop = Loop()
    >>> class Module: automatic_optimization = False
    >>> class Trainer: lightning_module, fit_loop, global_step = Module(), FitLoop(), 14
    >>> tick_step(Trainer())
    7
"""

from __future__ import annotations

import math

__all__ = ["tick_step", "total_steps"]


def _manual(trainer) -> bool:
    module = getattr(trainer, "lightning_module", None)
    return module is not None and not module.automatic_optimization


def tick_step(trainer) -> int:
    """The step a tick decision and its records use (see the module docstring)."""
    if _manual(trainer):
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    return int(trainer.global_step)


def total_steps(trainer) -> int | None:
    """The run's total number of tick steps, or ``None`` when unknown (iterable data without ``max_steps``).

    ``trainer.estimated_stepping_batches`` counts optimizer steps; under manual optimization with ``k``
    optimizers ``max_steps`` bounds ``global_step``, which moves ``k`` per batch when every optimizer steps
    every batch, so the bound in batches is ``ceil(max_steps / k)``.
    """
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no sized dataloader: only schedules needing the total fail, later
        return None
    # Lightning answers inf, or max_steps (-1) for an unsized dataloader, when the total is unknown
    if total is None or math.isinf(total) or total <= 0:
        return None
    total = int(total)
    if _manual(trainer) and trainer.max_steps != -1 and len(trainer.optimizers) > 1:
        total = min(total, math.ceil(trainer.max_steps / len(trainer.optimizers)))
    return total
