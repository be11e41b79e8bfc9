"""Spike detection on a dense per-step series (loss, gradient norm): a robust z-score over a trailing window.

The rule, for each step ``i`` of the series (in step order):

* **History**: the up to ``window`` *finite* values before ``i`` (non-finite values never enter a history).
  With fewer than ``min_history`` of them there is no verdict: the first steps of a run are never spikes.
* **Scale**: values are compared in log10 when every finite value of the series is > 0 (a loss of a
  classifier, a gradient norm: their noise is multiplicative, a spike is a *factor*), else linearly.
* **Robust z**: ``z = (x_i - median(history)) / (1.4826 * MAD(history))``: median and median absolute
  deviation instead of mean and standard deviation, so earlier spikes in the window do not inflate the
  reference (one 1000x step would make a mean/std rule blind for the next ``window`` steps). The scale
  is floored at ``min_scale`` (log10 units: 0.01 is a 2.3 % change) so a perfectly flat history does not
  make every rounding difference infinitely significant.
* **Spike**: ``z > z`` (``direction="up"``, the default: a loss or gradient norm that jumps *up* is the
  problem; a sudden drop is not), ``z < -z`` (``"down"``) or ``|z| > z`` (``"both"``). A non-finite value
  (NaN, inf) is always a spike, with ``z = inf``.

Why these defaults: ``window=128`` and ``z=6`` are OLMo-core's ``StabilityMonitorCallback`` choices
(6 sigma over 128 steps), which flags loss and gradient-norm spikes in large pre-training runs with few
false alarms; a robust 6 sigma is stricter than a plain one on heavy-tailed per-batch losses (the MAD
ignores the tail that inflates a standard deviation, but the threshold is far enough out that ordinary
batch-to-batch noise never reaches it). ``min_history=8`` is the fewest values whose MAD means anything.

Pure numpy (no torch): used by the report on recorded series and by the callback on the host copy of its
dense buffer. ``detect_spikes`` over ``window + new`` trailing values finds the spikes among the ``new``
ones exactly as over the whole series (each verdict depends only on its own trailing window).

Example:
    >>> import numpy as np
    >>> steps = np.arange(200)
    >>> loss = 2.0 * np.exp(-steps / 100) * np.exp(0.02 * np.random.default_rng(0).standard_normal(200))
    >>> loss[150] *= 1000.0
    >>> loss[170] = np.nan
    >>> [(s.step, s.z > 6) for s in detect_spikes(steps, loss)]   # the NaN is a spike with z = inf
    [(150, True), (170, True)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DIRECTIONS", "Spike", "detect_spikes"]

DIRECTIONS = ("up", "down", "both")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
_CHUNK = 4096  # rows of the sliding-window view evaluated at once (window x chunk floats in memory)


@dataclass(frozen=True)
class Spike:
    """One spike: at ``step`` the series was ``value``; ``reference`` is the median of its trailing window
    (in the series' own units), ``z`` the robust z-score (``inf`` for a non-finite value)."""

    step: int
    value: float
    reference: float
    z: float


def _check(name: str, value, minimum: float, integer: bool) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int)
    if bad or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"detect_spikes({name}={value!r}): must be {kind} >= {minimum}.")


def detect_spikes(steps: np.ndarray, values: np.ndarray, *, window: int = 128, z: float = 6.0,
                  min_history: int = 8, direction: str = "up", log: bool | None = None,
                  min_scale: float = 0.01) -> list[Spike]:
    """Spikes of ``values`` (one per entry of ``steps``, any order) by the module's rule; sorted by step.

    ``log=None`` chooses log10 when every finite value is positive; ``min_scale`` floors the robust
    standard deviation (in log10 units when ``log``, else in the values' units).

    Example:
        >>> detect_spikes(np.arange(12), np.r_[np.ones(10), 50.0, 1.0])[0].step
        10
    """
    _check("window", window, 1, integer=True)
    _check("min_history", min_history, 1, integer=True)
    _check("z", z, 0.0, integer=False)
    _check("min_scale", min_scale, 0.0, integer=False)
    if direction not in DIRECTIONS:
        raise ValueError(f"detect_spikes(direction={direction!r}): valid: {', '.join(map(repr, DIRECTIONS))}.")
    if min_history > window:
        raise ValueError(f"detect_spikes(min_history={min_history}) must not exceed window={window}.")
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape or steps.ndim != 1:
        raise ValueError(f"detect_spikes: steps {steps.shape} and values {values.shape} must be 1-D of one length.")
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    finite = np.isfinite(values)
    out = [Spike(int(s), float(v), math.nan, math.inf) for s, v in zip(steps[~finite], values[~finite])]
    x_raw, x_steps = values[finite], steps[finite]
    x = x_raw
    if log is None:
        log = bool(len(x)) and bool((x > 0).all())
    if log:
        if (x <= 0).any():
            raise ValueError("detect_spikes(log=True): the series has values <= 0; pass log=False.")
        x = np.log10(x)
    n = len(x)
    median = np.full(n, np.nan)
    scale = np.full(n, np.nan)
    # positions with a partial history (fewer than `window` values before them): one at a time
    for i in range(min_history, min(window, n)):
        h = x[:i]
        median[i] = np.median(h)
        scale[i] = np.median(np.abs(h - median[i]))
    # full windows: a sliding view of the `window` values before each position, evaluated in chunks
    if n > window:
        view = np.lib.stride_tricks.sliding_window_view(x[:-1], window)  # view[k] = x[k : k + window]
        for start in range(0, len(view), _CHUNK):
            h = view[start:start + _CHUNK]
            med = np.median(h, axis=1)
            pos = slice(window + start, window + start + len(h))
            median[pos] = med
            scale[pos] = np.median(np.abs(h - med[:, None]), axis=1)
    scale = np.maximum(MAD_TO_SIGMA * scale, min_scale)
    with np.errstate(invalid="ignore"):
        zs = (x - median) / scale
        hit = {"up": zs > z, "down": zs < -z, "both": np.abs(zs) > z}[direction]
    for i in np.flatnonzero(hit):
        ref = 10.0 ** median[i] if log else median[i]
        out.append(Spike(int(x_steps[i]), float(x_raw[i]), float(ref), float(zs[i])))
    return sorted(out, key=lambda s: s.step)
