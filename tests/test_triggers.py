"""``triggers.LayerWatch``: one layer's jump found online from the flight recorder's rows at each flush."""

from __future__ import annotations

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
