"""One collector per tick state, one contract (``base.Collector``); the callback routes hooks to them."""

from tick_lightning.collect.base import Collector, Tick
from tick_lightning.collect.inputs import ActivationCollector, NormInputCollector
from tick_lightning.collect.params import (
    GradCollector,
    HistogramCollector,
    ParamSet,
    SnapshotCollector,
    UpdateCollector,
    WeightCollector,
)
from tick_lightning.collect.scalars import (
    AmpCollector,
    LossCollector,
    LrCollector,
    MemoryCollector,
    NonfiniteWatch,
    RenormCollector,
    TimeCollector,
)
from tick_lightning.collect.steps import tick_step, total_steps

__all__ = ["ActivationCollector", "AmpCollector", "Collector", "GradCollector", "HistogramCollector", "LossCollector", "LrCollector", "MemoryCollector",
           "NonfiniteWatch", "NormInputCollector", "ParamSet", "RenormCollector", "SnapshotCollector", "Tick",
           "TimeCollector", "UpdateCollector", "WeightCollector", "tick_step", "total_steps"]
