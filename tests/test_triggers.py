"""``triggers.LayerWatch``: one layer's jump found online from the flight recorder's rows at each flush."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tick_lightning.triggers import LayerWatch


def rows(n=80, params=4, seed=0, noise=0.05):
    """Squared gradient norms, steps x parameters, each a noisy constant of its own scale."""
    rng = np.random.default_rng(seed)
    norms = 10.0 ** (np.arange(params) * -1.0 + noise * rng.standard_normal((n, params)))
    return norms ** 2


def observe(watch: LayerWatch, sumsq: np.ndarray, flush: int, present=None) -> list:
    """Feed ``sumsq`` in flushes of ``flush`` rows, as the callback does; every event found."""
    present = np.ones(sumsq.shape, bool) if present is None else present
    events = []
    for a in range(0, len(sumsq), flush):
        events += watch.observe(list(range(a, min(a + flush, len(sumsq)))), sumsq[a:a + flush], present[a:a + flush])
    return events


@pytest.mark.parametrize("flush", [1, 7, 64])
def test_a_jump_in_one_quiet_parameter_is_found_at_its_step_whatever_the_flushes(flush):
    sumsq = rows()
    sumsq[50:, 2] *= 1e6  # parameter 2 (1e-2 of the largest) x1e3 from step 50 on: a level shift
    events = observe(LayerWatch(), sumsq, flush)
    assert [(e.step, e.trigger) for e in events] == [(50, "layer")]
    assert events[0].z > 6


def test_a_steady_trend_is_no_jump():
    """~0.1 decade a step for 40 steps with a spread of its own (attention leaving its uniform start, seen in real
    fits): a chain of level spikes, no single step a spike of the changes."""
    sumsq = rows(noise=0.1)
    sumsq[30:70, 1] *= (10.0 ** (0.1 * np.arange(40))) ** 2
    assert observe(LayerWatch(), sumsq, 16) == []


def test_no_verdict_before_min_history_changes_nor_on_a_negligible_parameter():
    sumsq = rows()
    sumsq[5, 0] *= 1e8  # the largest parameter, at step 5: only 4 changes before it
    sumsq[:41, 3] = 1e-30  # a numerically-zero gradient (1e-15 of the global norm) ...
    sumsq[41:, 3] = 1e-24  # ... jumping 3 decades: still negligible
    assert observe(LayerWatch(min_history=8), sumsq, 10) == []


def test_absent_and_non_finite_values_are_left_out():
    sumsq = rows()
    present = np.ones(sumsq.shape, bool)
    present[30:40, 1] = False  # no gradient for 10 steps (a frozen phase): its return is no jump
    sumsq[30:40, 1] = 0.0
    sumsq[60, 2] = np.nan  # a NaN is the dense trigger's "nonfinite", not a layer jump
    assert observe(LayerWatch(), sumsq, 8, present) == []


def test_a_new_layout_starts_a_new_window():
    watch = LayerWatch()
    observe(watch, rows(params=4), 16)
    sumsq = rows(params=3)
    sumsq[40, 0] *= 1e6
    assert [e.step for e in observe(watch, sumsq, 16)] == [40]


def test_the_window_goes_through_a_checkpoint():
    """A jump 2 steps after a resume: the resumed watch judges it against the steps before the checkpoint (as the
    uninterrupted one does); a fresh one has no history yet."""
    from tick_lightning.triggers import SpikeTrigger

    sumsq = rows()
    sumsq[52:, 2] *= 1e6
    before = SpikeTrigger()
    before.observe_layers(list(range(50)), sumsq[:50], np.ones((50, 4), bool))
    state = before.state_dict()
    resumed, fresh = SpikeTrigger(), SpikeTrigger()
    resumed.reset(state)
    later = (list(range(50, 80)), sumsq[50:], np.ones((30, 4), bool))
    assert [e.step for e in resumed.observe_layers(*later)] == [52]
    assert fresh.observe_layers(*later) == []


# --------------------------------------------------------------------------- norm inputs (flight=["input_absmax"])
def observe_inputs(trigger, absmax: np.ndarray, flush: int) -> list:
    from tick_lightning.triggers import SpikeTrigger

    assert isinstance(trigger, SpikeTrigger)
    events = []
    for a in range(0, len(absmax), flush):
        events += trigger.observe_inputs(list(range(a, min(a + flush, len(absmax)))), absmax[a:a + flush])
    return events


@pytest.mark.parametrize("flush", [1, 16])
def test_a_jump_of_one_norm_input_is_an_input_event_with_no_share_rule(flush):
    """Input absmax is a scale of its own: a small layer's input jumping 4 decades at one step is an event
    (trigger ``input``), although it is still 1e-6 of the largest after it; zero (the layer did not run) is no
    value."""
    from tick_lightning.triggers import SpikeTrigger

    absmax = np.sqrt(rows(params=3))  # scales 1, 0.1, 0.01 with noise
    absmax[:, 2] *= 1e-8
    absmax[60, 2] *= 1e4
    absmax[30:35, 0] = 0.0
    trigger = SpikeTrigger()
    events = observe_inputs(trigger, absmax, flush)
    assert [(e.step, e.trigger) for e in events] == [(60, "input")]
    assert trigger.observe_layers(list(range(80, 81)), rows(n=1), np.ones((1, 4), bool)) == []  # apart from it
    # the same values as gradient norms fall under the share rule: 1e-6 of the global norm is negligible; and a
    # gradient of exactly zero for 5 steps is a layer that stopped learning there (a norm input of 0 is no value)
    assert [(e.step, e.trigger, e.column) for e in observe(LayerWatch(), absmax ** 2, flush)] == [(30, "layer_zero", 0)]


def test_input_events_are_agreed_with_the_dense_ones_and_go_through_a_checkpoint():
    """``observe(..., local=...)`` puts this rank's input events into the one agreement (``hit``: a dump) and its
    events, but only a dense spike, here or on another rank, starts ``spike:K`` ticks (``detected_at``); the
    input window is in ``state_dict`` like the gradient one."""
    from tick_lightning.triggers import Event, SpikeTrigger

    def ranks(*others):  # the agreement over this rank and others whose levels are given
        return lambda level: asked.append(level) or max(level, *others)

    trigger, asked = SpikeTrigger(), []
    flat = {"loss": (np.ones(10), np.ones(10, bool))}
    local = [Event(7, "input", 12.0)]
    events = trigger.observe(list(range(10)), flat, agree=ranks(0), local=local)
    assert asked == [1] and trigger.hit and events == local and trigger.detected_at is None  # a dump, no ticks
    assert trigger.observe(list(range(10, 20)), flat, agree=ranks(1)) == []  # another rank's input event
    assert asked == [1, 0] and trigger.hit and trigger.detected_at is None
    assert trigger.observe(list(range(20, 30)), flat, agree=ranks(2)) == []  # another rank's dense spike
    assert trigger.hit and trigger.detected_at == 29
    trigger.observe(list(range(30, 40)), flat, agree=ranks(0))
    assert not trigger.hit and trigger.detected_at == 29

    absmax = np.sqrt(rows(params=2))
    absmax[52:, 1] *= 1e3
    before = SpikeTrigger()
    before.observe_inputs(list(range(50)), absmax[:50])
    resumed, fresh = SpikeTrigger(), SpikeTrigger()
    resumed.reset(before.state_dict())
    assert [e.step for e in resumed.observe_inputs(list(range(50, 80)), absmax[50:])] == [52]
    assert fresh.observe_inputs(list(range(50, 80)), absmax[50:]) == []


# ------------------------------------------------------------------------------------------------ issue 33: both ways
@pytest.mark.parametrize("flush", [1, 16, 64])
def test_a_fall_by_decades_and_a_zero_gradient_are_events_of_their_own(flush):
    """One parameter falling 3 decades from step 50 (and staying there), another cut to exactly zero from step 60
    (a frozen layer): each is one event, with its kind and its column, whatever the flushes; the return from an
    up-jump is no fall."""
    sumsq = rows(n=100)
    sumsq[50:, 1] *= 1e-6  # x1e-3 in norm
    sumsq[60:, 2] = 0.0
    sumsq[70, 0] *= 1e6  # an up-jump at 70, back at 71
    events = observe(LayerWatch(), sumsq, flush)
    assert [(e.step, e.trigger, e.column) for e in events] == [(50, "layer_drop", 1), (60, "layer_zero", 2),
                                                              (70, "layer", 0)]


@pytest.mark.parametrize("flush", [1, 2, 16])
def test_a_fall_for_a_step_or_two_is_no_event(flush):
    """A bias gradient (a signed sum over the batch) passes near zero now and then: decades down for one or two
    steps, back the next (the demo's healthy fit had one at its classifier bias). A fall is an event only when it
    lasts (``drop_steps``), and then at its first step."""
    sumsq = rows(n=100)
    sumsq[40, 1] *= 1e-6
    sumsq[60:62, 2] *= 1e-6
    sumsq[80:, 3] *= 1e-6
    events = observe(LayerWatch(), sumsq, flush)
    assert [(e.step, e.trigger, e.column) for e in events] == [(80, "layer_drop", 3)]


def drifting(n=300, start=200, steps=20, rate=1.3, seed=0):
    sumsq = rows(n=n, noise=0.1, seed=seed)
    sumsq[start:start + steps, 3] *= (rate ** np.arange(steps)) ** 2
    sumsq[start + steps:, 3] *= (rate ** (steps - 1)) ** 2
    return sumsq


def test_the_trend_watch_is_off_unless_asked():
    """Off by default (so in the callback): on real 220-step fits the learning phase raised many layers together
    (2-19 trend events a healthy fit) and a trend event took a planted jump's place in the report."""
    assert [e for e in observe(LayerWatch(), drifting(), 16) if e.trigger == "layer_trend"] == []
    assert [e.column for e in observe(LayerWatch(trend_z=6.0), drifting(), 16) if e.trigger == "layer_trend"] == [3]


@pytest.mark.parametrize("flush", [16, 64])
def test_a_steady_rise_is_a_trend_event_before_it_is_large(flush):
    """One parameter's gradient rising x1.3 a step (0.11 decade, about the noise of one step; 2.2 decades over 20
    steps): a trend event before the rise is done; none on the others."""
    events = [e for e in observe(LayerWatch(trend_z=6.0), drifting(), flush) if e.trigger == "layer_trend"]
    assert [e.column for e in events] == [3]
    assert 200 < events[0].step < 220


def test_no_trend_event_on_noise_nor_in_early_training():
    """300 steps of noise: nothing; a rise of 0.1 decade a step in the first 60 steps (attention leaving its uniform
    start: a fit's own early history) is no verdict: a trend needs 64 steps of the column's own slopes first."""
    for seed in range(5):
        assert observe(LayerWatch(trend_z=6.0), rows(n=300, noise=0.1, seed=seed), 32) == []
    early = rows(n=120, noise=0.1)
    early[10:50, 1] *= (10.0 ** (0.1 * np.arange(40))) ** 2
    early[50:, 1] *= (10.0 ** 3.9) ** 2
    assert [e for e in observe(LayerWatch(trend_z=6.0), early, 16) if e.trigger == "layer_trend"] == []


def test_the_new_watch_state_goes_through_a_checkpoint():
    """A resumed fit finds the trend the uninterrupted one finds (its slopes and zero runs are in the state)."""
    sumsq = drifting()
    whole = [(e.step, e.trigger) for e in observe(LayerWatch(trend_z=6.0), sumsq, 16)]
    first = LayerWatch(trend_z=6.0)
    observe(first, sumsq[:192], 16)
    resumed = LayerWatch(trend_z=6.0)
    resumed.load_state_dict(first.state_dict())
    later = []
    for a in range(192, 300, 16):
        later += resumed.observe(list(range(a, min(a + 16, 300))), sumsq[a:a + 16], np.ones((min(16, 300 - a), 4), bool))
    assert [(e.step, e.trigger) for e in later] == [x for x in whole if x[0] >= 192] and later


@pytest.mark.parametrize("fall", [191, 192])
def test_a_fall_across_a_checkpoint_is_found_as_without_one(fall):
    """A lasting fall that begins at the last step before a checkpoint at 192 (its run of low steps, 1 of 3, in the
    state) or at the first step after it (judged against the share the column carried at the checkpoint): the
    resumed watch reports it as the uninterrupted one does."""
    sumsq = rows(n=260)
    sumsq[fall:, 3] *= 1e-6
    whole = [(e.step, e.trigger, e.column) for e in observe(LayerWatch(), sumsq, 16)]
    first = LayerWatch()
    observe(first, sumsq[:192], 16)
    resumed = LayerWatch()
    resumed.load_state_dict(first.state_dict())
    later = []
    for a in range(192, 260, 16):
        later += resumed.observe(list(range(a, min(a + 16, 260))), sumsq[a:a + 16], np.ones((min(16, 260 - a), 4), bool))
    assert whole == [(fall, "layer_drop", 3)]
    assert [(e.step, e.trigger, e.column) for e in later] == whole


# ------------------------------------------------------------------------------------------------ issue 33: a drift
@pytest.mark.parametrize("flush", [1, 16, 64])
@pytest.mark.parametrize("rate", [1.3, 1.5])
def test_a_drift_that_rises_a_decade_and_stays_is_a_rise_event_at_its_crossing(flush, rate):
    """One parameter's gradient rising x``rate`` a step for 20 steps (0.11 / 0.18 decade a step: within the noise of
    one step, so no jump; the issue's attention query drift made its gradient ~10x in 20 steps): one ``layer_rise``
    event, on that column, at the step it first stood a decade above where it was half a window before and stayed
    there (``rise_steps``), within the drift; none on the noisy others, whatever the flushes."""
    events = observe(LayerWatch(), drifting(rate=rate), flush)
    assert [(e.trigger, e.column) for e in events] == [("layer_rise", 3)], events
    crossing = 200 + math.ceil(1 / math.log10(rate))  # the first step a decade above the start, noise aside
    assert crossing - 3 <= events[0].step <= crossing + 4


@pytest.mark.parametrize("flush", [1, 16])
def test_a_jump_that_stays_up_is_a_jump_only_and_a_rise_for_two_steps_is_no_event(flush):
    """A level shift by 3 decades (a jump) stays a decade above its past for many steps: one ``layer`` event, not
    also a rise; a rise by a decade that falls back after two steps is no event (it must last ``rise_steps``)."""
    sumsq = rows(n=160, noise=0.1)
    sumsq[100:, 2] *= 1e6
    for k, step in enumerate(range(120, 126)):  # up a decade over 6 steps, two steps there, back
        sumsq[step, 1] *= (10.0 ** (0.2 * (k + 1))) ** 2 if k < 5 else 1.0
    sumsq[124:126, 1] = sumsq[110:112, 1]
    events = observe(LayerWatch(), sumsq, flush)
    assert [(e.step, e.trigger, e.column) for e in events] == [(100, "layer", 2)], events


def test_no_rise_in_early_training_nor_on_noise():
    """A rise of 0.1 decade a step in the first 50 steps (a fit's early phase) is history, not a verdict: a rise needs
    ``rise_history`` (64) values of the column's own first; 300 steps of noise, five seeds: nothing."""
    early = rows(n=160, noise=0.1)
    early[10:50, 1] *= (10.0 ** (0.1 * np.arange(40))) ** 2
    early[50:, 1] *= (10.0 ** 3.9) ** 2
    assert observe(LayerWatch(), early, 16) == []
    for seed in range(5):
        assert observe(LayerWatch(), rows(n=300, noise=0.1, seed=seed), 32) == []


@pytest.mark.parametrize("cut", [192, 205, 207])
def test_a_rise_across_a_checkpoint_is_found_as_without_one(cut):
    """A checkpoint before the drift, inside it, or inside the rise's lasting steps: the resumed watch reports the
    rise at the step the uninterrupted one does (its run and the column's last verdict go through the state)."""
    sumsq = drifting(rate=1.5)
    whole = [(e.step, e.trigger, e.column) for e in observe(LayerWatch(), sumsq, 16)]
    first = LayerWatch()
    observe(first, sumsq[:cut], 16)
    resumed = LayerWatch()
    resumed.load_state_dict(first.state_dict())
    later = []
    for a in range(cut, 300, 16):
        n = min(16, 300 - a)
        later += resumed.observe(list(range(a, a + n)), sumsq[a:a + n], np.ones((n, 4), bool))
    assert len(whole) == 1 and [(e.step, e.trigger, e.column) for e in later] == [w for w in whole if w[0] >= cut - 3]


@pytest.mark.parametrize("flush", [1, 16])
def test_many_columns_falling_at_one_step_are_one_run_wide_event(flush):
    """After an LR x100 the gradients of most layers fall by decades at the same step (a real fit: 28-44 layer_drop
    findings at one step, 164 over 4 runs): one run-wide fall (column -1), not one event per layer; a single column's
    fall at another step stays its own."""
    sumsq = (10.0 ** (0.05 * np.random.default_rng(0).standard_normal((120, 12)))) ** 2  # 12 layers of one scale
    sumsq[70:, :8] *= 1e-6
    sumsq[90:, 11] *= 1e-6
    events = observe(LayerWatch(), sumsq, flush)
    assert [(e.step, e.trigger, e.column) for e in events] == [(70, "layer_drop", -1), (90, "layer_drop", 11)]


def test_an_early_climb_by_two_decades_is_a_rise_when_asked():
    """The attention watch's early verdict (``early_rise=2``): a learning rate too high sends the attention-logit scale
    from 0.14 to 112 in 8 steps and 1,400 by 16 (Llama on Tiny Shakespeare, lr 0.3), long before 64 values of
    history; a healthy fit's climb (0.14 -> 1 in 16 steps, lr 0.01) is no verdict. Without ``early_rise`` neither."""
    healthy = np.full((60, 2), 0.14)
    healthy[:, 0] *= 10.0 ** np.minimum(np.arange(60) / 16, 1.8)  # ~0.9 decade per 16 steps, as at lr 0.01
    unstable = healthy.copy()
    unstable[8:, 1] *= 10.0 ** np.minimum(0.36 * np.arange(52), 4.0)  # 0.36 decade a step from step 8
    early = LayerWatch(trigger="attn", early_rise=2.0)
    events = early.observe_values(list(range(60)), unstable)
    assert [(e.trigger, e.column) for e in events] == [("attn_rise", 1)] and 8 < events[0].step <= 16, events
    assert LayerWatch(trigger="attn", early_rise=2.0).observe_values(list(range(60)), healthy) == []
    assert LayerWatch(trigger="attn").observe_values(list(range(60)), unstable) == []


def test_an_early_climb_under_way_at_the_first_verdict_is_a_rise():
    """lr 0.3 on the Llama of benchmarks/early_warning.py: the attention-logit scale is 0.14 at step 0, 112 at 8,
    1,409 at 16 -- already climbing when the watch may first judge (``min_history``, 8 values): a rise, reported at the
    first step it may be."""
    scale = np.full((40, 1), 0.14) * 10.0 ** np.minimum(0.36 * np.arange(40), 4.0)[:, None]
    events = LayerWatch(trigger="attn", early_rise=2.0).observe_values(list(range(40)), scale)
    assert [(e.trigger, e.column) for e in events] == [("attn_rise", 0)] and events[0].step <= 10, events


@pytest.mark.parametrize("flush", [1, 7, 64])
def test_a_gradient_that_stops_changing_is_a_flat_event_at_its_first_stale_step(flush):
    """A stale gradient (the same tensor every step from step 60: column 1 repeats its step-59 value): ``layer_flat``
    at step 60, once, whatever the flushes; a column that was constant from the start (never changed) is none, and
    neither is a column flat for fewer than ``flat_steps`` steps."""
    sumsq = rows(n=120)
    sumsq[60:, 1] = sumsq[59, 1]
    sumsq[:, 3] = sumsq[0, 3]  # never changed: no history of change, no verdict
    sumsq[80:86, 0] = sumsq[79, 0]  # 7 equal values: under flat_steps
    events = observe(LayerWatch(), sumsq, flush)
    assert [(e.step, e.trigger, e.column) for e in events] == [(60, "layer_flat", 1)], events


def test_many_columns_stopping_at_one_step_are_one_run_wide_flat_event_and_the_state_goes_through_a_checkpoint():
    """Every gradient the same from step 50 (the data stuck on one batch, the weights still): one run-wide event; a
    checkpoint inside the flat run (step 54) finds it as without one."""
    sumsq = rows(n=100, params=5)
    sumsq[50:] = sumsq[49]
    whole = [(e.step, e.trigger, e.column) for e in observe(LayerWatch(), sumsq, 1)]
    assert whole == [(50, "layer_flat", -1)]
    first = LayerWatch()
    observe(first, sumsq[:54], 1)
    resumed = LayerWatch()
    resumed.load_state_dict(first.state_dict())
    later = resumed.observe(list(range(54, 100)), sumsq[54:], np.ones((46, 5), bool))
    assert [(e.step, e.trigger, e.column) for e in later] == whole
