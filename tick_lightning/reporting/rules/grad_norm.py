"""Exploding and vanishing gradients: each layer against its own history, after the tick's common mode."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import (
    Finding,
    Inputs,
    Rule,
    Thresholds,
    history_outliers,
    log10_values,
)

__all__ = ["RULE", "common_mode", "grad_norm_findings", "learning_phase"]

KINDS = {
    "exploding_grad": "gradient norm > k x the layer's median (beyond what every layer did at that tick)",
    "vanishing_grad": "gradient norm < 1/k of the median of the layer's preceding ticks (beyond the model-wide trend)",
}


def common_mode(grad_norm: pd.DataFrame, min_layers: int = 4) -> pd.Series:
    """Per tick, the log10 factor every layer shares: the median over layers of each layer's log10 deviation
    from its own median over the run (0 with fewer than ``min_layers`` finite, non-zero layers at a tick).

    When the loss converges every layer's gradient shrinks with it; when a bad batch hits, every layer's
    gradient jumps. Neither is a property of one layer, and the median ignores the one layer that does
    blow up or die.

    Example:
        >>> g = pd.DataFrame({c: [1.0, 0.1, 0.01] for c in "abcd"})
        >>> common_mode(g).round(6).tolist()
        [1.0, 0.0, -1.0]
    """
    logv = log10_values(grad_norm.where(grad_norm > 0))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns / rows: no reference, no factor
        dev = logv - np.nanmedian(logv, axis=0, keepdims=True)
        common = np.nanmedian(dev, axis=1)
    enough = np.isfinite(dev).sum(axis=1) >= min_layers
    return pd.Series(np.where(enough & np.isfinite(common), common, 0.0), index=grad_norm.index)



def grad_norm_findings(grad_norm: pd.DataFrame, th: Thresholds = Thresholds()) -> list[Finding]:
    """Exploding / vanishing gradients: per layer, relative to that layer's own history (see ``history_outliers``),
    after dividing out the tick's common mode (``common_mode``, with ``th.common_mode_layers`` layers or more).

    An exploding gradient is judged against the ticks on both sides; a vanishing one against the *preceding*
    ticks only: early in fine-tuning many layers' gradients grow for a while (a head that starts to learn, a
    warm-up), and the larger gradients that come later do not make the earlier, ordinary ones vanishing.
    A finding must hold in the layer's own units too, not only relative to the common mode: when most
    layers' gradients rise k-fold as the model starts to learn, a head whose gradient merely stays where it
    was has not vanished (and when they all fall, one that stays has not exploded).
    Exactly-zero gradients are left to ``dead_grad_findings``, gradients at rounding residue of the tick's
    total (``th.grad_residue``) to nobody; ``value`` and ``reference`` are in the layer's own units (the
    reference scaled by the common mode of the finding's tick).

    Example:
        >>> grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 1.05, 60, 90, 80, 100, 70, 85, 95, 1e-3]})
        >>> [(f.step, f.kind) for f in grad_norm_findings(grad)]  # ticks 0-4 are not "vanishing"
        [(12, 'vanishing_grad')]
    """
    nonzero = grad_norm.where(grad_norm != 0)
    common = common_mode(nonzero, th.common_mode_layers)
    factor = 10.0 ** common
    relative = nonzero.div(factor, axis=0)
    def outliers(frame: pd.DataFrame) -> list:
        up = history_outliers(frame, th.grad_factor, th.window, th.min_history, th.mad_z, direction="up")
        down = history_outliers(frame, th.grad_factor, th.window, th.min_history, th.mad_z, direction="down",
                                causal=True)
        return up + down

    absolute = {(s, n) for s, n, *_ in outliers(nonzero)}
    total = np.sqrt(np.square(nonzero).sum(axis=1, min_count=1))  # the recorded layers' norm, per tick
    out = []
    for s, n, v, r in sorted(f for f in outliers(relative) if (f[0], f[1]) in absolute):
        f = float(factor.loc[s])
        if max(v, r) * f < th.grad_residue * float(total.loc[s]):  # rounding residue (Thresholds.grad_residue)
            continue
        out.append(Finding(s, n, "exploding_grad" if v > r else "vanishing_grad", v * f, r * f,
                           detail=f"all layers x{f:.3g} at this tick" if abs(common.loc[s]) > 0.5 else ""))
    return out



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



def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    return learning_phase(grad_norm_findings(inputs.grad_norm, th), inputs.grad_norm, inputs.tick_loss, th)


RULE = Rule("grad_norm", KINDS, find)
