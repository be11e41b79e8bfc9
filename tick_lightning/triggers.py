"""Triggers that come from values: the online spike watch behind ``spike:K`` ticks and flight-recorder dumps.

The schedule (``schedule.py``) decides ticks from integers; a *trigger* is the one input it takes that comes
from recorded values: "a spike was seen at step S" (``TickSchedule.is_spike_tick(step, S)``). ``SpikeTrigger``
runs ``spikes.detect_spikes`` on the dense series as they reach the host (each flush), keeps the trailing
window across flushes and resumes, and turns what it finds into *events*: ``(step, trigger, z)`` with
trigger ``"loss"`` / ``"grad_norm"`` (a spike of that series) or ``"nonfinite"`` (a NaN or inf value). The
callback routes: events go to the flight recorder (a dump around them), the step of the last detection to
the schedule. Host numpy only; under sharding the "something was found" flag is agreed over the ranks
first (``agree``), so every rank takes the same branch before the collectives that follow.

Example:
    >>> import numpy as np
    >>> trigger = SpikeTrigger()
    >>> loss = np.r_[np.ones(20), 1e4]
    >>> [(e.step, e.trigger) for e in trigger.observe(list(range(21)), {"loss": (loss, np.ones(21, bool))})]
    [(20, 'loss')]
    >>> trigger.detected_at
    20
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tick_lightning.spikes import Spike, detect_spikes

__all__ = ["SPIKE_SERIES", "Event", "SpikeTrigger", "SpikeWatch"]

#: the series ``spike:K`` and the report watch
SPIKE_SERIES = ("loss", "grad_norm")


@dataclass(frozen=True)
class Event:
    """Something the flight recorder dumps a window around: ``trigger`` is ``"loss"`` / ``"grad_norm"`` (a
    spike of that dense series), ``"nonfinite"`` or ``"exception"``; ``z`` the robust z (inf, NaN)."""

    step: int
    trigger: str
    z: float


class SpikeWatch:
    """Online ``spikes.detect_spikes`` on the dense series as they reach the host, trailing window kept.

    ``observe`` returns the spikes among the new values only: each verdict depends on its own trailing
    ``window`` values, so this equals running ``detect_spikes`` over the whole series.
    """

    def __init__(self, series: Sequence[str] = SPIKE_SERIES, window: int = 128, **rule) -> None:
        self.series, self.window, self.rule = tuple(series), window, rule
        self._steps: dict[str, np.ndarray] = {s: np.empty(0, dtype=np.int64) for s in self.series}
        self._values: dict[str, np.ndarray] = {s: np.empty(0) for s in self.series}

    def observe(self, steps: Sequence[int], values: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, Spike]]:
        """The spikes among the new ``(values, present)`` of each watched series (``DenseFlush.host_values``)."""
        found = []
        for name in self.series:
            if name not in values:
                continue
            v_new, present = values[name]
            new_steps = np.asarray(steps, dtype=np.int64)[present]
            if not len(new_steps):
                continue
            s = np.concatenate([self._steps[name], new_steps])
            v = np.concatenate([self._values[name], v_new[present]])
            new = set(new_steps.tolist())
            found += [(name, sp) for sp in detect_spikes(s, v, window=self.window, **self.rule) if sp.step in new]
            finite = np.isfinite(v)  # non-finite values never enter a history
            self._steps[name], self._values[name] = s[finite][-self.window:], v[finite][-self.window:]
        return found

    def state_dict(self) -> dict[str, list]:
        """The trailing windows (at most ``window`` steps and values per series): a resumed fit's verdicts are
        then those of the uninterrupted one, instead of none until ``min_history`` new steps."""
        return {name: [self._steps[name].tolist(), self._values[name].tolist()] for name in self.series}

    def load_state_dict(self, state: dict[str, list]) -> None:
        for name, (steps, values) in state.items():
            if name in self._steps:
                self._steps[name] = np.asarray(steps, dtype=np.int64)[-self.window:]
                self._values[name] = np.asarray(values, dtype=np.float64)[-self.window:]


class SpikeTrigger:
    """The spike watch of one fit, as the schedule and the flight recorder see it (module docstring).

    ``observe(steps, values, agree)`` -> this rank's new events, and ``hit``: whether any rank found one
    (the flag a flight dump is decided on); ``detected_at`` is the last step at which a flush
    found a spike (``TickSchedule.is_spike_tick``); ``spikes`` every ``(series, Spike)`` found this fit.
    ``state_dict`` / ``load_state_dict`` carry the window and ``detected_at`` through a checkpoint.
    """

    def __init__(self, window: int = 128) -> None:
        self._window = window
        self.reset()

    def reset(self, state: dict | None = None) -> None:
        """A fresh watch (fit start), or the one a checkpoint carried (``state_dict``'s value)."""
        self.watch = SpikeWatch(window=self._window)
        self.spikes: list[tuple[str, Spike]] = []
        self.detected_at: int | None = (state or {}).get("detected_at")
        self.hit = False
        if state:
            self.watch.load_state_dict(state["window"])

    def observe(self, steps: Sequence[int], values: dict, agree: Callable[[bool], bool] = bool) -> list[Event]:
        """The events among a flush's ``(values, present)`` (``DenseFlush.host_values``); ``agree(hit)`` makes
        the decision rank-identical (``dist.any_rank``) when each rank has its own values."""
        found = self.watch.observe(steps, values)
        self.spikes += found
        self.hit = agree(bool(found))  # the same on every rank: a dump's collectives follow it
        if self.hit and len(steps):
            # the next step is the first whose batch has not started: spike:K ticks from there
            self.detected_at = max(int(steps[-1]), self.detected_at or -1)
        events = {}
        for series, spike in found:
            trigger = "nonfinite" if not math.isfinite(spike.value) else series
            events.setdefault((spike.step, trigger), Event(spike.step, trigger, spike.z))
        return sorted(events.values(), key=lambda e: (e.step, e.trigger))

    def state_dict(self) -> dict:
        return {"detected_at": self.detected_at, "window": self.watch.state_dict()}
