"""One layer's own events that are not a jump up, found online by the flight recorder's layer watch
(``triggers.LayerWatch``): its gradient (or a norm layer's input) falling by decades below its usual level, becoming
exactly zero (the layer stopped learning), or rising steadily against its own history (an early warning, reported
with how many steps before the loss or the global gradient norm moved)."""

from __future__ import annotations

import math

import numpy as np

from tick_lightning.reporting.rootcause import dense_moves
from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE"]

KINDS = {
    "layer_zero": "a layer's gradient became exactly zero: it stopped learning",
    "layer_drop": "a layer's gradient (or a norm layer's input) fell by decades below its usual level",
    "layer_trend": "a layer's gradient (or a norm layer's input) rose steadily against its own history",
}
_SUFFIX = {"_zero": "layer_zero", "_drop": "layer_drop", "_trend": "layer_trend"}


def _name(run, trigger: str, column: int) -> str:
    flight = run.manifest.get("flight") or {}
    names = list(flight.get("norm_layers" if trigger.startswith("input") else "parameters") or [])
    return names[column] if 0 <= column < len(names) else f"#{column}"


def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    events = getattr(inputs.run, "flight_events", None)
    if events is None or events.empty or "column" not in events:
        return []
    moves = None
    out = []
    for step, trigger, column, z in zip(events.step, events.trigger.astype(str), events.column, events.z):
        kind = next((k for suffix, k in _SUFFIX.items() if trigger.endswith(suffix)), None)
        if kind is None or column < 0:
            continue
        layer = _name(inputs.run, trigger, int(column))
        what = "its input absmax" if trigger.startswith("input") else "its gradient norm"
        if kind == "layer_zero":
            detail = f"{what} is exactly 0 from step {int(step)} on: the layer stopped learning"
        elif kind == "layer_drop":
            detail = f"{what} fell by decades below its usual level (robust z {z:.3g} of its step-to-step changes)"
        else:
            if moves is None:
                moves = dense_moves(inputs.dense or {}, window=th.spike_window, min_history=th.spike_min_history,
                                    z=th.spike_z)
            later = moves[moves >= step]
            lead = (f"{int(later[0] - step)} steps before the loss / global gradient norm moved (step {int(later[0])})"
                    if len(later) else "the loss / global gradient norm did not move after it")
            detail = f"{what} rose steadily (robust z {z:.3g} of its slope against its own history), {lead}"
        out.append(Finding(int(step), layer, kind, float(z), math.nan if not np.isfinite(z) else float(th.spike_z),
                           detail=detail))
    return out


RULE = Rule("layer_events", KINDS, find)
