"""Gradients exactly zero, or absent, while other layers' are not."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE", "dead_grad_findings"]

KINDS = {"dead_grad": "gradient exactly zero (or absent) while other layers' are not"}


def dead_grad_findings(grad_norm: pd.DataFrame, grad_nonfinite: pd.DataFrame | None = None) -> list[Finding]:
    """Layers whose gradient is exactly zero, or absent (norm and non-finite count both NaN: ``p.grad`` was
    None), at a tick where some other layer's gradient is finite and non-zero.

    Example:
        >>> g = pd.DataFrame({"a": [1.0, 0.9], "b": [0.0, 0.0]})
        >>> [(f.step, f.layer) for f in dead_grad_findings(g)]
        [(0, 'b'), (1, 'b')]
    """
    if grad_norm.empty:
        return []
    v = grad_norm.to_numpy(np.float64)
    absent = np.zeros_like(v, dtype=bool)  # without the counts a NaN norm could be a NaN gradient
    if grad_nonfinite is not None and not grad_nonfinite.empty:
        absent = np.isnan(v) & np.isnan(grad_nonfinite.reindex_like(grad_norm).to_numpy(np.float64))
    dead = (v == 0) | absent
    alive = (np.isfinite(v) & (v > 0)).any(axis=1, keepdims=True)
    return [Finding(int(grad_norm.index[i]), str(grad_norm.columns[j]), "dead_grad", float(v[i, j]), float("nan"),
                    detail="no gradient (unused in the forward?)" if absent[i, j] else "gradient exactly zero")
            for i, j in zip(*np.nonzero(dead & alive))]



def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    return dead_grad_findings(inputs.grad_norm, inputs.grad_nonfinite)


RULE = Rule("dead_grad", KINDS, find)
