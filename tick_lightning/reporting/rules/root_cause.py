"""Root cause from the flight recorder: one finding per event, naming the layer that deviated first.

The events of a run are the flight recorder's own (``state="flight_event"``: a loss or global
gradient-norm spike found online, a non-finite step, an exception, one layer's gradient or norm-input jump found
by its layer watch) and the run-level moves the report
finds on the dense series itself (``loss_spike``, ``grad_spike``, a non-finite loss or global gradient
norm: the same rule). Events at most ``spike_min_history`` steps apart are one event (a divergence flags
most of its steps: one line, as ``collapse`` merges them), at its first step that a flight window covers.
For each, ``tick_lightning.reporting.rootcause.root_cause`` ranks the layers.

The fold (after the spike fold) replaces the run-level findings of each analysed event (and the
per-layer ``nonfinite_grad`` findings at its steps) with **one** finding: the most severe of their kinds,
the first layer as its ``layer``, and a detail naming its start step, its lead and how many layers
deviated. An event without flight coverage, or where no layer deviated, keeps its findings unchanged. A
flight event no rule reported (an exception; a non-finite step the records missed; a layer's jump, kind
``layer_jump``, or its norm input's, ``input_jump``) becomes a finding of its own when a layer deviated; an online loss / gradient-norm spike the report's thresholds do not
confirm does not (the table in ``root_cause.csv`` still has it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tick_lightning.reporting.rootcause import TABLE_COLUMNS, dense_moves, flight_segment, root_cause
from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["CSV_COLUMNS", "MAX_EVENTS", "RULE", "Event", "analysed_events", "root_cause_markdown", "root_cause_table"]

KINDS = {"exception": "training raised; the flight recorder's window names the layer that deviated first",
         "layer_jump": "one layer's gradient norm jumped (found online by the flight recorder's layer watch) where "
                       "the loss and the global gradient norm need not move; the window names the layer",
         "input_jump": "one normalization layer's input absmax jumped (found online by the layer watch, with "
                       "flight=['input_absmax']): the norm cancels the scale, so no gradient shows it; the "
                       "window names the layer"}

#: Columns of ``root_cause.csv``: one row per (event, deviating layer), rank 1 the likely origin.
CSV_COLUMNS = ["event_step", "trigger", *TABLE_COLUMNS]
#: Events analysed per run (the earliest); a run with more is diverging, its first events say why.
MAX_EVENTS = 64
# Triggers by precedence, when several fall in one event: a NaN says more than the spike that preceded it.
_TRIGGERS = ("nonfinite", "exception", "loss", "grad_norm", "layer", "input")
# Run-level finding kinds an event replaces, most severe first.
_EVENT_KINDS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike")


@dataclass(frozen=True)
class Event:
    """One event: its analysed ``step`` (the first flight-covered step of ``steps``, every step it spans),
    its ``trigger`` and the ranked table (``root_cause``; empty: nothing deviated)."""

    step: int
    trigger: str
    steps: tuple[int, ...]
    table: pd.DataFrame


def _series(inputs: Inputs, th: Thresholds) -> tuple[dict[str, pd.Series], int, int]:
    """The run-level series and the spike window they are judged with (dense steps, else ticks)."""
    if inputs.dense:
        return {k: v for k, v in (("loss", inputs.dense_loss), ("grad_norm", inputs.dense_grad)) if v is not None}, \
            th.spike_window, th.spike_min_history
    series = {k: v for k, v in (("loss", inputs.tick_loss), ("grad_norm", inputs.tick_grad)) if v is not None}
    return series, th.window, th.min_history


def _own_finding(trigger: str) -> bool:
    """A watch's event that names its own column and is its own finding (``layer_events``): a fall, a zero, a climb, a
    trend, an update's or attention block's jump. No table of "who deviated first" for it: on a real fit such a table
    led with a key weight trending since the learning phase (steps 104 on) and gave a freeze a 25-step "lead"."""
    return trigger in ("update", "attn") or trigger.endswith(("_drop", "_zero", "_flat", "_rise", "_trend"))


def _cluster(steps: list[int], gap: int) -> list[list[int]]:
    groups: list[list[int]] = []
    for s in sorted(set(steps)):
        if groups and s - groups[-1][-1] <= gap:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def analysed_events(inputs: Inputs, th: Thresholds) -> list[Event]:
    """Every event of the run with flight coverage, analysed (cached on ``inputs``: the fold and the
    report's table share one computation)."""
    key = ("root_cause_events", th)
    if key in inputs.__dict__:
        return inputs.__dict__[key]
    flight = getattr(inputs.run, "flight", {}) or {}
    grad = flight.get("grad_norm")
    events: list[Event] = []
    if grad is not None and not grad.empty:
        gap = th.spike_min_history
        series, window, min_history = _series(inputs, th)
        triggers: dict[int, set[str]] = {}
        moves: set[int] = set()
        for name, s in series.items():
            found = dense_moves({name: s}, window=window, min_history=min_history, z=th.spike_z)
            bad = set(s.index[~np.isfinite(s.to_numpy(np.float64))].astype(int))
            moves.update(int(x) for x in found)
            for step in found:
                triggers.setdefault(int(step), set()).add("nonfinite" if int(step) in bad else name)
        table = getattr(inputs.run, "flight_events", None)
        if table is not None and not table.empty:
            for step, trigger in zip(table["step"].to_numpy(), table["trigger"].astype(str)):
                if not _own_finding(trigger):
                    triggers.setdefault(int(step), set()).add(trigger)
        order = list((inputs.run.manifest.get("flight") or {}).get("parameters") or grad.columns)
        all_moves = np.array(sorted(moves), dtype=np.int64)
        flight_steps = grad.index.to_numpy()
        previous = None
        for group in _cluster(list(triggers), gap):
            covered = [s for s in group if len(flight_segment(flight_steps, s, gap))]
            if not covered:
                previous = group[-1]
                continue
            step = covered[0]
            present = set().union(*(triggers[s] for s in group))
            trigger = min(present, key=lambda t: _TRIGGERS.index(t) if t in _TRIGGERS else len(_TRIGGERS))
            ranked = root_cause(step, grad, None, order, nonfinite=flight.get("nonfinite"),
                                inputs=flight.get("input_absmax"), moves=all_moves, window=th.spike_window,
                                min_history=th.spike_min_history, z=th.spike_z, gap=gap, after=previous)
            events.append(Event(step, trigger, tuple(group), ranked))
            previous = group[-1]
            if len(events) >= MAX_EVENTS:
                break
    inputs.__dict__[key] = events
    return events


def root_cause_table(run_or_inputs, th: Thresholds = Thresholds()) -> pd.DataFrame:
    """Every analysed event's ranked layers as one table (``CSV_COLUMNS``), for ``root_cause.csv``.

    Example:
        >>> import tempfile
        >>> from tick_lightning.reporting.data import load_run
        >>> from tick_lightning.reporting.synthetic import write_synthetic_run
        >>> d = write_synthetic_run(tempfile.mkdtemp(), ticks=20, dense=True, flight=True,
        ...                         layer_fault=("encoder.layer.0.mlp.weight", 120, 2, 1e4))
        >>> t = root_cause_table(load_run(d))
        >>> t.loc[0, "layer"], int(t.loc[0, "event_step"])
        ('encoder.layer.0.mlp.weight', 120)
    """
    inputs = run_or_inputs if isinstance(run_or_inputs, Inputs) else Inputs(run_or_inputs)
    frames = [e.table.assign(event_step=e.step, trigger=e.trigger) for e in analysed_events(inputs, th)
              if not e.table.empty]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in CSV_COLUMNS})
    return pd.concat(frames, ignore_index=True)[CSV_COLUMNS]


def root_cause_markdown(table: pd.DataFrame, per_event: int = 5) -> str:
    """``anomalies.md``'s root-cause section: per event, its first ``per_event`` ranked layers."""
    if table.empty:
        return "## Root cause (flight recorder)\n\nNo event with flight-recorder coverage had a deviating layer."
    lines = ["## Root cause (flight recorder)", "",
             "| event step | trigger | scope | rank | layer | start step | z | lead |", "|---|---|---|---|---|---|---|---|"]
    for _, group in table.groupby("event_step", sort=True):
        lines += [f"| {int(r.event_step)} | {r.trigger} | {r.scope} ({float(r.share):.0%}) | {int(r.rank)} | "
                  f"`{r.layer}`{' input' if r.series == 'input_absmax' else ''} | {int(r.start_step)} | "
                  f"{float(r.z):.3g} | {int(r.lead)}{' (aftermath)' if r.aftermath else ''} |"
                  for r in group.head(per_event).itertuples(index=False)]
    return "\n".join(lines + ["", "Every row is in root_cause.csv."])


def _detail(table: pd.DataFrame, trigger: str) -> str:
    first = table.iloc[0]
    if first.scope == "run-wide":
        together = int((table.start_step == first.start_step).sum())
        return (f"run-wide: {together} layers ({first.share:.0%} of those recorded) deviated together at step "
                f"{int(first.start_step)}, no single origin (a learning-rate spike or a bad batch moves them all); "
                f"{len(table)} layer{'s' if len(table) != 1 else ''} deviated (root_cause.csv)")
    lead = int(first.lead)
    # an exception need not follow any move of the loss: then "moved" is the event step itself
    what_moved = "the event" if trigger in ("exception", "layer", "input") else "the loss / global gradient norm moved"
    when = (f"{lead} steps before {what_moved} (step {int(first.moved_step)})" if lead > 0
            else f"at the step {what_moved}" if lead == 0
            else f"{-lead} steps after {what_moved} (step {int(first.moved_step)})")
    if math.isinf(first.z):
        tied = int(((table.start_step == first.start_step) & np.isinf(table.z)).sum())
        what = (f"root cause: {first.layer} non-finite first (nearest the output of the {tied} parameters "
                f"non-finite at step {int(first.start_step)}), {when}")
    else:
        layer = f"the input of {first.layer}" if first.series == "input_absmax" else first.layer
        what = (f"root cause: {layer} deviated first, from step {int(first.start_step)} "
                f"(robust z {first.z:.3g}), {when}")
    return f"{what}; {len(table)} layer{'s' if len(table) != 1 else ''} deviated (root_cause.csv)"


def _extremeness(f: Finding) -> float:
    if not (np.isfinite(f.value) and np.isfinite(f.reference)) or f.value <= 0 or f.reference <= 0:
        return math.inf
    return abs(math.log10(f.value / f.reference))


def _is_event_finding(f: Finding, steps: range) -> bool:
    if f.step not in steps:
        return False
    return (f.layer == "" and f.kind in _EVENT_KINDS) or f.kind == "nonfinite_grad"


def fold(findings: list[Finding], inputs: Inputs, th: Thresholds) -> list[Finding]:
    """One finding per analysed event, naming its first layer (see the module docstring)."""
    events = [e for e in analysed_events(inputs, th) if not e.table.empty]
    if not events:
        return findings
    out = list(findings)
    for event in events:
        span = range(event.steps[0], event.steps[-1] + 1)
        mine = [f for f in out if _is_event_finding(f, span)]
        first = "" if event.table.iloc[0].scope == "run-wide" else str(event.table.iloc[0].layer)
        detail = _detail(event.table, event.trigger)
        if mine:
            kind = min((f.kind for f in mine), key=_EVENT_KINDS.index)
            base = max((f for f in mine if f.kind == kind), key=_extremeness)  # as collapse keeps the worst
            merged = Finding(min(f.step for f in mine), first, kind, base.value, base.reference,
                             max(f.last_step for f in mine), 1, "; ".join(d for d in (detail, base.detail) if d))
            gone = {id(f) for f in mine}
            out = [f for f in out if id(f) not in gone] + [merged]
        elif event.trigger in ("exception", "nonfinite", "layer", "input") and not any(f.step in span for f in out):
            kind = {"exception": "exception", "nonfinite": "nonfinite_grad"}.get(event.trigger) or (
                "input_jump" if event.table.iloc[0].series == "input_absmax" else "layer_jump")  # what it names
            out.append(Finding(event.step, first, kind, float(event.table.iloc[0].z), float("nan"), detail=detail))
    return out


RULE = Rule("root_cause", KINDS, lambda inputs, th: [], fold=fold)
