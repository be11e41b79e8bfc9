"""One layer's own events that are not a gradient's jump up, found online by the flight recorder's layer watch
(``triggers.LayerWatch``): its gradient (or a norm layer's input) falling by decades below its usual level,
becoming exactly zero (the layer stopped learning), climbing a decade above its recent past and staying there (a
drift: reported with how many steps before the loss or the global gradient norm moved), rising steadily against
its own history (the opt-in trend watch); its update jumping by decades (``flight=["update_norm"]``: a weight
changed outside the optimizer, or by far more than the optimizer's usual step); an attention block's logit scale
jumping or climbing, and the output head's logit rms (``flight=["attn_logit"]``, a default: the early warning).
A watch's event on 3 or more columns at one step is one run-wide finding naming no layer."""

from __future__ import annotations

import math

import numpy as np

from tick_lightning.records import flight_columns
from tick_lightning.reporting.rootcause import dense_moves
from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE"]

KINDS = {
    "layer_zero": "a layer's gradient became exactly zero: it stopped learning",
    "layer_flat": "a layer's gradient norm stopped changing, bit for bit, step after step: a stale gradient",
    "layer_drop": "a layer's gradient (or a norm layer's input) fell by decades below its usual level",
    "layer_trend": "a layer's gradient (or a norm layer's input) rose steadily against its own history",
    "layer_rise": "a layer's gradient (or a norm layer's input) climbed a decade above its recent past "
                  "and stayed there: a drift no single step shows",
    "update_jump": "a layer's update jumped by decades: its weight changed far more than the optimizer's usual step",
    "attn_rise": "an attention block's logit scale climbed a decade above its recent past and stayed there: the early "
                 "warning of attention-logit growth (flight=['attn_logit'])",
    "attn_jump": "an attention block's logit scale jumped by decades in one step (flight=['attn_logit'])",
    "logit_rise": "the output head's logit rms climbed a decade above its recent past and stayed there: the early "
                  "warning of output-logit growth",
    "logit_jump": "the output head's logit rms jumped by decades in one step",
}
#: a jump (a trigger with no suffix) of a series that is not a gradient's; a gradient's is the root-cause rule's
_JUMPS = {"update": "update_jump", "attn": "attn_jump"}
_SUFFIX = {"_zero": "layer_zero", "_flat": "layer_flat", "_drop": "layer_drop", "_trend": "layer_trend", "_rise": "layer_rise"}
#: the kinds a watch may report run-wide (column -1), and what the layers did
_RUN_WIDE = {"layer_drop": "fell by decades and stayed down", "layer_zero": "became exactly zero",
             "layer_flat": "stopped changing", "update_jump": "jumped by decades",
             "attn_jump": "jumped by decades", "attn_rise": "climbed a decade and stayed there"}
_WHAT = {"input": "its input absmax", "update": "its update norm", "attn": "its attention-logit scale"}
#: the attention watch's column that is the output head's (manifest ``output_logits``): its own kinds
_OUTPUT = {"attn_rise": "logit_rise", "attn_jump": "logit_jump"}


def _name(run, trigger: str, column: int) -> str:
    names = flight_columns(run.manifest.get("flight") or {}, trigger)
    return names[column] if 0 <= column < len(names) else f"#{column}"


def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    events = getattr(inputs.run, "flight_events", None)
    if events is None or events.empty or "column" not in events:
        return []
    moves = None
    out = []
    for step, trigger, column, z in zip(events.step, events.trigger.astype(str), events.column, events.z):
        kind = "attn_rise" if trigger == "attn_rise" else next(
            (k for suffix, k in _SUFFIX.items() if trigger.endswith(suffix)), _JUMPS.get(trigger))
        if kind is None or (column < 0 and kind not in _RUN_WIDE):
            continue
        if column < 0:  # the watch's run-wide event: many layers at one step (an LR spike), one finding, no layer
            series = _WHAT.get(trigger.split("_")[0], "its gradient norm").removeprefix("its ")
            out.append(Finding(int(step), "", kind, float(z), float(th.spike_z), detail=(
                f"run-wide: the {series}s of many layers (3 or more) {_RUN_WIDE[kind]} together at step {int(step)}"
                f"{f' (robust z {z:.3g})' if np.isfinite(z) else ''}: a fault of the whole run "
                f"(a learning-rate spike, a bad batch, a saturated loss), no single "
                f"layer's")))
            continue
        layer = _name(inputs.run, trigger, int(column))
        what = _WHAT.get(trigger.split("_")[0], "its gradient norm")
        if kind in _OUTPUT and layer in ((inputs.run.manifest.get("flight") or {}).get("output_logits") or ()):
            kind, what = _OUTPUT[kind], "its output-logit rms"
        if kind == "update_jump":
            detail = (f"{what} jumped by decades (robust z {z:.3g} of its step-to-step changes): the weight changed far "
                      f"more than the optimizer's usual step (a write outside the optimizer, or a step that exploded)")
        elif kind in ("attn_jump", "logit_jump"):
            detail = f"{what} jumped by decades in one step (robust z {z:.3g} of its step-to-step changes)"
        elif kind == "layer_zero":
            detail = f"{what} is exactly 0 from step {int(step)} on: the layer stopped learning"
        elif kind == "layer_flat":
            detail = (f"{what} is the same, bit for bit, at every step from step {int(step)} on: a stale gradient (the "
                      f"same tensor each step: a reused buffer, a cached input), not one from each new batch")
        elif kind == "layer_drop":
            detail = f"{what} fell by decades below its usual level (robust z {z:.3g} of its step-to-step changes)"
        else:  # a drift (rise) or a trend: an early warning, with its lead
            if moves is None:
                moves = dense_moves(inputs.dense or {}, window=th.spike_window, min_history=th.spike_min_history,
                                    z=th.spike_z)
            later = moves[moves >= step]
            ahead = int(later[0] - step) if len(later) else 0
            lead = (f"{ahead} step{'' if ahead == 1 else 's'} before the loss / global gradient norm moved "
                    f"(step {int(later[0])})"
                    if len(later) else "the loss / global gradient norm did not move after it")
            how = ("climbed a decade above its recent past and stayed there" if kind in ("layer_rise", "attn_rise", "logit_rise")
                   else f"rose steadily (robust z {z:.3g} of its slope against its own history)")
            detail = f"{what} {how}, {lead}"
        out.append(Finding(int(step), layer, kind, float(z), math.nan if not np.isfinite(z) else float(th.spike_z),
                           detail=detail))
    return out


RULE = Rule("layer_events", KINDS, find)
