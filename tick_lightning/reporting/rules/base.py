"""What every anomaly rule shares: the ``Finding`` it returns, the ``Thresholds`` it reads, the ``Inputs`` it
judges (the run's tables, each built once), the ``Rule`` record the registry holds, and the
history-outlier test two families use.

A rule family is one module of ``tick_lightning.reporting.rules`` exporting ``RULE = Rule(...)``: its finding
kinds (name -> one-line description, most severe first), ``find(inputs, th) -> list[Finding]`` and,
optionally, ``fold(findings, inputs, th) -> list[Finding]``, run over every family's findings before they
are collapsed (to merge what several rules said about one event into one line).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property

import numpy as np
import pandas as pd

__all__ = ["Finding", "Inputs", "Rule", "Thresholds", "history_outliers"]


@dataclass(frozen=True)
class Thresholds:
    """The anomaly rules' parameters (``report(..., thresholds=Thresholds(grad_factor=100))``).

    * ``grad_factor`` k: a gradient norm > k x the median of the layer's other ticks, or < 1/k of the median
      of its preceding ticks.
    * ``window``: the reference is taken over this many ticks on each side (before only, for < 1/k; the layer's recent history, so
      a slow trend over a long run is not an anomaly); ``min_history``: fewer other ticks, no verdict.
    * ``mad_z``: also require the deviation (in log10) to exceed this many robust standard deviations
      (1.4826 x MAD) of the layer's other ticks, so an intrinsically noisy layer is not flagged.
    * ``ratio_low``/``ratio_high``: the update/weight band; healthy fine-tuning sits near 1e-3.
      ``ratio_matrices_only``: apply the band to weight matrices only (>= 2 dimensions in the manifest):
      biases and norm gains start at 0 or 1 with a handful of elements, so their ratios are legitimately
      large early on (a zero-initialised bias has ratio inf at step 0).
    * ``lr_floor``: below-band ratios are not reported at ticks whose learning rate is under this fraction
      of the run's peak (warm-up start, end of a decay): there the schedule explains a small update.
    * ``dead_rms``: a norm input with RMS below this is dead; ``crest``: absmax/RMS above this is saturating;
      ``rms_factor``: RMS above this multiple of its own median is exploding.
    * ``spike_z``: a loss / global gradient norm more than this many robust standard deviations above its
      trailing window is a spike (``tick_lightning.spikes.detect_spikes``); the window is
      ``spike_window`` steps with at least ``spike_min_history`` of them on the dense per-step series, and
      ``window`` / ``min_history`` ticks on tick records (a run without dense series).
    * ``common_mode_layers``: with at least this many layers, the per-layer gradient rules judge each layer
      after removing the tick's *common mode* (the median over layers of each layer's log-deviation from
      its own median): a change every layer shares is the run-level rules' business.
    * ``ratio_first_steps``: ``update_ratio_high`` is not reported before this optimizer step: Adam's
      bias-corrected first updates are about lr x sign(g) for every element, so every layer's ratio is
      lr / rms(w) (~0.1 for lr 1e-3 and weights of std 0.01) whatever the gradient says.
    * ``max_layers``: more layers than this with the same per-layer finding at one step are one run-wide
      finding (layer ``""``), not one line each (``anomalies.run_wide``; the update ratio's own rule too).
    * ``grad_residue``: a layer whose gradient norm, at the tick and in its reference, stays under this share
      of the tick's total gradient norm (the recorded layers') is not exploding nor vanishing: its gradient is
      rounding residue of a sum that is zero in exact arithmetic (an attention key bias: softmax does not see
      a shift of the keys), fp32's ~1e-7 of the terms that cancel, and jumps by decades in noise.
    """

    grad_factor: float = 10.0
    window: int = 25
    min_history: int = 4
    mad_z: float = 3.0
    ratio_low: float = 1e-5
    ratio_high: float = 1e-1
    ratio_matrices_only: bool = True
    lr_floor: float = 0.05
    dead_rms: float = 1e-6
    crest: float = 1e3
    rms_factor: float = 10.0
    spike_z: float = 6.0
    spike_window: int = 128
    spike_min_history: int = 8
    common_mode_layers: int = 4
    ratio_first_steps: int = 10
    max_layers: int = 5
    grad_residue: float = 1e-7

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"Thresholds.{f.name}={value!r}: must be True or False.")
                continue
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"Thresholds.{f.name}={value!r}: must be a positive integer.")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Thresholds.{f.name}={value!r}: must be a positive finite number.")
        for name in ("grad_factor", "rms_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"Thresholds.{name}={getattr(self, name)!r}: must be > 1 (a factor away from the median).")
        if self.spike_min_history > self.spike_window:
            raise ValueError(f"Thresholds spike_min_history={self.spike_min_history} must not exceed "
                             f"spike_window={self.spike_window}.")
        if self.ratio_low >= self.ratio_high:
            raise ValueError(f"Thresholds ratio_low={self.ratio_low} must be below ratio_high={self.ratio_high}.")


@dataclass(frozen=True)
class Finding:
    """One anomaly: at ``step`` (through ``last_step``, over ``ticks`` ticks), ``layer`` showed ``kind``.

    ``value`` is the most extreme observed value and ``reference`` what it was compared with (NaN when the
    rule has no reference, e.g. a NaN loss). ``layer`` is ``""`` for run-wide values (loss, AMP).
    """

    step: int
    layer: str
    kind: str
    value: float
    reference: float
    last_step: int = -1
    ticks: int = 1
    detail: str = ""

    def __post_init__(self) -> None:
        if self.last_step < 0:
            object.__setattr__(self, "last_step", self.step)



@dataclass
class Inputs:
    """The tables the rules read from one run (``tick_lightning.reporting.data.RunData``), each built on first
    use and shared: several families read the gradient norms, and a 10,000 x 1,000 pivot is not free."""

    run: object

    @cached_property
    def dense(self) -> dict[str, pd.Series]:
        return getattr(self.run, "dense", {}) or {}

    @cached_property
    def grad_norm(self) -> pd.DataFrame:
        return self.run.wide("grad", "norm")

    @cached_property
    def grad_nonfinite(self) -> pd.DataFrame:
        return self.run.wide("grad", "nonfinite")

    @cached_property
    def skipped(self) -> pd.Series | None:
        return self.run.scalar("amp", "", "skipped") if self.run.has("amp", "skipped") else None

    @cached_property
    def tick_loss(self) -> pd.Series | None:
        return self.run.scalar("loss", "", "value") if self.run.has("loss", "value") else None

    @cached_property
    def tick_grad(self) -> pd.Series | None:
        return self.run.scalar("grad", "", "norm") if self.run.has("grad", "norm") else None

    @cached_property
    def dense_loss(self) -> pd.Series | None:
        return self.dense.get("loss")

    @cached_property
    def dense_grad(self) -> pd.Series | None:
        return self.dense.get("grad_norm")

    @cached_property
    def loss_all(self) -> pd.Series | None:
        """The tick losses plus the dense series' values at the steps between ticks."""
        tick, dense = self.tick_loss, self.dense_loss
        if dense is None:
            return tick
        return dense if tick is None else pd.concat([tick, dense[~dense.index.isin(tick.index)]]).sort_index()

    @cached_property
    def guard(self) -> pd.DataFrame:
        """The guard's interventions (``RunData.guard``), empty without a guard."""
        return getattr(self.run, "guard", None) if getattr(self.run, "guard", None) is not None else pd.DataFrame()

    @cached_property
    def no_update(self) -> list[int]:
        """Steps whose optimizer step the fp16 GradScaler or the guard skipped: no parameter moved."""
        amp = [int(s) for s, v in self.skipped.items() if v > 0] if self.skipped is not None else []
        guard = [int(s) for s, v in self.guard["skipped"].items() if v > 0] if "skipped" in self.guard else []
        return sorted(set(amp) | set(guard))

    @cached_property
    def ratio(self) -> pd.DataFrame:
        return self.run.wide("update", "ratio")

    @cached_property
    def dense_steps(self) -> list[int] | None:
        """Every step of the dense per-step series (None without them)."""
        return sorted(set().union(*(s.index for s in self.dense.values()))) if self.dense else None


@dataclass(frozen=True)
class Rule:
    """One rule family in the registry (``tick_lightning.reporting.rules.RULES``).

    ``kinds``: the finding kinds it reports with a one-line description, most severe first. ``find``:
    its findings over a run. ``fold``: optional, rewrites the findings of *every* family before they are
    collapsed (families fold in registry order), for one event that several rules saw.
    """

    name: str
    kinds: Mapping[str, str]
    find: Callable[[Inputs, Thresholds], list[Finding]]
    fold: Callable[[list[Finding], Inputs, Thresholds], list[Finding]] | None = field(default=None)


def log10_values(wide: pd.DataFrame) -> np.ndarray:
    v = wide.to_numpy(np.float64, copy=True)
    v[~np.isfinite(v)] = np.nan  # non-finite values are the non-finite rule's business
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(np.clip(v, 1e-30, None))


def history_outliers(wide: pd.DataFrame, factor: float, window: int = 25, min_history: int = 4,
                     mad_z: float = 3.0, direction: str = "both",
                     causal: bool = False) -> list[tuple[int, str, float, float]]:
    """Cells of a step x name table more than ``factor`` x away from the median of the same column's other ticks.

    Returns ``(step, name, value, reference)``. The reference is the median over the ``window`` ticks either
    side (``causal=True``: the ``window`` preceding ticks only), excluding the cell itself; the deviation (in
    log10) must also exceed ``mad_z`` robust standard deviations of those ticks. A cheap pass (rolling median
    including the cell, which one outlier moves by at most one order statistic) picks candidates; the exact
    leave-one-out test runs on candidates only, so a 10,000 x 1,000 table costs one rolling median.

    Example:
        >>> t = pd.DataFrame({"a": [1.0, 1.2, 0.8, 1.0, 1.1, 0.01]}, index=[0, 1, 2, 3, 4, 5])
        >>> history_outliers(t, factor=10)
        [(5, 'a', 0.01, 1.0)]
    """
    if direction not in ("both", "up", "down"):
        raise ValueError(f"direction={direction!r}; valid: 'both', 'up', 'down'.")
    if wide.empty:
        return []
    logv = log10_values(wide)
    limit = math.log10(factor)
    if causal:  # the median of the preceding ticks is already the exact reference
        rolled = pd.DataFrame(logv).rolling(window, min_periods=min_history).median().shift(1).to_numpy()
    else:
        rolled = pd.DataFrame(logv).rolling(2 * window + 1, center=True, min_periods=min_history + 1).median().to_numpy()
    with np.errstate(invalid="ignore"):
        dev = logv - rolled
        if direction == "up":
            cand = dev > limit / 2
        elif direction == "down":
            cand = dev < -limit / 2
        else:
            cand = np.abs(dev) > limit / 2
    raw = wide.to_numpy(np.float64)
    out = []
    steps, names = wide.index.to_numpy(), list(wide.columns)
    for i, j in zip(*np.nonzero(cand)):
        lo, hi = max(0, i - window), i if causal else min(len(logv), i + window + 1)
        others = np.r_[logv[lo:i, j], logv[i + 1:hi, j]]
        others = others[~np.isnan(others)]
        if len(others) < min_history:
            continue
        ref = float(np.median(others))
        d = logv[i, j] - ref
        if direction == "up" and d <= limit or direction == "down" and d >= -limit or abs(d) <= limit:
            continue
        mad = float(np.median(np.abs(others - ref)))
        if mad > 0 and abs(d) / (1.4826 * mad) <= mad_z:
            continue
        out.append((int(steps[i]), str(names[j]), float(raw[i, j]), float(10**ref)))
    return sorted(out)

