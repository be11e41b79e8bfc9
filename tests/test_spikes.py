"""detect_spikes against a one-step-at-a-time reference, and on the series it must (not) flag."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tick_lightning.spikes import detect_spikes


def brute_force(steps, values, window, z, min_history, direction="up", min_scale=0.01):
    """The docstring's rule, literally: per step, the finite values before it, median and MAD in log10."""
    order = np.argsort(steps, kind="stable")
    steps, values = np.asarray(steps)[order], np.asarray(values, float)[order]
    use_log = (values[np.isfinite(values)] > 0).all()
    out, history = [], []
    for s, v in zip(steps, values):
        if not math.isfinite(v):
            out.append(int(s))
            continue
        x = math.log10(v) if use_log else v
        h = history[-window:]
        if len(h) >= min_history:
            med = float(np.median(h))
            scale = max(1.4826 * float(np.median(np.abs(np.asarray(h) - med))), min_scale)
            score = (x - med) / scale
            if {"up": score > z, "down": score < -z, "both": abs(score) > z}[direction]:
                out.append(int(s))
        history.append(x)
    return sorted(out)


@pytest.mark.parametrize("direction", ["up", "down", "both"])
@pytest.mark.parametrize("window, min_history", [(128, 8), (16, 4), (5, 5)])
def test_matches_brute_force(window, min_history, direction):
    rng = np.random.default_rng(3)
    n = 700
    values = 3.0 * np.exp(-np.arange(n) / 300) * np.exp(0.3 * rng.standard_normal(n))  # heavy-ish noise
    for i, f in [(9, 30.0), (200, 1e3), (201, 1e3), (450, 1e-3), (699, 20.0)]:
        values[i] *= f
    values[300] = np.nan
    values[301] = np.inf
    steps = np.arange(n) * 2 + 1
    perm = rng.permutation(n)  # any input order
    got = [s.step for s in detect_spikes(steps[perm], values[perm], window=window, z=4.0,
                                         min_history=min_history, direction=direction)]
    want = brute_force(steps, values, window, 4.0, min_history, direction)
    assert got == want
    assert {601, 603} <= set(got)  # the non-finite values, whatever the direction


def test_planted_spikes_found_and_noise_left_alone():
    rng = np.random.default_rng(0)
    n = 5000
    loss = 0.69 * np.exp(-np.arange(n) / 1500) + 0.01  # converges 0.69 -> ~0.03
    loss = loss * np.exp(0.15 * rng.standard_normal(n))  # per-batch noise
    assert detect_spikes(np.arange(n), loss) == []  # a healthy converging run: no alarm at all
    planted = [1000, 3000, 4990]
    spiked = loss.copy()
    spiked[planted] *= [1000.0, 10.0, 5.0]
    found = detect_spikes(np.arange(n), spiked)
    assert [s.step for s in found] == planted
    top = found[0]
    assert top.value == spiked[1000] and 0.5 * loss[1000] < top.reference < 2 * loss[1000] and top.z > 6


def test_linear_scale_for_signed_series_and_flat_history():
    steps = np.arange(40)
    signed = np.r_[np.linspace(-1, 1, 30), 50.0, np.linspace(1, 1.2, 9)]
    assert [s.step for s in detect_spikes(steps, signed)] == [30]
    flat = np.ones(40)
    flat[20] = 1.0 + 1e-9  # a rounding difference over a flat history is not a spike (min_scale)
    assert detect_spikes(steps, flat) == []
    with pytest.raises(ValueError, match="log=True"):
        detect_spikes(steps, signed, log=True)


def test_trailing_slice_gives_the_same_verdicts():
    """What the callback does on each host copy: the last window + new values decide the new ones."""
    rng = np.random.default_rng(1)
    values = np.exp(0.2 * rng.standard_normal(1000))
    values[[500, 900]] = [100.0, 1e4]
    steps = np.arange(1000)
    whole = [s.step for s in detect_spikes(steps, values, window=64)]
    new = 150
    tail = [s.step for s in detect_spikes(steps[-(64 + new):], values[-(64 + new):], window=64)
            if s.step >= 1000 - new]
    assert tail == [s for s in whole if s >= 1000 - new] == [900]


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window=0"), ({"z": -1.0}, "z=-1.0"), ({"min_history": 2.5}, "min_history=2.5"),
    ({"direction": "sideways"}, "'up', 'down', 'both'"), ({"window": 4, "min_history": 8}, "exceed window=4"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        detect_spikes(np.arange(3), np.ones(3), **kwargs)
    with pytest.raises(ValueError, match="1-D of one length"):
        detect_spikes(np.arange(3), np.ones(4))
