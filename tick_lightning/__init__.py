"""tick-lightning: see inside and steer Lightning + Hugging Face fine-tuning.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from tick_lightning import TickCallback, load_ticks
    >>> trainer = Trainer(max_steps=200, callbacks=[TickCallback(ticks="0,50,100,every:25")])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule)                                                        # doctest: +SKIP
    >>> load_ticks(trainer.log_dir + "/ticks").head()                                          # doctest: +SKIP

Public API (imported lazily, so ``import tick_lightning`` stays cheap):

- ``TickCallback``, ``load_ticks``, ``load_dense``, ``load_flight``, ``list_runs``, ``TickSchedule`` -- recording
- ``TickTrainerCallback`` (a ``transformers.Trainer`` callback), ``TickLoop`` (a plain loop) -- the same records
- ``patch_norms``, ``unpatch_norms``, ``patched_norms``, ``NormPatchReport`` -- normalization layers
- ``Renorm``, ``RenormCallback``                                     -- re-normalization of weights
- ``Guard``, ``load_guard``                                          -- clip or skip a spiking update on the device
- ``NormPatchPrecision``                                             -- norm patching as a precision plugin
- ``report``                                                         -- plots and anomaly summary

Without changing a script: ``TICK_LIGHTNING=1 python train.py`` (see ``tick_lightning.plugin``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "TickCallback": "tick_lightning.callback",
    "TickTrainerCallback": "tick_lightning.hf",
    "TickLoop": "tick_lightning.loop",
    "load_ticks": "tick_lightning.store",
    "list_runs": "tick_lightning.store",
    "load_dense": "tick_lightning.store",
    "load_flight": "tick_lightning.store",
    "load_guard": "tick_lightning.store",
    "Guard": "tick_lightning.guard",
    "TickSchedule": "tick_lightning.schedule",
    "patch_norms": "tick_lightning.norms",
    "unpatch_norms": "tick_lightning.norms",
    "patched_norms": "tick_lightning.norms",
    "NormPatchReport": "tick_lightning.norms",
    "NormPatchPrecision": "tick_lightning.precision",
    "Renorm": "tick_lightning.renorm",
    "RenormCallback": "tick_lightning.renorm",
    "report": "tick_lightning.reporting",
}

__all__ = [
    "Guard",
    "NormPatchPrecision",
    "NormPatchReport",
    "Renorm",
    "RenormCallback",
    "TickCallback",
    "TickLoop",
    "TickSchedule",
    "TickTrainerCallback",
    "list_runs",
    "load_dense",
    "load_flight",
    "load_guard",
    "load_ticks",
    "patch_norms",
    "patched_norms",
    "report",
    "unpatch_norms",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from tick_lightning.callback import TickCallback
    from tick_lightning.guard import Guard
    from tick_lightning.hf import TickTrainerCallback
    from tick_lightning.loop import TickLoop
    from tick_lightning.norms import NormPatchReport, patch_norms, patched_norms, unpatch_norms
    from tick_lightning.precision import NormPatchPrecision
    from tick_lightning.renorm import Renorm, RenormCallback
    from tick_lightning.reporting import report
    from tick_lightning.schedule import TickSchedule
    from tick_lightning.store import list_runs, load_dense, load_flight, load_guard, load_ticks


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tick_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
