"""The anomaly summary: pure functions from step x name tables to findings, and a Markdown rendering.

Every rule compares a value with a reference and says which: a layer's gradient norm with the median of
that layer's *own* other ticks (so a layer whose gradients are always small is not "vanishing"), an
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

__all__ = [
    "KINDS",
    "Finding",
    "Thresholds",
    "collapse",
    "find_anomalies",
    "findings_frame",
    "grad_norm_findings",
    "history_outliers",
    "learning_phase",
    "nonfinite_findings",
    "norm_input_findings",
    "to_markdown",
    "update_ratio_findings",
]

#: Finding kinds, most severe first (the order of the summary).
KINDS: dict[str, str] = {
    "nonfinite_loss": "loss is NaN or infinite",
    "nonfinite_grad": "gradient has NaN or infinite values",
    "nonfinite_weight": "weight has NaN or infinite values",
    "amp_skipped": "fp16 GradScaler skipped the optimizer step",
    "exploding_grad": "gradient norm > k x the layer's median",
    "vanishing_grad": "gradient norm < 1/k of the median of the layer's preceding ticks",
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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"Thresholds.{f.name}={value!r}: must be True or False.")
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Thresholds.{f.name}={value!r}: must be a positive finite number.")
        for name in ("grad_factor", "rms_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"Thresholds.{name}={getattr(self, name)!r}: must be > 1 (a factor away from the median).")
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


def grad_norm_findings(grad_norm: pd.DataFrame, th: Thresholds = Thresholds()) -> list[Finding]:
    """Exploding / vanishing gradients: per layer, relative to that layer's own history (see ``history_outliers``).

    An exploding gradient is judged against the ticks on both sides; a vanishing one against the *preceding*
    ticks only: early in fine-tuning many layers' gradients grow for a while (a head that starts to learn, a
    warm-up), and the larger gradients that come later do not make the earlier, ordinary ones vanishing.

    Example:
        >>> grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 1.05, 60, 90, 80, 100, 70, 85, 95, 1e-3]})
        >>> [(f.step, f.kind) for f in grad_norm_findings(grad)]  # ticks 0-4 are not "vanishing"
        [(12, 'vanishing_grad')]
    """
    up = history_outliers(grad_norm, th.grad_factor, th.window, th.min_history, th.mad_z, direction="up")
    down = history_outliers(grad_norm, th.grad_factor, th.window, th.min_history, th.mad_z, direction="down",
                            causal=True)
    return [Finding(s, n, "exploding_grad" if v > r else "vanishing_grad", v, r) for s, n, v, r in sorted(up + down)]


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
    than 2 dimensions are left out. A non-finite ratio (weight norm 0) has no meaning and is skipped.
    At ``low_lr_steps`` (learning rate under ``th.lr_floor`` of its peak) only the upper bound applies.
    """
    if ratio.empty:
        return []
    if shapes and th.ratio_matrices_only:
        ratio = ratio[[c for c in ratio.columns if c not in shapes or len(shapes[c]) >= 2]]
    r = ratio.drop(index=[s for s in no_update_steps if s in ratio.index])
    all_zero = (r.fillna(0.0) == 0.0).all(axis=1)
    r = r[~all_zero]
    v = r.to_numpy(np.float64, copy=True)
    v[~np.isfinite(v)] = np.nan
    out = []
    scheduled_low = np.isin(r.index.to_numpy(), list(low_lr_steps))[:, None]
    with np.errstate(invalid="ignore"):
        for mask, kind, ref in ((v > th.ratio_high, "update_ratio_high", th.ratio_high),
                                ((v < th.ratio_low) & ~scheduled_low, "update_ratio_low", th.ratio_low)):
            for i, j in zip(*np.nonzero(mask)):
                out.append(Finding(int(r.index[i]), str(r.columns[j]), kind, float(v[i, j]), ref))
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


def collapse(findings: Iterable[Finding], steps: Iterable[int]) -> list[Finding]:
    """Merge findings of the same (kind, layer) on consecutive ticks of ``steps`` into one, keeping the most
    extreme value (farthest from its reference in log scale), sorted by severity then step."""
    tick_index = {int(s): i for i, s in enumerate(sorted({int(s) for s in steps}))}
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.kind, f.layer), []).append(f)

    def extremeness(f: Finding) -> float:
        if not (np.isfinite(f.value) and np.isfinite(f.reference)) or f.value <= 0 or f.reference <= 0:
            return math.inf
        return abs(math.log10(f.value / f.reference))

    out = []
    for (kind, layer), group in groups.items():
        group.sort(key=lambda f: f.step)
        run = [group[0]]
        for f in group[1:] + [None]:
            if f is not None and tick_index.get(f.step, -2) == tick_index.get(run[-1].step, -10) + 1:
                run.append(f)
                continue
            worst = max(run, key=extremeness)
            out.append(Finding(run[0].step, layer, kind, worst.value, worst.reference, run[-1].step, len(run),
                               worst.detail))
            if f is not None:
                run = [f]
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(out, key=lambda f: (order.get(f.kind, len(order)), f.step, f.layer))


def find_anomalies(run, th: Thresholds = Thresholds()) -> list[Finding]:
    """Every rule over a loaded run (``tick_lightning.reporting.data.RunData``), collapsed and sorted.

    Example:
        >>> import tempfile
        >>> from tick_lightning.reporting.data import load_run
        >>> from tick_lightning.reporting.synthetic import write_synthetic_run
        >>> d = write_synthetic_run(tempfile.mkdtemp(), ticks=12, layers=4, nonfinite_step=50)
        >>> sorted({f.kind for f in find_anomalies(load_run(d))})
        ['nonfinite_grad', 'nonfinite_loss']
    """
    findings: list[Finding] = []
    skipped = run.scalar("amp", "", "skipped") if run.has("amp", "skipped") else None
    grad_norm = run.wide("grad", "norm")
    findings += nonfinite_findings(
        loss=run.scalar("loss", "", "value") if run.has("loss", "value") else None,
        loss_nonfinite=run.scalar("loss", "", "nonfinite") if run.has("loss", "nonfinite") else None,
        grad_nonfinite=run.wide("grad", "nonfinite"), grad_norm=grad_norm,
        weight_nonfinite=run.wide("weight", "nonfinite"), skipped=skipped,
    )
    loss = run.scalar("loss", "", "value") if run.has("loss", "value") else None
    findings += learning_phase(grad_norm_findings(grad_norm, th), grad_norm, loss, th)
    no_update = [int(s) for s, v in skipped.items() if v > 0] if skipped is not None else []
    low_lr: list[int] = []
    if run.has("lr", "lr"):  # the largest learning rate of any param group, per tick
        lr = run.rows("lr", "lr").groupby("step")["value"].max()
        if len(lr) and np.isfinite(lr.max()) and lr.max() > 0:
            low_lr = [int(s) for s, v in lr.items() if v < th.lr_floor * lr.max()]
    findings += update_ratio_findings(run.wide("update", "ratio"), th, no_update, run.manifest.get("parameters"),
                                      low_lr)
    fp16 = str(run.manifest.get("precision", "")).startswith("16")
    findings += norm_input_findings(run.wide("norm_input", "rms"), run.wide("norm_input", "absmax"), th, fp16)
    return collapse(findings, run.steps)


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
