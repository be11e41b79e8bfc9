"""benchmarks/anomaly_suite.py on CI: one seed of every case, at target, and able to tell a blind detector."""

from __future__ import annotations

import pytest
from tiny import load_benchmark

from tick_lightning.reporting.anomalies import Finding, Thresholds

suite = load_benchmark("anomaly_suite")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return tmp_path_factory.mktemp("suite")


def test_every_planted_anomaly_found_and_healthy_runs_quiet(written):
    results = suite.run_suite(written, seeds=[0])
    missed = [(r.case.name, sorted(lab.kinds)) for r in results for lab, ok in zip(r.case.labels, r.found) if not ok]
    assert missed == []
    noisy = {r.case.name: r.findings for r in results if r.case.healthy and len(r.findings) > 1}
    assert noisy == {}
    s = suite.scores(results)
    assert s["recall"] == 1.0 and s["precision"] >= 0.9, s
    assert s["planted"] == sum(len(c.labels) for c in suite.CASES) and s["healthy_runs"] >= 5


def test_the_suite_measures_something(written):
    # a detector blind to spikes and to per-layer gradients misses exactly those planted cases
    blind = Thresholds(spike_z=1e9, grad_factor=1e9)
    results = suite.run_suite(written, seeds=[0], thresholds=blind)
    missed = {r.case.name for r in results for ok in r.found if not ok}
    assert {"loss spike between ticks", "loss spike at a tick", "one layer's gradient blown up at one tick"} <= missed
    assert suite.scores(results)["recall"] < 1.0


def test_matching_rule():
    lab = suite.label("dead_grad frozen", "w", 10, 30)
    assert lab.matches(Finding(0, "w", "dead_grad", 0.0, 0.0, last_step=10))  # overlapping range
    assert not lab.matches(Finding(40, "w", "dead_grad", 0.0, 0.0))  # after the range
    assert not lab.matches(Finding(20, "v", "frozen", 0.0, 0.0))  # another layer
    assert suite.label("loss_spike", None, 5).matches(Finding(5, "anything", "loss_spike", 1.0, 1.0))
