"""The anomaly summary on the cases a person relies on: planted problems found at their step and layer,
healthy runs (converging, Adam's first step) left quiet. Synthetic runs in the exact record schema."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tick_lightning.reporting import find_anomalies, load_run
from tick_lightning.reporting.anomalies import Thresholds, grad_norm_findings
from tick_lightning.reporting.synthetic import synthetic_parameter_names, write_synthetic_run

NAMES = synthetic_parameter_names(8)


def kinds_at(findings):
    return {(f.kind, f.layer, f.step) for f in findings}


def test_one_tick_loss_spike_is_reported(tmp_path):
    # 1000x loss at step 40; every layer's gradient 10-1400x its usual size there; noisy real-run gradients
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, layers=8, loss_spike=(40, 1e3), grad_noise=0.3))
    found = find_anomalies(run)
    assert ("loss_spike", "", 40) in kinds_at(found)
    assert all(f.step == 40 for f in found), found  # one event, reported once: no per-layer echo elsewhere
    spike = next(f for f in found if f.kind == "loss_spike")
    assert "8 layers" in spike.detail  # the gradients' jump is summarised in the loss spike's line


def test_loss_spike_between_ticks_needs_and_uses_the_dense_series(tmp_path):
    kw = dict(ticks=20, layers=8, loss_spike=(45, 1e3))
    blind = find_anomalies(load_run(write_synthetic_run(tmp_path / "ticks-only", **kw)))
    assert blind == []  # the ticks never saw step 45
    run = load_run(write_synthetic_run(tmp_path / "dense", dense=True, **kw))
    assert sorted(run.dense) == ["grad_norm", "loss", "update_norm"] and len(run.dense["loss"]) == 191
    assert run.steps.tolist() == list(range(0, 200, 10))  # dense steps are not ticks
    found = find_anomalies(run)
    assert kinds_at(found) == {("loss_spike", "", 45)}  # one event, one line: the gradient's jump in its detail
    assert "global gradient norm x" in found[0].detail


def test_nonfinite_loss_between_ticks(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, layers=8, dense=True, nonfinite_step=73))
    found = find_anomalies(run)
    assert ("nonfinite_loss", "", 73) in kinds_at(found)
    assert all(f.step == 73 for f in found), found


def test_converging_run_has_no_vanishing_flood(tmp_path):
    # loss 0.69 -> 0.01 and every gradient shrinking ~70x with it: healthy
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=100, layers=16, converge=True, grad_noise=0.3,
                                       dense=True))
    assert find_anomalies(run) == []
    assert find_anomalies(run, Thresholds(common_mode_layers=10**6))  # without the common mode: flagged


def test_adam_first_step_is_not_update_ratio_high(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, every=1, layers=8, adam_start=True))
    first = run.wide("update", "ratio").loc[0]
    assert (first > 0.07).all() and (first > 0.1).any()  # ~0.1 everywhere: above the band's 0.1
    assert find_anomalies(run) == []


def test_one_layer_blown_up_dead_and_frozen_layers(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=30, layers=8, spike=(100, NAMES[2], 1e3),
                                       dead_layer=NAMES[4], frozen_layer=NAMES[6], grad_noise=0.3))
    found = find_anomalies(run)
    got = {(f.kind, f.layer): f for f in found}
    assert got[("exploding_grad", NAMES[2])].step == 100
    dead = got[("dead_grad", NAMES[4])]
    assert (dead.step, dead.last_step) == (0, 290)  # one line for the whole run
    frozen = got[("frozen", NAMES[6])]
    assert (frozen.step, frozen.last_step) == (0, 290)
    assert len(found) == 3, found


def test_divergence_and_norm_outlier(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=30, layers=16, diverge_step=150,
                                       norm_outlier=(60, "encoder.layer.1.output.LayerNorm", 1e4)))
    found = find_anomalies(run)
    assert ("saturating_norm_input", "encoder.layer.1.output.LayerNorm", 60) in kinds_at(found)
    high = [f for f in found if f.kind == "update_ratio_high"]
    assert high and all(f.step == 150 and f.last_step == 290 for f in high)
    assert len(high) == 1 and high[0].layer == "" and "layers" in high[0].detail  # model-wide: one line


def test_common_mode_leaves_single_layer_tables_alone():
    # with fewer layers than Thresholds.common_mode_layers the raw history rule applies
    grad = pd.DataFrame({"w": [1.0, 1.1, 0.9, 1.0, 1e3, 1.05, 0.95]}, index=range(0, 70, 10))
    assert [(f.step, f.kind) for f in grad_norm_findings(grad)] == [(40, "exploding_grad")]
    # with many layers a model-wide decline is the loss converging, not a vanishing gradient
    rng = np.random.default_rng(0)  # the loss drops within 3 ticks and plateaus: every gradient 100x down
    level = np.r_[np.ones(20), [0.2, 0.05], np.full(58, 0.01)]
    decline = level[:, None] * np.exp(0.2 * rng.standard_normal((80, 6)))
    wide = pd.DataFrame(decline, columns=list("abcdef"))
    assert grad_norm_findings(wide) == []
    assert grad_norm_findings(wide, Thresholds(common_mode_layers=100))  # the raw rule floods


def test_thresholds_validate_new_fields():
    with pytest.raises(ValueError, match="spike_z"):
        Thresholds(spike_z=-1.0)
    with pytest.raises(ValueError, match="ratio_first_steps"):
        Thresholds(ratio_first_steps=1.5)
