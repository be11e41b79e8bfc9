"""benchmarks/flight_root_cause.py's logic at CI size: a trial's outcome fields (named vs planted, the lead)
from hand-made findings, and one planted-NaN and one healthy real fit through the script's own functions."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest
import tiny

from tick_lightning.reporting.anomalies import Finding

bench = tiny.load_benchmark("flight_root_cause")
LAYER = bench.PARAMS[2]


def _table(rows):
    return pd.DataFrame([(*r, "layer") for r in rows],
                        columns=["event_step", "trigger", "rank", "layer", "start_step", "z", "lead", "moved_step", "scope"])


def test_outcome_names_the_planted_layer_and_computes_the_lead():
    findings = [Finding(5, "", "loss_spike", 3.0, 1.0),  # far from the fault: elsewhere
                Finding(103, LAYER, "grad_spike", 10.0, 1.0, detail="root cause: ...")]
    table = _table([(103, "grad_norm", 1, LAYER, 100, 9.0, 3, 103), (103, "grad_norm", 2, "other", 103, 5.0, 0, 103),
                    (5, "loss", 1, "x", 5, 4.0, 0, 5)])
    out = bench.outcome(findings, table, "grad", LAYER, range(101, 103))
    assert (out["event_found"], out["at_event"], out["elsewhere"], out["findings"]) == (True, 1, 1, 2)
    assert (out["named"], out["named_planted"]) == (LAYER, True)
    assert (out["event_step"], out["start_step"], out["moved_step"], out["lead"]) == (103, 100, 103, 3)
    assert out["fault_steps"] == [101, 102] and out["scope"] == "layer" and not out["said_run_wide"]
    assert (out["warn_step"], out["delay"], out["loss_step"], out["warn_lead"]) == (103, 2, None, None)
    wide = bench.outcome([Finding(102, "", "loss_spike", 9.0, 1.0, detail="run-wide: 30 layers ..."),
                          Finding(104, "", "layer_drop", -9.0, 1.0, detail="run-wide: ...")], table, "lr", "",
                         range(101, 104))
    assert wide["said_run_wide"] and (wide["warn_step"], wide["loss_step"], wide["warn_lead"]) == (102, 102, 0)
    # another layer named: not planted; no finding near the fault: no event, nothing named
    other = bench.outcome([Finding(103, "other", "grad_spike", 1.0, 1.0)], table, "nan", LAYER, range(101, 102))
    assert other["named_planted"] is False
    # a tick's per-layer finding near the fault is not the event
    tick = bench.outcome([Finding(100, LAYER, "exploding_grad", 9.0, 1.0)], table.iloc[2:], "grad", LAYER, range(101, 103))
    assert (tick["event_found"], tick["elsewhere"], tick["named"]) == (False, 1, None)
    miss = bench.outcome(findings[:1], table.iloc[2:], "grad", LAYER, range(101, 103))
    assert (miss["event_found"], miss["named"], miss["named_planted"], miss["lead"]) == (False, None, False, None)
    # a LayerNorm fault matches any of that module's parameters; batch / lr have no planted layer
    norm = bench.NORMS[1]
    assert bench.planted_match("norm", norm, norm + ".weight") and not bench.planted_match("norm", norm, norm + "x.bias")
    assert bench.planted_match("lr", "", LAYER) is None
    healthy = bench.outcome(findings, table, "healthy", "", range(0))
    assert (healthy["event_found"], healthy["elsewhere"], healthy["named_planted"]) == (False, 2, None)


def test_grid_plants_between_ticks_and_covers_every_target():
    g = bench.grid(["grad", "norm", "batch", "lr", "healthy"], seeds=2, layers=5)
    assert {t for k, t, _, _ in g if k == "grad"} == set(bench.PARAMS)
    assert {t for k, t, _, _ in g if k == "norm"} == set(bench.NORMS)
    assert all(step % 50 for _, _, _, step in g)  # never at a tick of the default every:50


@pytest.fixture(scope="module")
def args():
    return argparse.Namespace(grad_factor=1e4, vocab=tiny.VOCAB, tick_every=25, steps=60, batch=8, seq=12, hidden=32,
                              layers_model=2, lr=1e-3, keep=False, flight="", family="bert")


def test_a_planted_nan_trial_names_the_planted_parameter(tmp_path, args):
    data = bench.synthetic_data(8 * 60, tiny.VOCAB, 12)
    out = bench.trial("nan", LAYER, 0, 41, data, args, tmp_path, tiny.VOCAB)
    assert out["event_found"] and out["named"] == LAYER and out["named_planted"] is True, out
    assert out["start_step"] == 41 and out["lead"] == out["moved_step"] - out["start_step"] == 0, out


def test_a_healthy_trial_has_no_event_fields(tmp_path, args):
    data = bench.synthetic_data(8 * 60, tiny.VOCAB, 12)
    out = bench.trial("healthy", "", 1, 0, data, args, tmp_path, tiny.VOCAB)
    assert out["fault_steps"] == [] and not out["event_found"] and out["named_planted"] is None
    assert out["lead"] is None and out["findings"] == len(out["all_findings"]) == out["elsewhere"]


def test_the_new_fault_kinds_plant_one_target_each_in_both_families():
    for family, targets in (("bert", bench.TARGETS), ("gpt2", bench.GPT2_TARGETS)):
        g = bench.grid(["drift", "freeze", "offopt", "batch"], seeds=2, layers=5, family=family)
        assert {(k, t) for k, t, _, _ in g if k != "batch"} == set(targets.items())
        assert all(step + 20 < 220 and step % 50 for _, _, _, step in g)  # the drift ends inside the default 220 steps
        assert any(k == "batch" for k, *_ in g) == (family == "bert")  # an LM has no labels to flip
    # a drift is named by its weight or by the attention block holding it (its logit scale)
    q = bench.TARGETS["drift"]
    assert bench.planted_match("drift", q, q.rsplit(".", 2)[0]) and not bench.planted_match("drift", q, q + "x")


def test_a_drift_trial_of_the_lm_family_is_warned_by_the_attention_watch(tmp_path, args):
    """CI-size GPT-2 LM (synthetic counting task): the query third of layer 0's fused c_attn x1.5 a step from step
    80; with ``--flight attn_logit`` the block's logit climb is the first finding at the drift, naming the block."""
    lm_args = argparse.Namespace(**{**vars(args), "family": "gpt2", "steps": 110, "flight": "attn_logit",
                                    "tick_every": 50})
    data, vocab = bench.lm_data(None, 8 * 110, 12, tiny.VOCAB)
    out = bench.trial("drift", bench.GPT2_TARGETS["drift"], 0, 80, data, lm_args, tmp_path, vocab)
    assert out["event_found"] and out["finding_kinds"][0] in ("attn_rise", "attn_jump"), out
    assert out["named"] == "model.transformer.h.0.attn" and out["named_planted"] is True, out
    assert 0 <= out["delay"] <= 10, out


def test_layer_watch_cost_times_the_common_path_of_healthy_flushes():
    """benchmarks/layer_watch_cost.py: one timing per flush for each watch, on flushes that raise no event."""
    import numpy as np

    from tick_lightning.triggers import LayerWatch

    cost = tiny.load_benchmark("layer_watch_cost")
    layer_s, spike_s = cost.time_watches(tensors=50, rows=16, count=12, window=32)
    assert len(layer_s) == len(spike_s) == 12 and min(layer_s) > 0 and min(spike_s) > 0
    watch = LayerWatch(window=32)
    events = [e for steps, sumsq in cost.flushes(np.random.default_rng(0), 50, 16, 12)
              for e in watch.observe(steps, sumsq, np.ones(sumsq.shape, bool))]
    assert events == []
