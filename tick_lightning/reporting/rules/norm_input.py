"""Normalization-layer inputs: dead, saturating (crest factor, fp16 range) and exploding."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds, history_outliers

__all__ = ["RULE", "norm_input_findings"]

KINDS = {
    "exploding_norm_input": "norm-layer input RMS > k x its median",
    "saturating_norm_input": "norm-layer input absmax huge relative to its RMS (or near the fp16 limit)",
    "dead_norm_input": "norm-layer input RMS ~ 0",
}
_FP16_MAX = 65504.0


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



def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    run = inputs.run
    fp16 = str(run.manifest.get("precision", "")).startswith("16")
    return norm_input_findings(run.wide("norm_input", "rms"), run.wide("norm_input", "absmax"), th, fp16)


RULE = Rule("norm_input", KINDS, find)
