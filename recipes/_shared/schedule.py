"""The learning-rate schedule of the recipes: linear warmup, then cosine decay to 0."""

from __future__ import annotations

import math
from typing import Any

import torch

from recipes._shared.errors import RecipeError


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (a ``LambdaLR``).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = warmup_cosine_schedule(opt, warmup_steps=2, total_steps=10)
        >>> [round(opt.param_groups[0]["lr"], 2) for _ in range(3) if not sched.step()]
        [0.5, 1.0, 0.96]
    """
    from transformers import get_cosine_schedule_with_warmup

    if warmup_steps < 0 or total_steps <= 0 or warmup_steps > total_steps:
        raise RecipeError(
            f"warmup_steps={warmup_steps} and total_steps={total_steps} are invalid: need 0 <= warmup_steps <= "
            "total_steps and total_steps > 0 (set --trainer.max_steps or --trainer.max_epochs)."
        )
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def with_warmup_cosine(trainer: Any, opt: torch.optim.Optimizer, warmup_ratio: float):
    """``opt`` with linear warmup then cosine decay over the run's optimizer steps (``opt`` alone when the run
    has no step bound), in the form ``configure_optimizers`` returns.

    Example:
        >>> from types import SimpleNamespace
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> with_warmup_cosine(SimpleNamespace(estimated_stepping_batches=float("inf")), opt, 0.1) is opt
        True
    """
    total = trainer.estimated_stepping_batches  # inf without max_steps / max_epochs
    if not math.isfinite(total) or total <= 0:
        return opt
    sched = warmup_cosine_schedule(opt, int(warmup_ratio * total), int(total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
