"""Re-normalization of chosen weights after optimizer steps (nGPT-style) or at ticks.

``Renorm`` says what/how/when; ``RenormEngine`` resolves and applies (used by ``TickCallback(renorm=...)``);
``RenormCallback`` is the standalone callback; ``renorm_`` / ``RenormPlan`` are the tensor-level math;
``FoldPlan`` is the function-preserving LayerNorm -> Linear mode. See docs/renorm.md.

The math (``ops``) imports only torch; the callback (Lightning) is imported on first use, so worker
processes that only re-normalize tensors start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tick_lightning.renorm.ops import STATS, RenormPlan, renorm_
from tick_lightning.renorm.spec import METHODS, Renorm, RenormError

_LAZY = {"RenormEngine": "tick_lightning.renorm.engine", "RenormCallback": "tick_lightning.renorm.callback",
         "FoldPlan": "tick_lightning.renorm.fold"}

__all__ = [
    "METHODS",
    "STATS",
    "FoldPlan",
    "Renorm",
    "RenormCallback",
    "RenormEngine",
    "RenormError",
    "RenormPlan",
    "renorm_",
]

if TYPE_CHECKING:  # pragma: no cover
    from tick_lightning.renorm.callback import RenormCallback
    from tick_lightning.renorm.engine import RenormEngine
    from tick_lightning.renorm.fold import FoldPlan


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tick_lightning.renorm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
