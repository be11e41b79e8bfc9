"""The ``tick`` config group of the recipes' command line and the ``TickCallback`` it builds.

The group *is* the library's ``tick_lightning.config.TickConfig`` (the callback's arguments, checked in one place)
with the recipes' defaults, an ``enabled`` switch, and no ``dirpath``: a recipe always records into
``<run_dir>/ticks``. ``--tick.renorm`` entries are ``tick_lightning.Renorm`` fields (``{target: ..., method: ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tick_lightning import config as library
from tick_lightning.callback import TickCallback
from tick_lightning.config import Ticks

__all__ = ["TickConfig", "make_tick_callback"]


@dataclass
class TickConfig(library.TickConfig):
    """The ``tick`` config group. ``enabled=False`` runs without a TickCallback (plain fine-tuning).

    Example:
        >>> TickConfig().ticks, TickConfig().patch_norms
        ('log:20', True)
    """

    ticks: Ticks = "log:20"
    patch_norms: bool = True
    dirpath: None = field(default=None, init=False, repr=False)  # always <run_dir>/ticks (make_tick_callback)
    enabled: bool = True


def make_tick_callback(cfg: TickConfig, dirpath: Path) -> Optional[TickCallback]:
    """The ``TickCallback`` a checked :class:`TickConfig` describes, recording into ``dirpath`` (``None`` when
    disabled)."""
    if not cfg.enabled:
        return None
    kwargs = {k: v for k, v in cfg.arguments().items() if k != "enabled"}
    return TickCallback(**kwargs, dirpath=str(dirpath))
