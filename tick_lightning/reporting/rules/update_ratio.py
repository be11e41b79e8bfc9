"""Update/weight ratios outside a fixed band around the usual 1e-3."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE", "update_ratio_findings"]

KINDS = {
    "update_ratio_high": "update/weight ratio above the band",
    "update_ratio_low": "update/weight ratio below the band",
}


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



def _low_lr_steps(run, th: Thresholds) -> list[int]:
    """Ticks whose largest learning rate (over param groups) is under ``th.lr_floor`` of the run's peak."""
    if not run.has("lr", "lr"):
        return []
    lr = run.rows("lr", "lr").groupby("step")["value"].max()
    if not (len(lr) and np.isfinite(lr.max()) and lr.max() > 0):
        return []
    return [int(s) for s, v in lr.items() if v < th.lr_floor * lr.max()]


def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    run = inputs.run
    return update_ratio_findings(inputs.ratio, th, inputs.no_update, run.manifest.get("parameters"),
                                 _low_lr_steps(run, th))


RULE = Rule("update_ratio", KINDS, find)
