import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tick_lightning.schedule import ScheduleError, TickSchedule, log_spaced_steps


def ticks(spec, total=100):
    return TickSchedule.parse(spec).bind(total).ticks_between(0, total)


def test_explicit_steps_and_every():
    assert ticks([50, 10]) == [10, 50]
    assert ticks("50,100", total=200) == [50, 100]
    assert ticks("every:25") == [0, 25, 50, 75]
    assert ticks("0,50,100,every:25", total=120) == [0, 25, 50, 75, 100]


def test_log_spaced_is_dense_early_and_exact_count():
    steps = ticks("log:20", total=1000)
    assert len(steps) == 20
    assert steps[0] == 0 and steps[-1] == 999
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps) or sum(gaps[:5]) < sum(gaps[-5:])  # dense early
    assert log_spaced_steps(50, 10) == tuple(range(10))  # more ticks than steps: every step


def test_fraction():
    assert ticks("frac:0.25", total=200) == [50]
    assert ticks("frac:1", total=200) == [199]  # the last step of the run
    assert ticks("frac:0.5,frac:0.75", total=8) == [4, 6]


def test_epoch_and_nonfinite_flags():
    s = TickSchedule.parse("epoch:2,nonfinite")
    assert s.nonfinite and s.epoch_every == 2
    assert [e for e in range(6) if s.is_epoch_tick(e)] == [1, 3, 5]
    assert s.bind(None).ticks_between(0, 50) == []


def test_spike_term_marks_the_k_steps_after_a_detection():
    s = TickSchedule.parse("every:100,spike:3")
    assert s.spike_steps == 3 and not s.is_empty and str(s) == "every:100,spike:3"
    assert [step for step in range(60) if s.is_spike_tick(step, detected_at=40)] == [41, 42, 43]
    assert not any(s.is_spike_tick(step, detected_at=None) for step in range(60))
    assert not TickSchedule.parse("every:100").is_spike_tick(41, detected_at=40)  # no spike term, no deep ticks
    assert TickSchedule.parse("spike:2,spike:5").spike_steps == 5  # the longer window wins
    assert not TickSchedule.parse("spike:4").bind(None).ticks_between(0, 50)  # no scheduled step ticks of its own


def test_none_and_str_roundtrip():
    assert TickSchedule.parse("none").is_empty
    assert TickSchedule.parse(None).is_empty
    spec = "0,50,every:25,log:10,frac:0.5,epoch,nonfinite,spike:8"
    assert TickSchedule.parse(str(TickSchedule.parse(spec))) == TickSchedule.parse(spec)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("every:0", "positive integer"),
        ("every:-5", "positive integer"),
        ("every:x", "not an integer"),
        ("-3", "negative"),
        ("1.5", "Unknown tick schedule term"),
        ("frac:0", r"outside \(0, 1\]"),
        ("frac:1.5", r"outside \(0, 1\]"),
        ("frac:abc", "not a number"),
        ("evry:10", "Malformed"),
        ("spike:0", "positive integer"),
        ("spike", "not an integer"),
        ("bogus", "Unknown tick schedule term"),
        ("10,,20", "empty term"),
        ("", "empty"),
        (True, "bool"),
        (2.5, "not supported"),
        ([1.5], "not an integer"),
    ],
)
def test_bad_specs_name_the_value(spec, match):
    with pytest.raises(ScheduleError, match=match) as info:
        TickSchedule.parse(spec)
    # one sentence with one full stop at its end, so a caller can strip it and append ("'every:10'.; ..." was one)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and ".;" not in message and ". " not in message[:-1]


@pytest.mark.parametrize("spec, exact", [
    ("evry:5", "Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); valid terms: every:N, epoch, epoch:N, log:N, frac:F, "
               "nonfinite, spike:K, none, <step>."),
    ("nonfinit", "Unknown tick schedule term 'nonfinit' (did you mean 'nonfinite'?); valid terms: every:N, epoch, "
                 "epoch:N, log:N, frac:F, nonfinite, spike:K, none, <step> (for example '0,50,100,every:25')."),
    ("bogus:3", "Malformed tick schedule term 'bogus:3'; valid terms: every:N, epoch, epoch:N, log:N, frac:F, "
                "nonfinite, spike:K, none, <step>."),
    ("every:x", "Tick schedule term 'every:x': 'x' is not an integer; expected a positive integer such as 'every:10'."),
])
def test_bad_spec_messages_exactly(spec, exact):
    with pytest.raises(ScheduleError) as info:
        TickSchedule.parse(spec)
    assert str(info.value) == exact


def test_log_without_total_is_an_error():
    with pytest.raises(ScheduleError, match="total number of steps"):
        TickSchedule.parse("log:20").bind(None)
    with pytest.raises(ScheduleError, match="total number of steps"):
        TickSchedule.parse("frac:0.5").bind(float("inf"))


term = st.one_of(
    st.integers(0, 500).map(str),
    st.integers(1, 60).map(lambda n: f"every:{n}"),
    st.integers(1, 40).map(lambda n: f"log:{n}"),
    st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]).map(lambda f: f"frac:{f}"),
    st.just("epoch"),
    st.just("nonfinite"),
    st.integers(1, 20).map(lambda n: f"spike:{n}"),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(term, min_size=1, max_size=6), st.integers(1, 400))
def test_property_decisions_match_definition(terms, total):
    spec = ",".join(terms)
    s = TickSchedule.parse(spec).bind(total)
    expected = set()
    for t in terms:
        if t.isdigit():
            expected.add(int(t))
        elif t.startswith("every:"):
            n = int(t.split(":")[1])
            expected.update(range(0, total + 500, n))
        elif t.startswith("log:"):
            n = int(t.split(":")[1])
            got = log_spaced_steps(n, total)
            assert len(got) == min(n, total) and len(set(got)) == len(got)
            assert all(0 <= g < total for g in got)
            expected.update(got)
        elif t.startswith("frac:"):
            expected.add(min(total - 1, math.floor(float(t.split(":")[1]) * total)))
    horizon = total + 500
    assert set(s.ticks_between(0, horizon)) == {e for e in expected if e < horizon}
    # the canonical string parses back to the same schedule (YAML / CLI round trip)
    assert TickSchedule.parse(str(TickSchedule.parse(spec))) == TickSchedule.parse(spec)


def test_explicit_steps_are_ticks_without_bind():
    """An explicit step is a tick whether or not the schedule was bound (only log:/frac: need the total)."""
    s = TickSchedule.parse("50,100")
    assert s.ticks_between(0, 150) == [50, 100] and s.is_step_tick(50) and not s.is_step_tick(51)
    assert TickSchedule.parse([7]).is_step_tick(7)
