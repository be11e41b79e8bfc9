"""The anomaly rule families, one module each, and their registry.

``RULES`` is the ordered registry ``tick_lightning.reporting.anomalies.find_anomalies`` iterates: every
family's ``find``, then every ``fold`` in this order, then one ``collapse``. The order is also the
severity order of the summary (``KINDS``, built from the families' kinds). Adding a family is one module
exporting ``RULE = Rule(...)`` (see ``base.Rule``) and one line here.
"""

from __future__ import annotations

from tick_lightning.reporting.rules import (
    dead_grad,
    frozen,
    grad_norm,
    guard,
    layer_events,
    nonfinite,
    norm_input,
    root_cause,
    spikes,
    update_ratio,
)
from tick_lightning.reporting.rules.base import Finding, Inputs, Rule, Thresholds

__all__ = ["KINDS", "RULES", "Finding", "Inputs", "Rule", "Thresholds"]

#: The rule families, most severe kinds first.
RULES: tuple[Rule, ...] = (
    nonfinite.RULE,
    spikes.RULE,
    guard.RULE,  # what the guard did about them
    grad_norm.RULE,
    dead_grad.RULE,
    frozen.RULE,
    norm_input.RULE,
    update_ratio.RULE,
    layer_events.RULE,  # one layer's fall, zero or steady rise, found online
    root_cause.RULE,  # folds after spikes: it replaces the folded run-level finding of each event
)

#: Finding kinds, most severe first (the order of the summary).
KINDS: dict[str, str] = {kind: text for rule in RULES for kind, text in rule.kinds.items()}
