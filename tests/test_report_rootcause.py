"""Root cause from the flight recorder (issue 24): planted faults named, with their start and lead; one
finding per event; the table, page and figure written; runs without coverage keep today's findings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from tick_lightning.reporting import find_anomalies, load_run, report
from tick_lightning.reporting.rootcause import chain_start, flight_segment, root_cause
from tick_lightning.reporting.rules.root_cause import root_cause_table
from tick_lightning.reporting.synthetic import synthetic_parameter_names, write_synthetic_run

NAMES = synthetic_parameter_names(8)  # registration order; backward order is the reverse
SPIKE_KINDS = {"loss_spike", "grad_spike", "nonfinite_loss", "nonfinite_grad"}


def _smallest_layer(tmp_path) -> str:
    """The layer with the smallest gradient of the default synthetic run, read from its tick records: a 10x
    fault there stays out of the global norm, so the loss alone says when the run moved."""
    healthy = load_run(write_synthetic_run(tmp_path / "healthy", ticks=20, dense=True))
    return str(healthy.wide("grad", "norm").median().idxmin())


def _event_findings(findings, lo: int, hi: int):
    return [f for f in findings if lo <= f.step <= hi and f.kind in SPIKE_KINDS]


@pytest.fixture
def lead_run(tmp_path):
    """A small layer blown up 10x from step 100 (for 30 steps); the loss moves at 125 (a bad batch)."""
    layer = _smallest_layer(tmp_path)
    run_dir = write_synthetic_run(tmp_path / "lead", ticks=20, dense=True, flight=True,
                                  layer_fault=(layer, 100, 30, 10.0), loss_spike=(125, 100.0))
    return layer, run_dir


def test_planted_layer_is_named_first_with_its_start_and_lead(lead_run):
    layer, run_dir = lead_run
    run = load_run(run_dir)
    table = root_cause_table(run)
    assert set(table.event_step) == {125}
    first = table.iloc[0]
    assert (first.layer, int(first.start_step), int(first.lead)) == (layer, 100, 125 - 100)
    # the bad batch reached every layer at 125: they deviated too, with no lead, ranked after the origin
    assert set(table.layer) == set(NAMES) and (table.iloc[1:].start_step == 125).all()
    assert list(table["rank"]) == list(range(1, len(NAMES) + 1))
    findings = find_anomalies(run)
    event = _event_findings(findings, 100, 130)
    assert len(event) == 1, event  # one finding per event: the loss spike, carrying the layer
    assert (event[0].step, event[0].layer, event[0].kind) == (125, layer, "loss_spike")
    assert "from step 100" in event[0].detail and "25 steps before" in event[0].detail
    assert "8 layers deviated" in event[0].detail


def test_fault_in_one_layer_between_ticks_is_named(tmp_path):
    """The issue's case: one attention weight's gradient x1e4 for two steps between ticks (every 10)."""
    layer = "encoder.layer.1.attention.query.weight"
    fault = dict(ticks=20, dense=True, layer_fault=(layer, 123, 2, 1e4))
    before = find_anomalies(load_run(write_synthetic_run(tmp_path / "old", **fault)))
    assert [(f.step, f.layer, f.kind) for f in before] == [(123, "", "grad_spike")]  # today: no layer named
    after = find_anomalies(load_run(write_synthetic_run(tmp_path / "new", flight=True, **fault)))
    assert len(after) == 1, after  # the run is otherwise healthy: one event, one finding
    assert (after[0].step, after[0].layer, after[0].kind) == (123, layer, "grad_spike")
    assert "from step 123" in after[0].detail and "at the step the loss / global gradient norm moved" in after[0].detail


@pytest.mark.parametrize("step", [137, 140])  # between ticks, and at a tick (per-layer non-finite findings too)
def test_nan_event_orders_the_origin_first(tmp_path, step):
    origin = "encoder.layer.1.attention.query.bias"  # NaN from here to the input end of the backward pass
    run = load_run(write_synthetic_run(tmp_path / "nan", ticks=20, dense=True, flight=True, flight_nan=(origin, step)))
    table = root_cause_table(run)
    nonfinite = NAMES[:NAMES.index(origin) + 1]
    assert list(table.layer) == nonfinite[::-1]  # nearest the output first: the backward pass met it first
    assert (table.start_step == step).all() and np.isinf(table.z).all() and (table.lead == 0).all()
    event = _event_findings(find_anomalies(run), step - 8, step + 8)
    assert len(event) == 1, event  # the NaN loss, the global norm and the per-layer counts: one finding
    assert (event[0].step, event[0].layer, event[0].kind) == (step, origin, "nonfinite_loss")
    assert f"nearest the output of the {len(nonfinite)} parameters non-finite at step {step}" in event[0].detail
    if step == 140:  # at a tick the records alone name the first *registered* layer: the wrong end
        plain = find_anomalies(load_run(write_synthetic_run(tmp_path / "plain", ticks=20, dense=True,
                                                            flight_nan=(origin, step))))
        assert {(f.kind, f.layer) for f in plain} == {("nonfinite_loss", ""), ("nonfinite_grad", NAMES[0])}


def test_healthy_flight_gets_no_root_cause_finding(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "healthy", ticks=20, dense=True, flight=True)
    run = load_run(run_dir)
    assert len(run.flight["grad_norm"]) == 128 and run.flight_events.empty  # the fit-end dump only
    assert find_anomalies(run) == [] and root_cause_table(run).empty
    page = report(run_dir)
    assert pd.read_csv(page.parent / "root_cause.csv").empty
    assert not list(page.parent.glob("root_cause_step*.png"))
    assert "No event with flight-recorder coverage had a deviating layer" in page.read_text()


def test_csv_html_and_figure(lead_run):
    layer, run_dir = lead_run
    page = report(run_dir)
    out = page.parent
    causes = pd.read_csv(out / "root_cause.csv")
    assert list(causes.columns) == ["event_step", "trigger", "rank", "layer", "series", "start_step", "z", "lead",
                                     "moved_step", "scope", "share", "aftermath"]
    assert causes.iloc[0][["event_step", "trigger", "rank", "layer", "start_step", "lead"]].tolist() == \
        [125, "loss", 1, layer, 100, 25]
    anomalies = pd.read_csv(out / "anomalies.csv")
    assert len(anomalies) == 1 and anomalies.loc[0, "layer"] == layer and anomalies.loc[0, "step"] == 125
    html = page.read_text()
    assert "Root cause (flight recorder)" in html and f"<code>{layer}</code>" in html
    assert "root_cause_step125.png" in html
    image = imread(out / "root_cause_step125.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert "## Root cause (flight recorder)" in (out / "anomalies.md").read_text()


def test_no_flight_coverage_keeps_the_dense_finding(tmp_path):
    layer = "encoder.layer.1.attention.query.weight"
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, dense=True, flight=True,
                                       layer_fault=(layer, 123, 2, 1e4)))
    run.flight = {k: v[v.index > 150] for k, v in run.flight.items()}  # the dump around 123 lost
    assert root_cause_table(run).empty
    assert [(f.step, f.layer, f.kind) for f in find_anomalies(run)] == [(123, "", "grad_spike")]


def test_too_short_a_flight_history_is_no_verdict(tmp_path):
    layer = "encoder.layer.1.attention.query.weight"
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, dense=True, flight=True,
                                       layer_fault=(layer, 123, 2, 1e4)))
    run.flight = {k: v.loc[119:124] for k, v in run.flight.items()}  # 4 steps before the event: < min_history 8
    assert root_cause_table(run).empty
    assert [(f.step, f.layer) for f in find_anomalies(run)] == [(123, "")]


def test_root_cause_ranks_by_start_then_z_and_skips_short_layers():
    rng = np.random.default_rng(1)
    steps = np.arange(200, 260)
    g = pd.DataFrame(np.exp(0.1 * rng.standard_normal((60, 5))), index=steps, columns=list("abcde"))
    g.loc[240:, "b"] *= 10.0      # b first, at 240
    g.loc[245:, "c"] *= 10.0      # c and d at 245: d's jump is larger, so d ranks before c
    g.loc[245:, "d"] *= 1000.0
    g.loc[:254, "e"] = np.nan     # e recorded only from 255: 4 values before its jump, no verdict
    g.loc[259, "e"] *= 1e3
    flags = pd.DataFrame(0.0, index=g.index, columns=g.columns)
    loss = pd.Series(np.r_[np.ones(55), 50.0, np.ones(4)] * np.exp(0.01 * rng.standard_normal(60)), index=steps)
    t = root_cause(259, g, {"loss": loss}, order=list("abcde"), nonfinite=flags)
    assert list(t.layer) == ["b", "d", "c"]
    assert list(t.start_step) == [240, 245, 245] and list(t.lead) == [255 - 240, 255 - 245, 255 - 245]
    assert t.z.iloc[1] > t.z.iloc[2] > 6.0
    assert root_cause(100, g, {"loss": loss}, order=list("abcde")).empty  # before the window: no coverage


def test_norm_inputs_are_ranked_with_the_parameters_and_marked_by_series():
    """A norm layer's input jumping (no gradient moves: the norm cancels it) is the origin; a gradient that
    jumped two steps earlier outranks it (the earliest start); without ``inputs`` nothing deviated."""
    rng = np.random.default_rng(2)
    steps = np.arange(60)
    g = pd.DataFrame(np.exp(0.1 * rng.standard_normal((60, 3))), index=steps, columns=list("abc"))
    x = pd.DataFrame(np.exp(0.1 * rng.standard_normal((60, 2))), index=steps, columns=["ln0", "ln1"])
    x.loc[40, "ln1"] *= 1e4
    t = root_cause(40, g, None, order=list("abc"), inputs=x)
    assert t[["layer", "series", "start_step", "lead"]].values.tolist() == [["ln1", "input_absmax", 40, 0]]
    assert root_cause(40, g, None, order=list("abc")).empty
    g.loc[38:, "b"] *= 100.0
    t = root_cause(40, g, None, order=list("abc"), inputs=x)
    assert t[["layer", "series", "start_step"]].values.tolist() == [["b", "grad_norm", 38],
                                                                     ["ln1", "input_absmax", 40]]


def test_norm_inputs_that_start_together_rank_in_forward_order_and_a_forward_nan_first():
    """A blow-up in the residual stream reaches every later norm in the same forward, larger further on: the
    earliest input is named. A NaN input at the first non-finite step (every gradient NaN with it) is a forward
    NaN: the earliest non-finite input is named, before the gradients it made NaN; a recorded NaN absmax counts."""
    rng = np.random.default_rng(3)
    steps = np.arange(60)
    g = pd.DataFrame(np.exp(0.1 * rng.standard_normal((60, 3))), index=steps, columns=list("abc"))
    x = pd.DataFrame(np.exp(0.1 * rng.standard_normal((60, 3))), index=steps, columns=["ln0", "ln1", "ln2"])
    x.loc[40, "ln1"] *= 1e2
    x.loc[40, "ln2"] *= 1e4
    t = root_cause(40, g, None, order=list("abc"), inputs=x)
    assert list(t.layer) == ["ln1", "ln2"] and t.z.iloc[1] > t.z.iloc[0]
    g.loc[50, :] = np.nan  # the loss went NaN in the forward of step 50: every gradient with it
    x.loc[50, "ln1"], x.loc[50, "ln2"] = np.inf, np.nan
    nonfinite = pd.DataFrame(0.0, index=g.index, columns=g.columns)
    nonfinite.loc[50, :] = 1.0
    t = root_cause(50, g, None, order=list("abc"), nonfinite=nonfinite, inputs=x)
    assert t[["layer", "series"]].values.tolist()[:3] == [["ln1", "input_absmax"], ["ln2", "input_absmax"],
                                                           ["c", "grad_norm"]], t
    x.loc[50, ["ln1", "ln2"]] = 1.0  # inputs finite: a gradient went NaN in backward, nearest the output first
    t = root_cause(50, g, None, order=list("abc"), nonfinite=nonfinite, inputs=x)
    assert t[["layer", "series"]].values.tolist()[0] == ["c", "grad_norm"], t


def test_segment_and_chain_helpers():
    assert flight_segment([1, 2, 3, 40, 41, 42], 45, gap=8).tolist() == [40, 41, 42]
    assert flight_segment([1, 2, 3, 40, 41, 42], 60, gap=8).tolist() == []
    assert chain_start([10, 30, 35, 41], 41, gap=8) == 30 and chain_start([10], 41, gap=8) is None


def test_flight_rows_are_read_apart_from_the_ticks(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, dense=True, flight=True, ranks=2,
                                       layer_fault=("encoder.layer.0.mlp.weight", 123, 2, 1e4)))
    assert run.steps.tolist() == list(range(0, 200, 10))  # flight steps are not ticks
    assert not {"flight", "flight_event"} & set(run.records["state"].astype(str))
    assert list(run.flight["grad_norm"].columns) == NAMES and set(run.flight) == {"grad_norm", "nonfinite"}
    ev = run.flight_events
    assert not ev.duplicated(["step", "trigger"]).any() and set(ev.step) == {123, 124}  # two ranks, one event each
    assert math.isfinite(ev.z.max()) and ev.z.min() > 6.0


def test_candidate_filter_misses_no_layer_detect_spikes_flags():
    """The vectorised pre-pass only skips layers: every layer ``detect_spikes`` flags (chained to the
    event) is in the table, with its start, over faults of every size around the threshold."""
    from tick_lightning.spikes import detect_spikes

    rng = np.random.default_rng(3)
    steps = np.arange(1000, 1128)
    g = pd.DataFrame(np.exp(0.1 * rng.standard_normal((128, 60))), index=steps, columns=[f"p{i}" for i in range(60)])
    for j, factor in enumerate(np.geomspace(1.2, 30.0, 40)):  # 40 faults from invisible to obvious
        g.iloc[100 + j % 27:, j] *= factor
    t = root_cause(1127, g, {}, moves=np.array([1127]))
    expected = {}
    for name in g.columns:
        found = [sp.step for sp in detect_spikes(steps, g[name].to_numpy())]
        start = chain_start(found, 1127, gap=8)
        if start is not None:
            expected[name] = start
    assert 5 < len(expected) < 60  # some flagged, some not: the boundary is exercised
    assert dict(zip(t.layer, t.start_step)) == expected


def test_exception_event_is_a_finding_naming_the_layer(tmp_path):
    """Training raised at 150 while a small layer had been off since 140 (the loss never moved): no rule
    reported anything, the flight event is the one finding."""
    layer = _smallest_layer(tmp_path)
    run = load_run(write_synthetic_run(tmp_path / "r", ticks=20, dense=True, flight=True,
                                       layer_fault=(layer, 140, 11, 10.0), flight_exception=150))
    assert run.flight_events[["step", "trigger"]].values.tolist() == [[150, "exception"]]
    findings = find_anomalies(run)
    assert [(f.step, f.layer, f.kind) for f in findings] == [(150, layer, "exception")]
    assert "from step 140" in findings[0].detail and "10 steps before" in findings[0].detail


def test_a_smooth_warmup_trend_does_not_outrank_the_nan_origin():
    """Seen in real fits (SST-2, tiny BERT, seed 0): one attention key weight's gradient grows steadily from
    ~step 104; every NaN planted at 123..135 in another parameter was attributed to that key weight with a
    lead of 19..31 steps. Minimal form: 'a' grows x1.1 per step with little noise from step 20, 'b' is NaN
    at 50 (the planted origin)."""
    rng = np.random.default_rng(0)
    steps = np.arange(60)
    g = pd.DataFrame(np.exp(0.02 * rng.standard_normal((60, 3))), index=steps, columns=["a", "b", "c"])
    g.loc[20:, "a"] *= 1.1 ** np.arange(40)
    flags = pd.DataFrame(0, index=steps, columns=g.columns)
    flags.loc[50, "b"] = 1
    g.loc[50, "b"] = np.nan
    t = root_cause(50, g, None, order=["a", "b", "c"], nonfinite=flags, moves=np.array([50]))
    assert t.iloc[0].layer == "b", t



def test_a_smooth_trend_does_not_outrank_a_finite_jump_in_another_layer():
    """The ``grad`` fault of benchmarks/flight_root_cause.py (SST-2, seed 0): one parameter's gradient x1e4 at
    the event, while an attention key weight's gradient has been growing smoothly for 20-30 steps (training,
    not a fault). Its chain of spikes starts earlier, but it never jumped: the layer that jumped is the origin."""
    rng = np.random.default_rng(0)
    steps = np.arange(80)
    g = pd.DataFrame(np.exp(0.02 * rng.standard_normal((80, 3))), index=steps, columns=["a", "b", "c"])
    g.loc[30:, "a"] *= 1.05 ** np.arange(50)  # a smooth trend from 30
    g.loc[60:61, "b"] *= 1e4                   # the fault
    t = root_cause(60, g, None, order=["a", "b", "c"], moves=np.array([60]))
    assert t.iloc[0].layer == "b" and int(t.iloc[0].start_step) == 60, t
    assert "a" in set(t.layer) and int(t.set_index("layer").start_step["a"]) < 60  # still listed, after b


def test_a_layer_blowing_up_gradually_is_still_the_origin():
    """An instability that grows over steps (x1.3 per step) with no jump anywhere: the earliest start wins."""
    rng = np.random.default_rng(1)
    steps = np.arange(80)
    g = pd.DataFrame(np.exp(0.02 * rng.standard_normal((80, 3))), index=steps, columns=["a", "b", "c"])
    g.loc[40:, "b"] *= 1.3 ** np.arange(40)
    g.loc[52:, "c"] *= 1.3 ** np.arange(28)  # dragged along later
    t = root_cause(60, g, None, order=["a", "b", "c"], moves=np.array([58]))
    assert list(t.layer[:2]) == ["b", "c"], t


# ------------------------------------------------------------------------------------------------ issue 33: scope
def _noise(steps: int, layers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(np.exp(0.1 * rng.standard_normal((steps, layers))), index=np.arange(steps),
                        columns=[f"l{i}" for i in range(layers)])


def test_many_layers_moving_together_is_run_wide_with_its_share():
    """An LR spike or a bad batch moves dozens of layers in one step: naming the one with the largest z "deviated
    first" misleads; the table says run-wide, with the share of layers that moved."""
    g = _noise(60, 40)
    g.loc[50:, [f"l{i}" for i in range(30)]] *= 20.0
    t = root_cause(50, g, None, moves=[50])
    assert set(t.scope) == {"run-wide"} and t.share.iloc[0] == pytest.approx(30 / 40)
    one = _noise(60, 40)
    one.loc[50:, "l7"] *= 20.0
    t = root_cause(50, one, None, moves=[50])
    assert t.layer.iloc[0] == "l7" and t.scope.iloc[0] == "layer" and t.share.iloc[0] == pytest.approx(1 / 40)


def test_the_aftermath_of_an_earlier_event_is_no_lead():
    """A second event 17 steps after the first reported a 17-step "lead" that only chained back to the first
    spike: a deviation that started at or before the earlier event is its aftermath, not a lead."""
    g = _noise(80, 6)
    g.loc[50:, "l2"] *= 20.0  # l2 jumps at the first event and stays up
    t = root_cause(67, g, None, moves=[50, 67], after=50)
    row = t.set_index("layer").loc["l2"]
    assert int(row.start_step) == 50 and int(row.lead) == 0 and bool(row.aftermath)
    fresh = root_cause(67, g, None, moves=[50, 67])  # without the earlier event: the lead of a real precursor
    assert int(fresh.set_index("layer").loc["l2"].lead) == 17


def test_a_run_wide_event_finding_names_no_layer(tmp_path):
    d = write_synthetic_run(tmp_path / "run", ticks=20, every=10, layers=24, dense=True, flight=True,
                            loss_spike=(120, 50.0))
    found = [f for f in find_anomalies(load_run(d)) if f.step <= 120 <= max(f.last_step, f.step)
             and f.kind in ("loss_spike", "grad_spike")]
    assert found and found[0].layer == "" and "run-wide" in found[0].detail, found


def test_many_layers_falling_together_is_run_wide_too():
    """What an LR x100 did on real fits (benchmarks/flight_root_cause.py): the loss spikes at the next step while
    the gradients of dozens of layers *fall* by decades (the model lands where softmax saturates); no layer rose, so
    the table was empty and the report named whatever trended. A fall of many layers at the step the run moved is
    a run-wide table."""
    g = _noise(60, 40)
    g.loc[51:, [f"l{i}" for i in range(25)]] /= 1e3
    t = root_cause(51, g, None, moves=[51])
    assert len(t) and set(t.scope) == {"run-wide"} and t.share.iloc[0] == pytest.approx(25 / 40), t
    assert set(t.start_step) == {51}


def test_a_learning_phase_trend_does_not_make_a_run_wide_event_one_layers():
    """On a real fit an LR spike's table named a key weight (trending up since step 104, as attention leaves its
    uniform start) with a 20-step "lead", because it started first and only 3 layers rose; 30 others fell at the
    step the run moved. The scope counts the layers that moved at that step either way: run-wide."""
    g = _noise(80, 40)
    g.loc[40:, "l39"] *= 1.25 ** np.arange(40)  # trending since 40
    g.loc[61:, [f"l{i}" for i in range(30)]] /= 1e3
    t = root_cause(61, g, None, moves=[61])
    assert set(t.scope) == {"run-wide"}, t
