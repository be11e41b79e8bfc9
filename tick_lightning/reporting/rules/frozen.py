"""Parameters never updated while others were (missing from the optimizer?)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["RULE", "frozen_findings"]

KINDS = {"frozen": "parameter not updated while others were (missing from the optimizer?)"}


def frozen_findings(ratio: pd.DataFrame, grad_norm: pd.DataFrame | None = None) -> list[Finding]:
    """Parameters whose update is exactly zero at a tick where another parameter moved, while their own
    gradient is non-zero (a zero or absent gradient is ``dead_grad``'s finding, not this one).

    Example:
        >>> r = pd.DataFrame({"a": [1e-3, 2e-3], "b": [0.0, 0.0]})
        >>> [(f.step, f.layer, f.kind) for f in frozen_findings(r)]
        [(0, 'b', 'frozen'), (1, 'b', 'frozen')]
    """
    if ratio.empty:
        return []
    v = ratio.to_numpy(np.float64)
    still = v == 0
    moved = (np.isfinite(v) & (v > 0)).any(axis=1, keepdims=True)
    if grad_norm is not None and not grad_norm.empty:
        g = grad_norm.reindex_like(ratio).to_numpy(np.float64)
        still &= ~((g == 0) | np.isnan(g))
    return [Finding(int(ratio.index[i]), str(ratio.columns[j]), "frozen", 0.0, float("nan"),
                    detail="update exactly zero with a non-zero gradient")
            for i, j in zip(*np.nonzero(still & moved))]



def find(inputs: Inputs, th: Thresholds) -> list[Finding]:
    ratio = inputs.ratio  # a skipped AMP step moved nothing: not a frozen parameter
    return frozen_findings(ratio.drop(index=[s for s in inputs.no_update if s in ratio.index]), inputs.grad_norm)


RULE = Rule("frozen", KINDS, find)
