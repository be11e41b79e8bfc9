"""The anomaly summary: pure functions from step x name tables to findings, and a Markdown rendering.

Every rule compares a value with a reference and says which: the run's loss and global gradient norm
with their trailing window (``tick_lightning.spikes``: on the dense per-step series when recorded, so a
spike between ticks is found at its step), a layer's gradient norm with the median of that layer's *own*
other ticks after removing what every layer did at that tick (so a layer whose gradients are always small
is not "vanishing", and gradients shrinking together as the loss converges are not either), an
update/weight ratio with a fixed band around the usual 1e-3, a normalization input with its own history
and with absolute limits. Findings on consecutive ticks of the same layer and kind are merged into one row
(``step`` .. ``last_step``) so a layer that is off for 10,000 ticks is one line, not 10,000.

This module is the orchestrator: the rule families live one per module in
``tick_lightning.reporting.rules`` (registry ``RULES``); ``find_anomalies`` runs each family's ``find``,
then their ``fold``s, then ``run_wide`` (many layers at one step: one finding), then ``collapse``. Every rule's
function is re-exported here.

Example:
    >>> import numpy as np, pandas as pd
    >>> grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 1e3, 1.05, 0.95]}, index=range(0, 70, 10))
    >>> [(f.step, f.layer, f.kind) for f in grad_norm_findings(grad)]
    [(40, 'w', 'exploding_grad')]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, fields

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules import KINDS, RULES
from tick_lightning.reporting.rules.base import Finding, Inputs, Thresholds, history_outliers
from tick_lightning.reporting.rules.dead_grad import dead_grad_findings
from tick_lightning.reporting.rules.frozen import frozen_findings
from tick_lightning.reporting.rules.grad_norm import common_mode, grad_norm_findings, learning_phase
from tick_lightning.reporting.rules.nonfinite import nonfinite_findings
from tick_lightning.reporting.rules.norm_input import norm_input_findings
from tick_lightning.reporting.rules.spikes import spike_findings
from tick_lightning.reporting.rules.update_ratio import update_ratio_findings

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
    "run_wide",
    "spike_findings",
    "to_markdown",
    "update_ratio_findings",
]


#: Run-level kinds that the dense per-step series can report at any step (collapsed over those steps).
_DENSE_KINDS = frozenset({"loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad", "guard_skip",
                          "guard_clip"})


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
            worst = max(run, key=_extremeness)
            last = max(run[-1].step, max(g.last_step for g in run))  # a rule may report a span already
            out.append(Finding(run[0].step, layer, kind, worst.value, worst.reference, last, len(run),
                               worst.detail))
            if f is not None:
                run = [f]
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(out, key=lambda f: (order.get(f.kind, len(order)), f.step, f.layer))



#: Rule families whose per-layer findings stand alone however many share a step: an origin among others
#: (``nonfinite``), or grouped by their own rule (``layer_events``, ``root_cause``).
_OWN_GROUPING = ("nonfinite", "layer_events", "root_cause")


def _extremeness(f: Finding) -> float:
    if not (np.isfinite(f.value) and np.isfinite(f.reference)) or f.value <= 0 or f.reference <= 0:
        return math.inf
    return abs(math.log10(f.value / f.reference))


def run_wide(findings: Iterable[Finding], max_layers: int = 5) -> list[Finding]:
    """More than ``max_layers`` layers with the same per-layer finding at one step are one run-wide finding (layer
    ``""``, the most extreme layer's value, a detail that says so): after a learning-rate spike the tick rules
    flagged 20-50 layers each at one tick (109 of the 117 findings around four LR spikes of
    benchmarks/flight_root_cause.py), one fact about the run said layer by layer. Families in ``_OWN_GROUPING``
    are left as they are.

    Example:
        >>> many = [Finding(100, f"l{i}", "exploding_grad", 10.0 * (i + 1), 1.0) for i in range(8)]
        >>> [(f.step, f.layer, f.kind, f.value) for f in run_wide(many)]
        [(100, '', 'exploding_grad', 80.0)]
    """
    own = {kind for rule in RULES if rule.name in _OWN_GROUPING for kind in rule.kinds}
    out, groups = [], {}
    for f in findings:
        if f.layer and f.kind not in own:
            groups.setdefault((f.kind, f.step), []).append(f)
        else:
            out.append(f)
    for (kind, step), group in groups.items():
        if len(group) <= max_layers:
            out += group
            continue
        worst = max(group, key=_extremeness)
        out.append(Finding(step, "", kind, worst.value, worst.reference, max(f.last_step for f in group), 1,
                           f"run-wide: {len(group)} layers at once (most extreme: {worst.layer}"
                           f"{'; ' + worst.detail if worst.detail else ''}): a fault of the whole run, "
                           f"no single layer's"))
    return out


def find_anomalies(run, th: Thresholds = Thresholds(), *, inputs: Inputs | None = None) -> list[Finding]:
    """Every rule family of ``RULES`` over a loaded run (``tick_lightning.reporting.data.RunData``), folded,
    collapsed and sorted.

    The loss and global gradient norm come from the dense per-step series when the run has them (a spike
    or a NaN between ticks is found at its step), else from the ticks. ``inputs``: the run's ``Inputs``
    when the caller reuses its tables afterwards (the report's root-cause table).

    Example:
        >>> import tempfile
        >>> from tick_lightning.reporting.data import load_run
        >>> from tick_lightning.reporting.synthetic import write_synthetic_run
        >>> d = write_synthetic_run(tempfile.mkdtemp(), ticks=12, layers=4, nonfinite_step=50)
        >>> sorted({f.kind for f in find_anomalies(load_run(d))})
        ['nonfinite_grad', 'nonfinite_loss']
    """
    inputs = Inputs(run) if inputs is None else inputs
    findings: list[Finding] = []
    for rule in RULES:
        findings += rule.find(inputs, th)
    for rule in RULES:
        if rule.fold is not None:
            findings = rule.fold(findings, inputs, th)
    findings = run_wide(findings, th.max_layers)
    return collapse(findings, run.steps, inputs.dense_steps, dense_gap=th.spike_min_history)


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
