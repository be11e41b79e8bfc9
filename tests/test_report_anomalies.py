"""The anomaly rules as pure functions, checked against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import tiny

from tick_lightning.reporting.anomalies import (
    Finding,
    Thresholds,
    collapse,
    dead_grad_findings,
    frozen_findings,
    grad_norm_findings,
    history_outliers,
    learning_phase,
    nonfinite_findings,
    norm_input_findings,
    run_wide,
    to_markdown,
    update_ratio_findings,
)


def brute_force_outliers(wide: pd.DataFrame, factor, window, min_history, mad_z, direction="both", causal=False):
    """The rule as written in the docs, one cell at a time: median and MAD of log10 over the other ticks."""
    out = []
    logv = np.log10(np.clip(wide.to_numpy(), 1e-30, None))
    for j, name in enumerate(wide.columns):
        for i, step in enumerate(wide.index):
            after = logv[0:0, j] if causal else logv[i + 1:i + window + 1, j]
            others = np.r_[logv[max(0, i - window):i, j], after]
            if len(others) < min_history:
                continue
            ref = np.median(others)
            mad = np.median(np.abs(others - ref))
            d = logv[i, j] - ref
            wanted = {"both": abs(d), "up": d, "down": -d}[direction]
            if wanted > math.log10(factor) and (mad == 0 or abs(d) / (1.4826 * mad) > mad_z):
                out.append((int(step), name, float(wide.iloc[i, j]), float(10**ref)))
    return sorted(out)


@pytest.mark.parametrize("direction, causal", [("both", False), ("up", False), ("down", True), ("both", True)])
@pytest.mark.parametrize("noise", [0.1, 0.6])
def test_history_outliers_match_brute_force(noise, direction, causal):
    rng = np.random.default_rng(1)
    n, layers = 300, 6
    values = np.exp(noise * rng.standard_normal((n, layers))) * rng.uniform(0.01, 10, layers)
    values *= np.linspace(3, 1, n)[:, None]  # a slow trend is not an anomaly
    for i, j, f in [(10, 0, 1e3), (150, 2, 1e-3), (151, 2, 30.0), (299, 5, 50.0), (0, 4, 1e-4), (200, 1, 12.0)]:
        values[i, j] *= f
    wide = pd.DataFrame(values, index=np.arange(n) * 5, columns=[f"l{j}" for j in range(layers)])
    th = Thresholds()
    got = history_outliers(wide, th.grad_factor, th.window, th.min_history, th.mad_z, direction, causal)
    want = brute_force_outliers(wide, th.grad_factor, th.window, th.min_history, th.mad_z, direction, causal)
    assert got and [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2:] for g in got], [w[2:] for w in want], rtol=1e-12)
    if noise == 0.1:  # with low noise the planted cells are exactly what is found
        planted = {"up": {(50, "l0"), (755, "l2"), (1495, "l5"), (1000, "l1")}, "down": {(750, "l2"), (0, "l4")}}
        if causal:  # tick 0 has no preceding ticks to be judged against
            planted["down"] = {(750, "l2")}
        expected = planted["up"] | planted["down"] if direction == "both" else planted[direction]
        assert {(s, n) for s, n, _, _ in got} == expected


def test_vanishing_is_judged_against_the_past_only():
    # gradients that grow 80x when a head starts learning and stay there: the ticks before the rise are
    # ordinary; a later collapse below the new level is vanishing
    rng = np.random.default_rng(0)
    low, high = np.exp(0.05 * rng.standard_normal(8)), 80 * np.exp(0.05 * rng.standard_normal(30))
    grad = pd.DataFrame({"w": np.r_[low, high, 1e-2]}, index=range(0, 390, 10))
    assert {s for s, *_ in history_outliers(grad, 10, direction="down")} >= set(range(0, 80, 10))  # centred
    found = grad_norm_findings(grad)
    assert [(f.step, f.kind) for f in found] == [(380, "vanishing_grad")]
    assert found[0].reference == pytest.approx(float(np.exp(np.median(np.log(high[-25:])))), rel=1e-9)


def test_grad_findings_kinds_and_no_history():
    grad = pd.DataFrame({"a": [1.0, 1.1, 0.9, 1.0, 1.05, 1e-4], "b": [1.0, 1e3, 1, 1, 1, 1]}, index=range(6))
    kinds = {(f.step, f.layer): f.kind for f in grad_norm_findings(grad)}
    assert kinds == {(5, "a"): "vanishing_grad", (1, "b"): "exploding_grad"}
    assert grad_norm_findings(grad.iloc[:4]) == []  # 3 other ticks < min_history: no verdict
    assert grad_norm_findings(grad, Thresholds(grad_factor=1e4)) == []
    # non-finite and exactly-zero gradients: NaN/inf left to the non-finite rule, zero to the dead rule
    grad2 = pd.DataFrame({"c": [1.0, np.inf, 1.0, np.nan, 1.0, 1.0, 0.0, 1.0], "d": [1.0] * 8})
    assert grad_norm_findings(grad2) == []
    assert [(f.step, f.layer, f.kind) for f in dead_grad_findings(grad2)] == [(6, "c", "dead_grad")]
    counts = pd.DataFrame({"c": [0.0, 5.0, 0.0, np.nan, 0.0, 0.0, 0.0, 0.0], "d": [0.0] * 8})
    # a NaN norm with a NaN count is an absent gradient (p.grad None): dead, not non-finite
    assert [(f.step, f.detail) for f in dead_grad_findings(grad2, counts)] == [
        (3, "no gradient (unused in the forward?)"), (6, "gradient exactly zero")]
    assert {(f.step, f.layer) for f in nonfinite_findings(grad_nonfinite=counts, grad_norm=grad2)} == {(1, "c")}


def _phase_case(layer_values, loss_values):
    steps = range(0, 10 * len(layer_values), 10)
    rng = np.random.default_rng(0)
    grad = pd.DataFrame({"steady": np.exp(0.1 * rng.standard_normal(len(steps))), "w": layer_values}, index=steps)
    return grad, pd.Series(loss_values, index=steps, dtype=float)


FLAT = [0.69, 0.70, 0.69, 0.70, 0.69, 0.70]


@pytest.mark.parametrize("case, kept", [
    # a layer whose gradient rises 100x and stays while the loss leaves chance level: learning, dropped
    ("rise, loss falls", []),
    # the same rise while the loss climbs: a divergence in the making, kept
    ("rise, loss climbs", [60, 70, 80]),
    # a one-tick spike is kept whatever the loss does
    ("spike, loss falls", [60]),
    # a rise at the very last tick with a falling loss: no later tick calls it a spike, dropped
    ("rise at the end, loss falls", []),
    # no loss recorded: nothing to judge by, kept
    ("rise, no loss", [60, 70, 80]),
])
def test_learning_phase(case, kept):
    ones = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]
    if case.startswith("spike"):
        layer, loss = ones + [300.0, 1.0, 1.1], FLAT + [0.5, 0.4, 0.3]
    elif case.startswith("rise at the end"):
        layer, loss = ones + [1.0, 1.1, 200.0], FLAT + [0.69, 0.6, 0.3]
    else:
        layer = ones + [50.0, 120.0, 100.0]
        loss = FLAT + ([0.5, 0.4, 0.3] if "falls" in case else [0.9, 1.5, 2.0])
    grad, loss = _phase_case(layer, loss)
    found = grad_norm_findings(grad)
    assert {f.layer for f in found} == {"w"} and found  # the history rule flags the layer in every case
    got = learning_phase(found, grad, None if "no loss" in case else loss)
    assert [f.step for f in got] == kept


def test_learning_phase_needs_loss_history_and_keeps_other_kinds():
    grad, loss = _phase_case([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0, 120.0, 100.0], FLAT + [0.5, 0.4, 0.3])
    found = grad_norm_findings(grad)
    short = loss.copy()
    short.iloc[:5] = np.nan  # at most 3 finite preceding losses < min_history: no verdict, the findings stay
    assert learning_phase(found, grad, short) == found
    other = [Finding(60, "w", "nonfinite_grad", 1.0, float("nan"))]
    assert learning_phase(other, grad, loss) == other


def test_update_ratio_band():
    steps = [10, 11, 12, 13, 14]  # past Thresholds.ratio_first_steps
    r = pd.DataFrame({"a": [1e-3, 0.5, 1e-3, 1e-7, 0.0], "b": [1e-3, 1e-3, 0.0, 1e-3, 0.0]}, index=steps)
    got = {(f.step, f.layer, f.kind) for f in update_ratio_findings(r)}
    # step 14: no update anywhere (lr 0 / skipped) is not a per-layer anomaly; step 12 'b' alone is frozen
    assert got == {(11, "a", "update_ratio_high"), (13, "a", "update_ratio_low")}
    assert [(f.step, f.layer, f.kind) for f in frozen_findings(r)] == [(12, "b", "frozen")]
    assert frozen_findings(r, pd.DataFrame({"a": [1.0] * 5, "b": [1.0, 1.0, 0.0, 1.0, 1.0]}, index=steps)) == []
    assert {(f.step, f.layer) for f in update_ratio_findings(r, no_update_steps=[11, 12])} == {(13, "a")}
    assert update_ratio_findings(r, Thresholds(ratio_low=1e-8, ratio_high=1.0), no_update_steps=[12]) == []
    # the band applies to matrices: a 1-d parameter (bias, norm gain) is left out; inf (zero weight) skipped
    shapes = {"a": [4, 4], "b": [4]}
    r.loc[12, "b"] = 1e-7
    assert {f.layer for f in update_ratio_findings(r, shapes=shapes)} == {"a"}
    assert len(update_ratio_findings(r, Thresholds(ratio_matrices_only=False), shapes=shapes)) == 3
    r.loc[10, "a"] = np.inf
    assert (10, "a") not in {(f.step, f.layer) for f in update_ratio_findings(r)}
    # at a tick whose learning rate is near zero (end of a decay) a small update is the schedule's doing
    got = {(f.step, f.layer, f.kind) for f in update_ratio_findings(r, low_lr_steps=[11, 12, 13])}
    assert got == {(11, "a", "update_ratio_high")}  # the upper bound still applies there
    # Adam's first steps: lr x sign(g), a high ratio everywhere, is not reported before ratio_first_steps
    first = r.set_axis([0, 1, 2, 3, 4])
    assert {f.kind for f in update_ratio_findings(first)} == {"update_ratio_low"}
    assert {f.kind for f in update_ratio_findings(first, Thresholds(ratio_first_steps=1))} == {
        "update_ratio_low", "update_ratio_high"}
    # many layers out of the band at one tick: one model-wide line naming the most extreme
    wide = pd.DataFrame(np.full((1, 8), 0.3), index=[20], columns=[f"p{i}" for i in range(8)])
    wide.loc[20, "p5"] = 0.9
    (one,) = update_ratio_findings(wide)
    assert (one.layer, one.value) == ("", 0.9) and one.detail == "8 of 8 layers (most extreme: p5)"


def test_low_lr_ticks_of_a_run_are_found_from_its_lr_records(tmp_path):
    from tick_lightning.reporting import find_anomalies, load_run
    lrs = [1e-3] * 8 + [1e-3, 1e-6]  # a cosine tail at the last tick
    # far below the band at two separate ticks
    tiny.record(tmp_path, [(step, [("lr", "group0", "lr", lr), ("update", "w", "ratio", 1e-7 if step in (5, 9) else 1e-3),
                                   ("weight", "w", "norm", 1.0)]) for step, lr in enumerate(lrs)])
    low = {f.step for f in find_anomalies(load_run(tmp_path)) if f.kind == "update_ratio_low"}
    assert low == {5}  # step 9's tiny update is explained by its lr (under 5% of the peak)
    assert {f.step for f in find_anomalies(load_run(tmp_path), Thresholds(lr_floor=1e-9))
            if f.kind == "update_ratio_low"} == {5, 9}


def test_norm_input_rules():
    idx = range(10)
    rms = pd.DataFrame({"ln0": [1.0] * 10, "ln1": [1.0] * 9 + [50.0], "ln2": [1.0] * 4 + [0.0] + [1.0] * 5}, index=idx)
    absmax = pd.DataFrame({"ln0": [5.0] * 3 + [5e3] + [5.0] * 6, "ln1": [5.0] * 10, "ln2": [5.0] * 10}, index=idx)
    got = {(f.step, f.layer, f.kind) for f in norm_input_findings(rms, absmax)}
    assert got == {(3, "ln0", "saturating_norm_input"), (9, "ln1", "exploding_norm_input"), (4, "ln2", "dead_norm_input")}
    big = absmax.copy()
    big.loc[7, "ln2"] = 4e4  # crest 4e4 > 1e3 already; check the fp16 limit on a run with large rms
    rms2 = rms.copy()
    rms2.loc[7, "ln2"] = 1e3
    fp16 = {(f.step, f.layer, f.kind, f.detail) for f in norm_input_findings(rms2, big, fp16=True)}
    assert (7, "ln2", "saturating_norm_input", "absmax near the fp16 limit 65504") in fp16
    assert not any("fp16" in f.detail for f in norm_input_findings(rms2, big))  # only fp16 runs have that limit


def test_nonfinite_and_skipped():
    loss = pd.Series([0.5, np.nan, 0.4, np.inf], index=[0, 10, 20, 30])
    counts = pd.DataFrame({"a": [0, 3, 0, 0], "b": [0, 0, 0, 0]}, index=loss.index, dtype=float)
    norms = pd.DataFrame({"a": [1, np.inf, 1, 1], "b": [1, 1, 1, np.nan]}, index=loss.index, dtype=float)
    skipped = pd.Series([0, 1, 0, 0], index=loss.index, dtype=float)
    got = {(f.step, f.layer, f.kind) for f in nonfinite_findings(loss, None, counts, norms, None, skipped)}
    assert got == {(10, "", "nonfinite_loss"), (30, "", "nonfinite_loss"), (10, "a", "nonfinite_grad"),
                   (30, "b", "nonfinite_grad"), (10, "", "amp_skipped")}
    many = pd.DataFrame(np.ones((1, 8)), index=[5], columns=[f"p{i}" for i in range(8)])
    (one,) = nonfinite_findings(grad_nonfinite=many)
    assert one.layer == "p0" and "8 layers" in one.detail


def test_collapse_merges_consecutive_ticks_only():
    steps = [0, 10, 20, 30, 40, 50]
    fs = [Finding(s, "a", "update_ratio_high", v, 0.1) for s, v in [(10, 0.2), (20, 0.9), (30, 0.3), (50, 0.2)]]
    fs.append(Finding(20, "", "nonfinite_loss", float("nan"), float("nan")))
    out = collapse(fs, steps)
    assert [(f.kind, f.step, f.last_step, f.ticks, f.value) for f in out] == [
        ("nonfinite_loss", 20, 20, 1, out[0].value), ("update_ratio_high", 10, 30, 3, 0.9),
        ("update_ratio_high", 50, 50, 1, 0.2)]
    md = to_markdown(out)
    assert "| 10–30 | `a` | update_ratio_high | 0.9 | 0.1 | 3 |" in md and "3 anomalies found" in md
    assert to_markdown([]) == "No anomalies found."


@pytest.mark.parametrize("bad", [{"grad_factor": 1.0}, {"window": 0}, {"crest": float("nan")}, {"mad_z": -1},
                                 {"ratio_matrices_only": 1}])
def test_thresholds_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Thresholds(**bad)


def test_a_layer_that_keeps_its_gradient_while_the_others_rise_or_fall_is_not_flagged():
    """The demo's learning phase: most gradients rise 30x as the model starts to learn, the head's stays."""
    from tick_lightning.reporting.anomalies import grad_norm_findings

    ticks = range(20)
    rising = pd.DataFrame({f"layer{i}": [1.0 if t < 12 else 30.0 for t in ticks] for i in range(7)}, index=ticks)
    rising["head"] = 1.0
    assert grad_norm_findings(rising) == []
    falling = pd.DataFrame({f"layer{i}": [1.0 if t < 12 else 0.03 for t in ticks] for i in range(7)}, index=ticks)
    falling["head"] = 1.0  # converging: every gradient falls 30x but the head's
    assert grad_norm_findings(falling) == []
    flat = pd.DataFrame({f"layer{i}": [1.0] * 20 for i in range(8)}, index=ticks)
    flat.loc[15, "layer3"] = 1e-3  # one layer's gradient really vanishes
    assert [(f.step, f.layer, f.kind) for f in grad_norm_findings(flat)] == [(15, "layer3", "vanishing_grad")]


def test_a_gradient_at_rounding_residue_of_the_total_is_not_exploding_nor_vanishing():
    """An attention key bias's gradient is exactly zero in exact arithmetic (softmax does not see a shift of the
    keys): in fp32 it is rounding residue ~1e-10 of the total, jumping by decades from tick to tick. Seen as
    ``exploding_grad`` in healthy SST-2 fits (benchmarks/flight_root_cause.py); not a layer that exploded."""
    rng = np.random.default_rng(0)
    ticks = range(0, 120, 10)
    grad = pd.DataFrame({n: np.exp(0.1 * rng.standard_normal(12)) for n in ("w1", "w2", "w3", "w4")}, index=ticks)
    grad["key.bias"] = 1e-11 * np.exp(0.3 * rng.standard_normal(12))
    grad.loc[100, "key.bias"] = 1e-9   # x100 at one tick: still 1e-9 of the total
    grad.loc[60, "key.bias"] = 1e-14   # and /1000 at another
    assert grad_norm_findings(grad) == []
    grad.loc[100, "w2"] *= 100        # a real layer exploding is still found
    assert [(f.step, f.layer, f.kind) for f in grad_norm_findings(grad)] == [(100, "w2", "exploding_grad")]


def test_many_layers_with_one_finding_at_one_tick_are_one_run_wide_finding():
    """The tick rules' findings after an LR spike (benchmarks/flight_root_cause.py: 20-50 layers' ``exploding_grad``
    at one tick, 109 of 117 findings of 4 runs): more than ``max_layers`` layers of one kind at one step are one
    finding naming no layer, whose value is the most extreme layer's (farthest from its reference); fewer stay per layer; a non-finite gradient's
    per-layer findings are never grouped (the root cause ranks them)."""
    rng = np.random.default_rng(0)
    grad = pd.DataFrame(10.0 ** (0.05 * rng.standard_normal((20, 20))), index=range(0, 200, 10),
                        columns=[f"l{i}" for i in range(20)])
    grad.iloc[10, :8] *= 100.0 * np.arange(1, 9)  # 8 of 20 layers explode at tick 100, l7 the most
    grad.iloc[15, 9:11] *= 1e3  # two at tick 150
    per_layer = grad_norm_findings(grad)
    assert len([f for f in per_layer if f.step == 100]) == 8, per_layer  # the rule itself lists them
    found = run_wide(per_layer + [Finding(100, f"l{i}", "nonfinite_grad", math.nan, math.nan) for i in range(7)])
    at_100 = [(f.layer, f.kind) for f in found if f.step == 100]
    assert sorted(at_100) == [("", "exploding_grad")] + [(f"l{i}", "nonfinite_grad") for i in range(7)], at_100
    worst = next(f for f in found if f.step == 100 and f.kind == "exploding_grad")
    most = max((f for f in per_layer if f.step == 100), key=lambda f: abs(math.log10(f.value / f.reference)))
    assert (worst.value, worst.reference) == (most.value, most.reference) and "run-wide: 8 layers" in worst.detail
    assert sorted(f.layer for f in found if f.step == 150) == ["l10", "l9"]
