"""``Renorm``: what to re-normalize, how, and when. Validated when constructed.

Only what can be checked without a model is checked here (method, ``at``, ``dim``, ``eps``, flags);
what needs the model (targets that match nothing, 1-D or frozen parameters, ``dim`` out of range) is
checked by ``RenormEngine.setup`` -- still before the first training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tick_lightning.schedule import ScheduleError, TickSchedule

__all__ = ["METHODS", "Renorm", "RenormError"]

#: ``layernorm``: rows to zero mean, unit variance; ``unit``: rows to unit L2 norm (nGPT ``justnorm``);
#: ``center``: subtract the row mean.
METHODS = ("layernorm", "unit", "center")


class RenormError(ValueError):
    """A re-normalization request that cannot be honoured; raised before training starts."""


@dataclass(frozen=True, eq=True)
class Renorm:
    """Re-normalize chosen weights right after an optimizer step, as a projection.

    Args:
        target: glob pattern(s) over parameter names (``"*.attention.*.weight"``) or kinds
            (``"linear"``, ``"embedding"``, ...), with ``"!pattern"`` to exclude (see ``tick_lightning.select``).
        method: ``"layernorm"`` (each row along ``dim`` to zero mean and unit variance, the LayerNorm formula
            without gain), ``"unit"`` (each row to unit L2 norm, as nGPT's ``justnorm``) or ``"center"``
            (subtract the row mean).
        at: ``"ticks"`` (the tick schedule of the callback that runs it), ``"step"`` (after every optimizer
            step) or a schedule of its own such as ``"every:50"`` / ``"log:10"`` / ``"100,200"``.
        dim: the dimension a "row" runs along: ``-1`` normalizes each row of a ``[out, in]`` Linear weight
            (each output unit's weight vector), ``0`` each column.
        keep_norm: rescale each row back to the L2 norm it had before, so only its direction and centring change.
        eps: added to the variance (``layernorm``) or lower bound of the norm (``unit``, ``keep_norm``).
        fold: function-preserving mode. A glob over *module* names of the LayerNorms that feed the targeted
            Linear layers; each targeted Linear's input columns are scaled to unit norm (jointly for all
            Linears fed by the same LayerNorm) and the removed scale is multiplied into that LayerNorm's
            gain and bias, so the network computes the same function. Needs ``method="unit"``, ``dim=0``.

    Example:
        >>> from tick_lightning import Renorm
        >>> Renorm("*.attention.self.*.weight", method="unit", at="step")
        Renorm(target='*.attention.self.*.weight', method='unit', at='step', dim=-1, keep_norm=False, eps=1e-05, fold=None)
        >>> Renorm("linear", method="bogus")
        Traceback (most recent call last):
        ...
        tick_lightning.renorm.spec.RenormError: Renorm method 'bogus' is unknown; valid methods: layernorm, unit, center.
    """

    target: str | Sequence[str]
    method: str = "layernorm"
    at: str | int | Sequence[int] = "ticks"
    dim: int = -1
    keep_norm: bool = False
    eps: float = 1e-5
    fold: str | None = None
    schedule: TickSchedule | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        target = self.target
        if isinstance(target, str):
            if not target.strip():
                raise RenormError("Renorm target '' is empty; pass glob patterns over parameter names or kinds such as 'linear'.")
        elif isinstance(target, Sequence) and target and all(isinstance(t, str) and t.strip() for t in target):
            object.__setattr__(self, "target", tuple(target))
        else:
            raise RenormError(
                f"Renorm target {target!r} must be a non-empty string or list of strings: glob patterns over "
                "parameter names ('*.attention.*.weight') or kinds ('linear', 'embedding', 'norm')."
            )
        if self.method not in METHODS:
            raise RenormError(f"Renorm method {self.method!r} is unknown; valid methods: {', '.join(METHODS)}.")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise RenormError(f"Renorm dim {self.dim!r} must be an int (-1: rows of a [out, in] weight, 0: columns).")
        if not isinstance(self.keep_norm, bool):
            raise RenormError(f"Renorm keep_norm {self.keep_norm!r} must be True or False.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (self.eps > 0) or math.isinf(self.eps):
            raise RenormError(f"Renorm eps {self.eps!r} must be a finite number > 0 (for example 1e-5).")
        if self.method == "unit" and self.keep_norm:
            raise RenormError(
                "Renorm(method='unit', keep_norm=True) would rescale each row back to where it was (a no-op); use "
                "method='unit' alone, or method='center'/'layernorm' with keep_norm=True."
            )
        if self.fold is not None:
            if not isinstance(self.fold, str) or not self.fold.strip():
                raise RenormError(f"Renorm fold {self.fold!r} must be a glob over LayerNorm module names, e.g. '*.ln_1'.")
            if self.method != "unit" or self.dim != 0 or self.keep_norm:
                raise RenormError(
                    f"Renorm fold={self.fold!r} is function-preserving only for a pure column scale: use method='unit', "
                    f"dim=0, keep_norm=False (got method={self.method!r}, dim={self.dim}, keep_norm={self.keep_norm})."
                )
        if isinstance(self.at, list):
            object.__setattr__(self, "at", tuple(self.at))  # hashable, like the rest of the spec
        object.__setattr__(self, "schedule", self._parse_at(self.at))

    @staticmethod
    def _parse_at(at) -> TickSchedule | None:
        """``None`` for ``"ticks"``/``"step"``; else the spec's own schedule."""
        if at in ("ticks", "step"):
            return None
        try:
            schedule = TickSchedule.parse(at)
        except ScheduleError as err:
            raise RenormError(
                f"Renorm at={at!r} does not parse: {err} Use 'ticks' (the callback's schedule), 'step' (every "
                "optimizer step) or a schedule such as 'every:50', 'log:10', '0,100,200'."
            ) from None
        if schedule.epoch_every or schedule.nonfinite:
            raise RenormError(
                f"Renorm at={at!r} has 'epoch'/'nonfinite' terms; re-normalization runs right after an optimizer step, "
                "so its schedule must name steps: 'every:N', 'log:N', 'frac:F' or explicit steps."
            )
        if schedule.is_empty:
            raise RenormError(f"Renorm at={at!r} never applies; remove the Renorm instead of scheduling it 'none'.")
        return schedule

    def describe(self) -> dict:
        """Plain-data description (for the manifest and for checking a resume uses the same specs)."""
        target = list(self.target) if isinstance(self.target, tuple) else self.target
        return {"target": target, "method": self.method, "at": self.at if isinstance(self.at, (str, int)) else list(self.at),
                "dim": self.dim, "keep_norm": self.keep_norm, "eps": self.eps, "fold": self.fold}
