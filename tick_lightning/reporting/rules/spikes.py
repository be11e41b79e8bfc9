"""Loss and global gradient-norm spikes (``tick_lightning.spikes``), and the fold that makes one bad batch one line."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE", "fold_into_spikes", "spike_findings"]

KINDS = {
    "loss_spike": "loss far above its trailing window (robust z)",
    "grad_spike": "global gradient norm far above its trailing window (robust z)",
}


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



def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    """On the dense per-step series when the run recorded them (a spike between ticks is found at its step),
    else on the tick records (``window`` ticks of history instead of ``spike_window`` steps)."""
    out = []
    for dense, tick, kind in ((inputs.dense_loss, inputs.tick_loss, "loss_spike"),
                              (inputs.dense_grad, inputs.tick_grad, "grad_spike")):
        if dense is not None:
            out += spike_findings(dense, kind, th.spike_window, th.spike_min_history, th.spike_z)
        else:
            out += spike_findings(tick, kind, th.window, th.min_history, th.spike_z)
    return out


def fold_into_spikes(findings: list[Finding], grad_norm: pd.DataFrame, th: Thresholds) -> list[Finding]:
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



RULE = Rule("spikes", KINDS, find, fold=lambda findings, inputs, th: fold_into_spikes(findings, inputs.grad_norm, th))
