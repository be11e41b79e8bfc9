"""The guard's interventions (``TickCallback(guard=...)``): each update it skipped and each step it clipped, with
what made it act. Not anomalies it found but what it did about them, listed beside them."""

from __future__ import annotations

import math

import numpy as np

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE", "guard_findings"]

KINDS = {
    "guard_skip": "the guard skipped the update (parameters and optimizer state left as they were)",
    "guard_clip": "the guard scaled the gradient down before the update",
}


def guard_findings(guard, manifest: dict) -> list:
    """One finding per step the guard acted on (``RunData.guard``): ``guard_skip`` with the largest judged z-score
    (NaN for a non-finite step) against the guard's own threshold, ``guard_clip`` with the factor applied (for a
    per-tensor clip the smallest, ``tensor_factor``) against 1."""
    spec = manifest.get("guard") or {}
    z_thr = float(spec.get("z") or math.nan)
    out = []
    for step, row in guard.iterrows():
        zs = {k: row.get(f"z_{k}", np.nan) for k in ("loss", "grad_norm")}
        if row.get("skipped", 0) > 0:
            if row.get("nonfinite", 0) > 0:
                out.append(Finding(int(step), "", "guard_skip", math.nan, z_thr, detail="non-finite loss or gradient"))
                continue
            loud = {k: v for k, v in zs.items() if np.isfinite(v)}
            series = max(loud, key=loud.get) if loud else "grad_norm"
            out.append(Finding(int(step), "", "guard_skip", float(loud.get(series, math.nan)), z_thr,
                               detail=f"{series} z {loud.get(series, math.nan):.3g} > {z_thr:g}"))
        elif row.get("clipped", 0) > 0:
            tensors = list(row.get("tensors") or [])
            if tensors:
                detail = f"{int(row['clipped'])} tensor(s) scaled, first `{tensors[0]}`"
                out.append(Finding(int(step), "", "guard_clip", float(row.get("tensor_factor", math.nan)), 1.0,
                                   detail=detail))
            else:
                norm, limit = row.get("grad_norm", math.nan), row.get("threshold", math.nan)
                out.append(Finding(int(step), "", "guard_clip", float(row.get("factor", math.nan)), 1.0,
                                   detail=f"global norm {norm:.3g} -> {limit:.3g} (z {zs['grad_norm']:.3g})"))
    return out


def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    if inputs.guard.empty:
        return []
    return guard_findings(inputs.guard, inputs.run.manifest)


RULE = Rule("guard", KINDS, find)
