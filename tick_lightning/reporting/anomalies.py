"""The anomaly summary: pure functions from step x name tables to findings, and a Markdown rendering.

Every rule compares a value with a reference and says which: the run's loss and global gradient norm
with their trailing window (``tick_lightning.spikes``: on the dense per-step series when recorded, so a
spike between ticks is found at its step), a layer's gradient norm with the median of that layer's *own*
other ticks after removing what every layer did at that tick (so a layer whose gradients are always small
is not "vanishing", and gradients shrinking together as the loss converges are not either), an
update/weight ratio with a fixed band around the usual 1e-3, a normalization input with its own history
and with absolute limits. Findings on consecutive ticks of the same layer and kind are merged into one row
(``step`` .. ``last_step``) so a layer that is off for 10,000 ticks is one line, not 10,000.

Example:
    >>> import numpy as np, pandas as pd
    >>> grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 1e3, 1.05, 0.95]}, index=range(0, 70, 10))
    >>> [(f.step, f.layer, f.kind) for f in grad_norm_findings(grad)]
    [(40, 'w', 'exploding_grad')]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

__all__ = [
    "KINDS",
    "Finding",
    "Thresholds",
    "collapse",
    "common_mode",
    "dead_grad_findings",
    "find_anomalies",
    "findings_frame",
    "frozen_findings",
    "grad_norm_findings",
    "history_outliers",
    "learning_phase",
    "nonfinite_findings",
    "norm_input_findings",
    "spike_findings",
    "to_markdown",
    "update_ratio_findings",
]

#: Finding kinds, most severe first (the order of the summary).
KINDS: dict[str, str] = {
    "nonfinite_loss": "loss is NaN or infinite",
    "nonfinite_grad": "gradient has NaN or infinite values",
    "nonfinite_weight": "weight has NaN or infinite values",
    "amp_skipped": "fp16 GradScaler skipped the optimizer step",
    "loss_spike": "loss far above its trailing window (robust z)",
    "grad_spike": "global gradient norm far above its trailing window (robust z)",
    "exploding_grad": "gradient norm > k x the layer's median (beyond what every layer did at that tick)",
    "vanishing_grad": "gradient norm < 1/k of the median of the layer's preceding ticks (beyond the model-wide trend)",
    "dead_grad": "gradient exactly zero (or absent) while other layers' are not",
    "frozen": "parameter not updated while others were (missing from the optimizer?)",
    "exploding_norm_input": "norm-layer input RMS > k x its median",
    "saturating_norm_input": "norm-layer input absmax huge relative to its RMS (or near the fp16 limit)",
    "dead_norm_input": "norm-layer input RMS ~ 0",
    "update_ratio_high": "update/weight ratio above the band",
    "update_ratio_low": "update/weight ratio below the band",
}
_FP16_MAX = 65504.0


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
    * ``max_layers``: more layers than this with the same update-ratio finding at one tick are one
      model-wide finding (layer ``""``), not one line each.
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


def _log10(wide: pd.DataFrame) -> np.ndarray:
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
    logv = _log10(wide)
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


def common_mode(grad_norm: pd.DataFrame, min_layers: int = 4) -> pd.Series:
    """Per tick, the log10 factor every layer shares: the median over layers of each layer's log10 deviation
    from its own median over the run (0 with fewer than ``min_layers`` finite, non-zero layers at a tick).

    When the loss converges every layer's gradient shrinks with it; when a bad batch hits, every layer's
    gradient jumps. Neither is a property of one layer, and the median ignores the one layer that does
    blow up or die.

    Example:
        >>> g = pd.DataFrame({c: [1.0, 0.1, 0.01] for c in "abcd"})
        >>> common_mode(g).round(6).tolist()
        [1.0, 0.0, -1.0]
    """
    logv = _log10(grad_norm.where(grad_norm > 0))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns / rows: no reference, no factor
        dev = logv - np.nanmedian(logv, axis=0, keepdims=True)
        common = np.nanmedian(dev, axis=1)
    enough = np.isfinite(dev).sum(axis=1) >= min_layers
    return pd.Series(np.where(enough & np.isfinite(common), common, 0.0), index=grad_norm.index)


def grad_norm_findings(grad_norm: pd.DataFrame, th: Thresholds = Thresholds()) -> list[Finding]:
    """Exploding / vanishing gradients: per layer, relative to that layer's own history (see ``history_outliers``),
    after dividing out the tick's common mode (``common_mode``, with ``th.common_mode_layers`` layers or more).

    An exploding gradient is judged against the ticks on both sides; a vanishing one against the *preceding*
    ticks only: early in fine-tuning many layers' gradients grow for a while (a head that starts to learn, a
    warm-up), and the larger gradients that come later do not make the earlier, ordinary ones vanishing.
    A finding must hold in the layer's own units too, not only relative to the common mode: when most
    layers' gradients rise k-fold as the model starts to learn, a head whose gradient merely stays where it
    was has not vanished (and when they all fall, one that stays has not exploded).
    Exactly-zero gradients are left to ``dead_grad_findings``; ``value`` and ``reference`` are in the
    layer's own units (the reference scaled by the common mode of the finding's tick).

    Example:
        >>> grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 1.05, 60, 90, 80, 100, 70, 85, 95, 1e-3]})
        >>> [(f.step, f.kind) for f in grad_norm_findings(grad)]  # ticks 0-4 are not "vanishing"
        [(12, 'vanishing_grad')]
    """
    nonzero = grad_norm.where(grad_norm != 0)
    common = common_mode(nonzero, th.common_mode_layers)
    factor = 10.0 ** common
    relative = nonzero.div(factor, axis=0)
    def outliers(frame: pd.DataFrame) -> list:
        up = history_outliers(frame, th.grad_factor, th.window, th.min_history, th.mad_z, direction="up")
        down = history_outliers(frame, th.grad_factor, th.window, th.min_history, th.mad_z, direction="down",
                                causal=True)
        return up + down

    absolute = {(s, n) for s, n, *_ in outliers(nonzero)}
    out = []
    for s, n, v, r in sorted(f for f in outliers(relative) if (f[0], f[1]) in absolute):
        f = float(factor.loc[s])
        out.append(Finding(s, n, "exploding_grad" if v > r else "vanishing_grad", v * f, r * f,
                           detail=f"all layers x{f:.3g} at this tick" if abs(common.loc[s]) > 0.5 else ""))
    return out


def dead_grad_findings(grad_norm: pd.DataFrame, grad_nonfinite: pd.DataFrame | None = None) -> list[Finding]:
    """Layers whose gradient is exactly zero, or absent (norm and non-finite count both NaN: ``p.grad`` was
    None), at a tick where some other layer's gradient is finite and non-zero.

    Example:
        >>> g = pd.DataFrame({"a": [1.0, 0.9], "b": [0.0, 0.0]})
        >>> [(f.step, f.layer) for f in dead_grad_findings(g)]
        [(0, 'b'), (1, 'b')]
    """
    if grad_norm.empty:
        return []
    v = grad_norm.to_numpy(np.float64)
    absent = np.zeros_like(v, dtype=bool)  # without the counts a NaN norm could be a NaN gradient
    if grad_nonfinite is not None and not grad_nonfinite.empty:
        absent = np.isnan(v) & np.isnan(grad_nonfinite.reindex_like(grad_norm).to_numpy(np.float64))
    dead = (v == 0) | absent
    alive = (np.isfinite(v) & (v > 0)).any(axis=1, keepdims=True)
    return [Finding(int(grad_norm.index[i]), str(grad_norm.columns[j]), "dead_grad", float(v[i, j]), float("nan"),
                    detail="no gradient (unused in the forward?)" if absent[i, j] else "gradient exactly zero")
            for i, j in zip(*np.nonzero(dead & alive))]


def frozen_findings(ratio: pd.DataFrame, grad_norm: pd.DataFrame | None = None) -> list[Finding]:
    """Parameters whose update is exactly zero at a tick where another parameter moved, while their own
    gradient is non-zero (a zero or absent gradient is ``dead_grad``'s finding, not this one).

    Example:
        >>> r = pd.DataFrame({"a": [1e-3, 2e-3], "b": [0.0, 0.0]})
        >>> [(f.step, f.layer, f.kind) for f in frozen_findings(r)]
        [(0, 'b', 'frozen'), (1, 'b', 'frozen')]
    """
    if ratio.empty:
        return []
    v = ratio.to_numpy(np.float64)
    still = v == 0
    moved = (np.isfinite(v) & (v > 0)).any(axis=1, keepdims=True)
    if grad_norm is not None and not grad_norm.empty:
        g = grad_norm.reindex_like(ratio).to_numpy(np.float64)
        still &= ~((g == 0) | np.isnan(g))
    return [Finding(int(ratio.index[i]), str(ratio.columns[j]), "frozen", 0.0, float("nan"),
                    detail="update exactly zero with a non-zero gradient")
            for i, j in zip(*np.nonzero(still & moved))]


def spike_findings(series: pd.Series | None, kind: str, window: int, min_history: int, z: float) -> list[Finding]:
    """``kind`` findings at the finite upward spikes of a step-indexed series (``tick_lightning.spikes``);
    its non-finite values are the non-finite rules' findings and are left out here.

    Example:
        >>> loss = pd.Series([0.7, 0.69, 0.7, 0.68, 0.69, 700.0, 0.67], index=range(0, 70, 10))
        >>> [(f.step, f.kind) for f in spike_findings(loss, "loss_spike", 25, 4, 6.0)]
        [(50, 'loss_spike')]
    """
    from tick_lightning.spikes import detect_spikes

    if series is None or series.empty:
        return []
    series = series.astype(float)
    finite = series[np.isfinite(series.to_numpy())]
    if len(finite) <= min_history:
        return []
    spikes = detect_spikes(finite.index.to_numpy(), finite.to_numpy(), window=window, z=z,
                           min_history=min(min_history, window))
    return [Finding(sp.step, "", kind, sp.value, sp.reference, detail=f"robust z = {sp.z:.3g}") for sp in spikes]


def learning_phase(findings: Iterable[Finding], grad_norm: pd.DataFrame, loss: pd.Series | None,
                   th: Thresholds = Thresholds()) -> list[Finding]:
    """Drop ``exploding_grad`` findings that are a rise the loss is profiting from, not an explosion.

    When a from-scratch model starts to learn (attention heads switching on, a loss leaving chance level),
    gradients of whole groups of layers grow 10-1000x and stay there while the loss falls. A finding is
    dropped when both hold: the layer is *not back* near its reference at the next tick (its gradient
    stays above ``sqrt(grad_factor)`` x the reference, or the tick is the last one), and the loss at that
    tick is below the median of up to ``window`` preceding ticks (at least ``min_history`` of them). A
    one-tick spike is always kept, and so is a rise while the loss stalls or climbs (a divergence).

    Example:
        >>> grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 40.0, 90.0, 80.0]}, index=range(0, 70, 10))
        >>> falling = pd.Series([0.7, 0.7, 0.69, 0.7, 0.5, 0.3, 0.2], index=grad.index)
        >>> len(grad_norm_findings(grad)), learning_phase(grad_norm_findings(grad), grad, falling)
        (3, [])
    """
    findings = list(findings)
    if loss is None or grad_norm.empty:
        return findings
    steps = list(grad_norm.index)
    position = {int(s): i for i, s in enumerate(steps)}
    loss = loss.reindex(grad_norm.index).astype(float)
    lvals = loss.to_numpy()
    back_near = math.sqrt(th.grad_factor)

    def improving(i: int) -> bool:
        before = lvals[max(0, i - th.window):i]
        before = before[np.isfinite(before)]
        return bool(len(before) >= th.min_history and np.isfinite(lvals[i]) and lvals[i] < np.median(before))

    def sustained(i: int, layer: str, reference: float) -> bool:
        if i + 1 >= len(steps):
            return True  # no later tick says it was a spike
        nxt = float(grad_norm[layer].iloc[i + 1])
        return not (np.isfinite(nxt) and nxt < back_near * reference)

    out = []
    for f in findings:
        i = position.get(f.step)
        if (f.kind == "exploding_grad" and i is not None and f.layer in grad_norm.columns
                and sustained(i, f.layer, f.reference) and improving(i)):
            continue
        out.append(f)
    return out


def update_ratio_findings(ratio: pd.DataFrame, th: Thresholds = Thresholds(),
                          no_update_steps: Iterable[int] = (), shapes: Mapping[str, Sequence[int]] | None = None,
                          low_lr_steps: Iterable[int] = ()) -> list[Finding]:
    """Update/weight ratios outside ``[ratio_low, ratio_high]``.

    Ticks whose optimizer step applied no update at all (a skipped AMP step, a zero learning rate: every
    ratio is 0) are left out, and so are ``no_update_steps``; they are not a property of any one layer.
    With ``shapes`` (the manifest's ``parameters``) and ``th.ratio_matrices_only``, parameters with fewer
    than 2 dimensions are left out. A non-finite ratio (weight norm 0) has no meaning and is skipped, and
    an exactly-zero one is ``frozen_findings``' business. At ``low_lr_steps`` (learning rate under
    ``th.lr_floor`` of its peak) only the upper bound applies; before optimizer step
    ``th.ratio_first_steps`` only the lower one (Adam's first steps). More than ``th.max_layers`` layers
    out of the band on the same side at one tick are one model-wide finding (layer ``""``).
    """
    if ratio.empty:
        return []
    if shapes and th.ratio_matrices_only:
        ratio = ratio[[c for c in ratio.columns if c not in shapes or len(shapes[c]) >= 2]]
    r = ratio.drop(index=[s for s in no_update_steps if s in ratio.index])
    all_zero = (r.fillna(0.0) == 0.0).all(axis=1)
    r = r[~all_zero]
    v = r.to_numpy(np.float64, copy=True)
    v[~np.isfinite(v) | (v == 0)] = np.nan
    out = []
    steps = r.index.to_numpy()
    scheduled_low = np.isin(steps, list(low_lr_steps))[:, None]
    first_steps = (steps < th.ratio_first_steps)[:, None]
    with np.errstate(invalid="ignore"):
        for mask, kind, ref in (((v > th.ratio_high) & ~first_steps, "update_ratio_high", th.ratio_high),
                                ((v < th.ratio_low) & ~scheduled_low, "update_ratio_low", th.ratio_low)):
            for i in np.flatnonzero(mask.any(axis=1)):
                cols = np.flatnonzero(mask[i])
                if len(cols) > th.max_layers:
                    worst = cols[np.argmax(np.abs(np.log10(v[i, cols] / ref)))]
                    out.append(Finding(int(steps[i]), "", kind, float(v[i, worst]), ref,
                                       detail=f"{len(cols)} of {r.shape[1]} layers (most extreme: {r.columns[worst]})"))
                    continue
                out += [Finding(int(steps[i]), str(r.columns[j]), kind, float(v[i, j]), ref) for j in cols]
    return out


def norm_input_findings(rms: pd.DataFrame, absmax: pd.DataFrame, th: Thresholds = Thresholds(),
                        fp16: bool = False) -> list[Finding]:
    """Dead (RMS ~ 0), saturating (absmax/RMS > ``crest``, or absmax past half the fp16 range in fp16 runs)
    and exploding (RMS > ``rms_factor`` x its own median) normalization-layer inputs."""
    out: list[Finding] = []
    if rms.empty:
        return out
    absmax = absmax.reindex(index=rms.index, columns=rms.columns)
    r, a = rms.to_numpy(np.float64), absmax.to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dead = r < th.dead_rms
        crest = np.where(dead, np.nan, a / r)
        for i, j in zip(*np.nonzero(dead)):
            out.append(Finding(int(rms.index[i]), str(rms.columns[j]), "dead_norm_input", float(r[i, j]), th.dead_rms))
        for i, j in zip(*np.nonzero(crest > th.crest)):
            out.append(Finding(int(rms.index[i]), str(rms.columns[j]), "saturating_norm_input", float(a[i, j]),
                               float(th.crest * r[i, j]), detail=f"absmax/rms = {crest[i, j]:.3g}"))
        if fp16:
            for i, j in zip(*np.nonzero((a > _FP16_MAX / 2) & ~(crest > th.crest))):
                out.append(Finding(int(rms.index[i]), str(rms.columns[j]), "saturating_norm_input", float(a[i, j]),
                                   _FP16_MAX, detail="absmax near the fp16 limit 65504"))
    for s, n, v, ref in history_outliers(rms, th.rms_factor, th.window, th.min_history, th.mad_z, direction="up"):
        out.append(Finding(s, n, "exploding_norm_input", v, ref))
    return out


def nonfinite_findings(loss: pd.Series | None = None, loss_nonfinite: pd.Series | None = None,
                       grad_nonfinite: pd.DataFrame | None = None, grad_norm: pd.DataFrame | None = None,
                       weight_nonfinite: pd.DataFrame | None = None, skipped: pd.Series | None = None,
                       max_layers: int = 5) -> list[Finding]:
    """Non-finite loss, gradients and weights, and skipped AMP steps (all indexed by step).

    When more than ``max_layers`` layers are non-finite at one step (an fp16 overflow reaches most of the
    model), they are one finding naming the first layer and the count.
    """
    out: list[Finding] = []
    bad_loss: dict[int, float] = {}
    if loss is not None:
        for s, v in loss.items():
            if not np.isfinite(v):
                bad_loss[int(s)] = float(v)
    if loss_nonfinite is not None:
        for s, v in loss_nonfinite.items():
            if v > 0:
                bad_loss.setdefault(int(s), float(loss.get(s, np.nan)) if loss is not None else float("nan"))
    out += [Finding(s, "", "nonfinite_loss", v, float("nan")) for s, v in sorted(bad_loss.items())]

    def per_layer(counts: pd.DataFrame | None, norms: pd.DataFrame | None, kind: str) -> None:
        bad = None
        if counts is not None and not counts.empty:
            bad = counts.fillna(0) > 0
        if norms is not None and not norms.empty:
            nb = ~np.isfinite(norms.astype(float))
            if counts is not None and not counts.empty:  # NaN norm and NaN count: no gradient at all (dead_grad)
                nb &= ~(norms.isna() & counts.reindex_like(norms).isna())
            bad = nb if bad is None else (bad.reindex_like(nb).fillna(False).astype(bool) | nb)
        if bad is None:
            return
        bad = bad.astype(bool)
        flags = bad.to_numpy()
        for i in np.flatnonzero(flags.any(axis=1)):  # only steps with an event: no Python per clean row
            step = bad.index[i]
            layers = [str(c) for c in bad.columns[flags[i]]]
            count = float(counts.loc[step, layers[0]]) if counts is not None and layers[0] in counts.columns and step in counts.index else float("nan")
            if len(layers) > max_layers:
                out.append(Finding(int(step), layers[0], kind, count, float("nan"),
                                   detail=f"{len(layers)} layers non-finite (first shown)"))
            else:
                for name in layers:
                    c = float(counts.loc[step, name]) if counts is not None and name in counts.columns and step in counts.index else float("nan")
                    out.append(Finding(int(step), name, kind, c, float("nan"), detail="non-finite element count"))

    per_layer(grad_nonfinite, grad_norm, "nonfinite_grad")
    per_layer(weight_nonfinite, None, "nonfinite_weight")
    if skipped is not None:
        out += [Finding(int(s), "", "amp_skipped", float(v), 0.0) for s, v in skipped.items() if v > 0]
    return out


#: Run-level kinds that the dense per-step series can report at any step (collapsed over those steps).
_DENSE_KINDS = frozenset({"loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad"})


def collapse(findings: Iterable[Finding], steps: Iterable[int], dense_steps: Iterable[int] | None = None,
             dense_gap: int = 1) -> list[Finding]:
    """Merge findings of the same (kind, layer) on consecutive ticks of ``steps`` into one, keeping the most
    extreme value (farthest from its reference in log scale), sorted by severity then step.

    With ``dense_steps`` (the steps of the dense per-step series), run-level findings the dense series
    reports (``loss_spike``, ``grad_spike``, non-finite loss / global gradient; layer ``""``) are merged
    over *steps* of that series instead, up to ``dense_gap`` steps apart (a divergence flags most of its
    steps, not all: one line, not one per stretch).
    """
    grids = {False: {int(s): i for i, s in enumerate(sorted({int(s) for s in steps}))}}
    if dense_steps is not None:
        grids[True] = {int(s): i for i, s in enumerate(sorted({int(s) for s in dense_steps}))}
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.kind, f.layer), []).append(f)

    def extremeness(f: Finding) -> float:
        if not (np.isfinite(f.value) and np.isfinite(f.reference)) or f.value <= 0 or f.reference <= 0:
            return math.inf
        return abs(math.log10(f.value / f.reference))

    out = []
    for (kind, layer), group in groups.items():
        on_dense = layer == "" and kind in _DENSE_KINDS and True in grids
        index, gap = grids[on_dense], dense_gap if on_dense else 1
        group.sort(key=lambda f: f.step)
        run = [group[0]]
        for f in group[1:] + [None]:
            if f is not None and 0 < index.get(f.step, -10**9) - index.get(run[-1].last_step, 10**9) <= gap:
                run.append(f)
                continue
            worst = max(run, key=extremeness)
            out.append(Finding(run[0].step, layer, kind, worst.value, worst.reference, run[-1].step, len(run),
                               worst.detail))
            if f is not None:
                run = [f]
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(out, key=lambda f: (order.get(f.kind, len(order)), f.step, f.layer))


def _fold_into_spikes(findings: list[Finding], grad_norm: pd.DataFrame, th: Thresholds) -> list[Finding]:
    """One event, one line.

    * A ``grad_spike`` at the step of a ``loss_spike`` is the same bad batch: it becomes part of the loss
      spike's detail; a run-level ``nonfinite_grad`` of the dense series at the step of a
      ``nonfinite_loss`` likewise.
    * At a tick with a run-level spike, every layer's gradient is compared with its own median: when more
      than half of the layers jumped (by more than sqrt(k)) it is a model-wide event, the per-layer
      gradient findings at that tick (relative to a common mode that moved by orders of magnitude) are
      dropped, and the spike's detail says how many layers jumped, by how much, and the largest. When
      fewer did, those layers are the finding and a ``grad_spike`` they caused is dropped.
    """
    run_level = {(f.kind, f.step): f for f in findings if f.layer == ""}
    spike_steps = {f.step for f in findings if f.kind in ("loss_spike", "grad_spike")}
    values = grad_norm.astype(float).where(lambda v: v > 0) if grad_norm.shape[1] else grad_norm
    jumped: dict[int, pd.Series] = {}  # per spike tick: the layers whose gradient jumped, by how much
    model_wide: set[int] = set()
    for step in (spike_steps & set(grad_norm.index)) if grad_norm.shape[1] else ():
        factor = (values.loc[step] / values.drop(index=step).median()).dropna()
        jumped[step] = factor[factor > math.sqrt(th.grad_factor)]
        if len(jumped[step]) > len(factor) / 2:
            model_wide.add(step)
    out = []
    for f in findings:
        if f.kind in ("exploding_grad", "vanishing_grad") and f.step in model_wide:
            continue
        if f.kind == "grad_spike" and (("loss_spike", f.step) in run_level
                                       or (len(jumped.get(f.step, ())) and f.step not in model_wide)):
            continue
        if f.kind == "nonfinite_grad" and f.layer == "" and ("nonfinite_loss", f.step) in run_level:
            continue
        extra = []
        if f.kind == "loss_spike" and (grad := run_level.get(("grad_spike", f.step))) is not None:
            extra.append(f"global gradient norm x{grad.value / grad.reference:.3g}")
        if f.kind in ("loss_spike", "grad_spike") and f.step in model_wide:
            up = jumped[f.step]
            extra.append(f"{len(up)} layers' gradients up (median x{up.median():.3g}, largest x{up.max():.3g}: "
                         f"{up.idxmax()})")
        if f.kind == "nonfinite_loss" and ("nonfinite_grad", f.step) in run_level:
            extra.append("global gradient norm non-finite too")
        if extra:
            f = Finding(f.step, f.layer, f.kind, f.value, f.reference, f.last_step, f.ticks,
                        "; ".join([f.detail, *extra] if f.detail else extra))
        out.append(f)
    return out


def find_anomalies(run, th: Thresholds = Thresholds()) -> list[Finding]:
    """Every rule over a loaded run (``tick_lightning.reporting.data.RunData``), collapsed and sorted.

    The loss and global gradient norm come from the dense per-step series when the run has them (a spike
    or a NaN between ticks is found at its step), else from the ticks.

    Example:
        >>> import tempfile
        >>> from tick_lightning.reporting.data import load_run
        >>> from tick_lightning.reporting.synthetic import write_synthetic_run
        >>> d = write_synthetic_run(tempfile.mkdtemp(), ticks=12, layers=4, nonfinite_step=50)
        >>> sorted({f.kind for f in find_anomalies(load_run(d))})
        ['nonfinite_grad', 'nonfinite_loss']
    """
    findings: list[Finding] = []
    dense = getattr(run, "dense", {}) or {}
    skipped = run.scalar("amp", "", "skipped") if run.has("amp", "skipped") else None
    grad_norm = run.wide("grad", "norm")
    grad_nonfinite = run.wide("grad", "nonfinite")
    tick_loss = run.scalar("loss", "", "value") if run.has("loss", "value") else None
    tick_grad = run.scalar("grad", "", "norm") if run.has("grad", "norm") else None
    dense_loss, dense_grad = dense.get("loss"), dense.get("grad_norm")
    loss_all = tick_loss
    if dense_loss is not None:
        loss_all = dense_loss if tick_loss is None else pd.concat([tick_loss, dense_loss[~dense_loss.index.isin(tick_loss.index)]]).sort_index()
    findings += nonfinite_findings(
        loss=loss_all,
        loss_nonfinite=run.scalar("loss", "", "nonfinite") if run.has("loss", "nonfinite") else None,
        grad_nonfinite=grad_nonfinite, grad_norm=grad_norm,
        weight_nonfinite=run.wide("weight", "nonfinite"), skipped=skipped,
    )
    if dense_grad is not None:  # a non-finite global gradient between ticks: no per-layer record says so
        between = dense_grad[~np.isfinite(dense_grad.to_numpy()) & ~dense_grad.index.isin(run.steps)]
        findings += [Finding(int(s), "", "nonfinite_grad", float(v), float("nan"), detail="global gradient norm (dense series)")
                     for s, v in between.items()]
    if dense_loss is not None:
        findings += spike_findings(dense_loss, "loss_spike", th.spike_window, th.spike_min_history, th.spike_z)
    else:
        findings += spike_findings(tick_loss, "loss_spike", th.window, th.min_history, th.spike_z)
    if dense_grad is not None:
        findings += spike_findings(dense_grad, "grad_spike", th.spike_window, th.spike_min_history, th.spike_z)
    else:
        findings += spike_findings(tick_grad, "grad_spike", th.window, th.min_history, th.spike_z)
    findings += learning_phase(grad_norm_findings(grad_norm, th), grad_norm, tick_loss, th)
    findings += dead_grad_findings(grad_norm, grad_nonfinite)
    no_update = [int(s) for s, v in skipped.items() if v > 0] if skipped is not None else []
    low_lr: list[int] = []
    if run.has("lr", "lr"):  # the largest learning rate of any param group, per tick
        lr = run.rows("lr", "lr").groupby("step")["value"].max()
        if len(lr) and np.isfinite(lr.max()) and lr.max() > 0:
            low_lr = [int(s) for s, v in lr.items() if v < th.lr_floor * lr.max()]
    ratio = run.wide("update", "ratio")
    findings += update_ratio_findings(ratio, th, no_update, run.manifest.get("parameters"), low_lr)
    findings += frozen_findings(ratio.drop(index=[s for s in no_update if s in ratio.index]), grad_norm)
    fp16 = str(run.manifest.get("precision", "")).startswith("16")
    findings += norm_input_findings(run.wide("norm_input", "rms"), run.wide("norm_input", "absmax"), th, fp16)
    findings = _fold_into_spikes(findings, grad_norm, th)
    dense_steps = sorted(set().union(*(s.index for s in dense.values()))) if dense else None
    return collapse(findings, run.steps, dense_steps, dense_gap=th.spike_min_history)


def findings_frame(findings: Iterable[Finding]) -> pd.DataFrame:
    """The findings as a table (columns: step, last_step, ticks, layer, kind, value, reference, detail)."""
    cols = ["step", "last_step", "ticks", "layer", "kind", "value", "reference", "detail"]
    return pd.DataFrame([asdict(f) for f in findings], columns=[f.name for f in fields(Finding)])[cols]


def _fmt(v: float, missing: str = "—") -> str:
    return missing if math.isnan(v) else f"{v:.4g}"


def to_markdown(findings: list[Finding], limit: int = 50) -> str:
    """A Markdown summary: one line per kind with its count, then a table of the first ``limit`` findings.

    Example:
        >>> print(to_markdown([]))
        No anomalies found.
    """
    if not findings:
        return "No anomalies found."
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    lines = [f"{len(findings)} anomal{'y' if len(findings) == 1 else 'ies'} found:", ""]
    lines += [f"- **{kind}** ({KINDS.get(kind, kind)}): {n}" for kind, n in counts.items()]
    lines += ["", "| step | layer | kind | value | reference | ticks | detail |", "|---|---|---|---|---|---|---|"]
    for f in findings[:limit]:
        steps = str(f.step) if f.last_step == f.step else f"{f.step}–{f.last_step}"
        layer = f"`{f.layer}`" if f.layer else "(run)"
        lines.append(f"| {steps} | {layer} | {f.kind} | {_fmt(f.value, 'nan')} | {_fmt(f.reference)} | {f.ticks} | {f.detail} |")
    if len(findings) > limit:
        lines.append(f"\n{len(findings) - limit} more in anomalies.csv.")
    return "\n".join(lines)
