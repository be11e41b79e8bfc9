"""Non-finite loss, gradients and weights, and optimizer steps the fp16 GradScaler skipped."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE", "nonfinite_findings"]

KINDS = {
    "nonfinite_loss": "loss is NaN or infinite",
    "nonfinite_grad": "gradient has NaN or infinite values",
    "nonfinite_weight": "weight has NaN or infinite values",
    "amp_skipped": "fp16 GradScaler skipped the optimizer step",
}


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



def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    """The tick records' non-finite values (the loss also from the dense series), plus a non-finite global
    gradient norm of the dense series at a step between ticks (no per-layer record says so)."""
    run = inputs.run
    out = nonfinite_findings(
        loss=inputs.loss_all,
        loss_nonfinite=run.scalar("loss", "", "nonfinite") if run.has("loss", "nonfinite") else None,
        grad_nonfinite=inputs.grad_nonfinite, grad_norm=inputs.grad_norm,
        weight_nonfinite=run.wide("weight", "nonfinite"), skipped=inputs.skipped,
    )
    dense_grad = inputs.dense_grad
    if dense_grad is not None:
        between = dense_grad[~np.isfinite(dense_grad.to_numpy()) & ~dense_grad.index.isin(run.steps)]
        out += [Finding(int(s), "", "nonfinite_grad", float(v), float("nan"), detail="global gradient norm (dense series)")
                for s, v in between.items()]
    return out


RULE = Rule("nonfinite", KINDS, find)
