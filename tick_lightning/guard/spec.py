"""``Guard``: what the gradient guard does to a spiking step, and its thresholds. Checked when constructed.

Only what can be checked without a model and a trainer is checked here (the mode, each threshold's range,
arguments that belong to another mode); what needs them (a ``select`` that matches nothing, a warm-up longer
than the run, an optimizer that cannot skip on the device) is checked at fit start, before the first step,
by ``GuardEngine``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

__all__ = ["GUARD_SERIES", "GUARD_STATS", "MAX_WINDOW", "MODES", "Guard", "GuardError"]

#: ``clip``: each gradient tensor against its own running statistics (AdaGC's per-tensor idea, ZClip's rule);
#: ``zclip``: the global norm against its EMA mean and variance (ZClip); ``skip``: the whole update when the loss
#: or global norm is an outlier (OLMo-core's rule).
MODES = ("clip", "zclip", "skip")
#: what ``skip`` can judge
GUARD_SERIES = ("loss", "grad_norm")
#: the step row of a decision (name ``""``): whether the update was skipped, whether the step was non-finite,
#: the global gradient multiplier, how many tensors were scaled, the judged loss and global norm (pre-guard),
#: their z-scores against the running statistics (NaN in warm-up or not judged), the norm the global gradient
#: was clipped to (``zclip``)
GUARD_STATS = ("skipped", "nonfinite", "factor", "clipped", "loss", "grad_norm", "z_loss", "z_grad_norm",
               "threshold")
#: the longest rolling window ``skip`` keeps on the device (two fp64 values a step: 1 MiB)
MAX_WINDOW = 65536

# per mode: its own arguments and their defaults; the arguments every mode takes are `warmup` and `nonfinite`
_DEFAULTS = {
    "clip": {"z": 4.0, "alpha": 0.97, "select": None, "warmup": 25},
    "zclip": {"z": 3.0, "alpha": 0.97, "warmup": 25},
    "skip": {"z": 5.0, "window": 128, "on": GUARD_SERIES, "warmup": None},  # warmup: window // 2 (OLMo-core)
}
_COMMON = ("warmup", "nonfinite")


class GuardError(ValueError):
    """A ``Guard`` that cannot be honoured: one line naming the value and the valid choices, before training."""


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = True,
            high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
        raise GuardError(f"Guard {name}={value!r} is not valid; pass a number in {lo}{low:g}, {high:g}{hi}.")
    return float(value)


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise GuardError(f"Guard {name}={value!r} is not valid; pass an integer {bound}.")
    return value


@dataclass(frozen=True)
class Guard:
    """Every optimizer step, between the gradients being ready (unscaled, accumulation complete) and the
    optimizer step, judge the step on the device and clip its gradients or skip its update. No host sync; the
    same decision on every rank; the running statistics go through checkpoints.

    Args:
        mode: ``"skip"`` leaves the parameters *and* the optimizer state exactly as they were when the loss or
            the log of the global gradient norm is more than ``z`` standard deviations above its mean over the last
            ``window`` steps (OLMo-core's rule; the norm in log space) or non-finite; ``"zclip"`` scales all gradients down when the
            z-score of the global norm's log against its EMA mean and variance exceeds ``z`` (ZClip's adaptive
            rule, in log space: to ``exp(mean + z**2 * std / z_now)``); ``"clip"`` does the same for each gradient
            tensor against its own statistics (AdaGC's per-tensor idea with ZClip's rule; ``select`` limits it).
        z: outlier threshold in standard deviations (``skip`` 5, ``zclip`` 3, ``clip`` 4: with a hundred tensors
            judged every step, a per-tensor threshold must be higher to stay quiet on a healthy run).
        alpha: ``zclip`` / ``clip``: EMA factor of the log norm's mean and variance (0.97).
        select: ``clip``: the tensors it may scale (globs or kinds as in ``TickCallback(select=...)``; default every
            trainable tensor). A non-finite step is skipped whatever ``select`` says.
        window: ``skip``: steps in the rolling mean and standard deviation (128).
        on: ``skip``: the series it judges, ``"loss"`` and/or ``"grad_norm"`` (both).
        warmup: finite steps observed before the first intervention (``clip`` / ``zclip`` 25, ``skip``
            ``window // 2``); a non-finite step is skipped from the first step on.
        nonfinite: skip a step whose loss or gradient is NaN or inf (every mode; default True).

    Example:
        >>> from tick_lightning import Guard
        >>> Guard("zclip")
        Guard(mode='zclip', z=3.0, alpha=0.97, warmup=25, nonfinite=True)
        >>> Guard("skip", z=5, window=64).warmup
        32
        >>> Guard("zclip", window=64)
        Traceback (most recent call last):
        ...
        tick_lightning.guard.spec.GuardError: Guard('zclip') takes no window (an argument of mode 'skip'); zclip takes z, alpha, warmup, nonfinite.
    """

    mode: str = "skip"
    z: float | None = None
    alpha: float | None = None
    select: str | Sequence[str] | None = None
    window: int | None = None
    on: str | Sequence[str] | None = None
    warmup: int | None = None
    nonfinite: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GuardError(f"Guard mode {self.mode!r} is unknown; valid modes: {', '.join(MODES)}.")
        own = _DEFAULTS[self.mode]
        for f in fields(self):
            if f.name in ("mode", *_COMMON) or f.name in own or getattr(self, f.name) is None:
                continue
            owner = next(m for m, d in _DEFAULTS.items() if f.name in d)
            raise GuardError(f"Guard({self.mode!r}) takes no {f.name} (an argument of mode {owner!r}); "
                             f"{self.mode} takes {', '.join([*(k for k in own if k != 'warmup'), *_COMMON])}.")
        values = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in own.items()}
        if "z" in values:
            values["z"] = _number("z", values["z"], 0.0)
        if "alpha" in values:
            values["alpha"] = _number("alpha", values["alpha"], 0.0, 1.0, high_open=True)
        if "window" in values:
            values["window"] = _integer("window", values["window"], 3, MAX_WINDOW)
        if "on" in values:
            on = values["on"]
            on = (on,) if isinstance(on, str) else on
            if not (isinstance(on, Sequence) and on and all(isinstance(s, str) for s in on)) or \
                    any(s not in GUARD_SERIES for s in on):
                raise GuardError(f"Guard on={self.on!r} is not valid; pass one or both of {', '.join(GUARD_SERIES)}.")
            values["on"] = tuple(s for s in GUARD_SERIES if s in on)
        if "select" in values and values["select"] is not None:
            select = values["select"]
            if not (isinstance(select, str) or (isinstance(select, Sequence) and
                                                all(isinstance(s, str) for s in select))):
                raise GuardError(f"Guard select={select!r} is not valid; pass a glob over parameter names or a kind "
                                 "('linear', 'attention', ...), or a list of them.")
            values["select"] = select if isinstance(select, str) else tuple(select)
        warmup = values["warmup"] if values["warmup"] is not None else max(2, values["window"] // 2)
        # a standard deviation needs two values (every mode has one)
        values["warmup"] = _integer("warmup", warmup, 2)
        if self.mode == "skip" and values["warmup"] > values["window"]:
            raise GuardError(f"Guard warmup={values['warmup']} is longer than window={values['window']}: the window "
                             "never holds that many values, so nothing would be skipped; pass a warmup <= window.")
        if not isinstance(self.nonfinite, bool):
            raise GuardError(f"Guard nonfinite={self.nonfinite!r} is not valid; pass True or False.")
        for k, v in values.items():
            object.__setattr__(self, k, v)

    def __repr__(self) -> str:
        own = [k for k in _DEFAULTS[self.mode] if k != "warmup"]
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in (*own, *_COMMON))
        return f"Guard(mode={self.mode!r}, {args})"

    def arguments(self) -> dict:
        """The arguments of this mode, defaults filled in (the manifest's record of the guard)."""
        return {"mode": self.mode, **{k: getattr(self, k) for k in (*_DEFAULTS[self.mode], *_COMMON)}}
