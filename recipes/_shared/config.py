"""The ``tick`` config group of the recipes' command line and the ``TickCallback`` it builds.

The fields are ``TickCallback``'s / ``Renorm``'s arguments with the recipes' defaults (tests/test_cli.py and
tests/test_recipes_optim.py check that they stay the same set as the library's signatures).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from recipes._shared.errors import RecipeError


@dataclass
class RenormConfig:
    """One ``tick_lightning.renorm.Renorm`` entry of ``--tick.renorm`` (same fields, same defaults)."""

    target: Union[str, list[str]]
    method: str = "layernorm"
    at: Union[str, int, list[int]] = "ticks"
    dim: int = -1
    keep_norm: bool = False
    eps: float = 1e-5
    fold: Optional[str] = None


@dataclass
class TickConfig:
    """The ``tick`` config group: the arguments of ``TickCallback`` a recipe exposes.

    ``enabled=False`` runs without a TickCallback (plain fine-tuning). ``dirpath`` is always ``<run_dir>/ticks``.
    The other fields are ``TickCallback``'s arguments, with the recipes' defaults (tests/test_recipes_optim.py
    checks that they stay the same set as its signature).
    """

    enabled: bool = True
    ticks: Union[str, list[int], None] = "log:20"
    states: Optional[list[str]] = None
    state_ticks: Optional[dict[str, str]] = None
    select: Union[str, list[str], None] = None
    norm_select: Union[str, list[str], None] = "norm"
    patch_norms: bool = True
    renorm: Optional[list[RenormConfig]] = None
    ranks: str = "zero"
    log_to_loggers: bool = True
    log_select: Union[str, list[str], None] = None
    activations: Union[str, list[str], None] = None
    update_on_host: bool = False
    reset_peak_memory: bool = False
    dense: Union[bool, list[str]] = True
    dense_flush_every: int = 256
    flight: Union[bool, list[str]] = True
    flight_window: int = 128


def make_tick_callback(cfg: TickConfig, dirpath: Path):
    """Build the ``TickCallback`` described by a :class:`TickConfig` (``None`` when disabled)."""
    if not cfg.enabled:
        return None
    from tick_lightning.callback import TickCallback
    from tick_lightning.renorm import Renorm

    renorm = None
    try:
        if cfg.renorm:
            renorm = [Renorm(**asdict(r)) if isinstance(r, RenormConfig) else Renorm(**r) for r in cfg.renorm]
        kwargs = {k: v for k, v in asdict(cfg).items() if k not in ("enabled", "renorm")}
        return TickCallback(**kwargs, renorm=renorm, dirpath=str(dirpath))
    except (ValueError, TypeError) as err:  # TickCallback / Renorm name the bad argument and the valid choices
        raise RecipeError(f"bad --tick option: {err}") from err
