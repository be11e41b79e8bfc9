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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tick_lightning.spikes import MAD_TO_SIGMA, Spike, detect_spikes

__all__ = ["SPIKE_SERIES", "Event", "LayerWatch", "SpikeTrigger", "SpikeWatch"]

#: the series ``spike:K`` and the report watch
SPIKE_SERIES = ("loss", "grad_norm")


@dataclass(frozen=True)
class Event:
    """Something the flight recorder dumps a window around: ``trigger`` is ``"loss"`` / ``"grad_norm"`` (a
    spike of that dense series), ``"nonfinite"``, ``"exception"``, ``"guard"`` (the guard acted), ``"layer"``
    (one parameter's gradient norm jumped), ``"layer_drop"`` (it fell by decades), ``"layer_zero"`` (it became
    exactly zero: the layer stopped learning), ``"layer_flat"`` (it stopped changing: a stale gradient),
    ``"layer_rise"`` (it climbed a decade above its recent past and
    stayed: a drift), ``"layer_trend"`` (it rose steadily, against its own history: opt-in), the same of a norm
    layer's input absmax (``"input"``, ``"input_drop"``, ...), a parameter's update jumping (``"update"``; with
    ``flight=["update_norm"]``) or an attention block's logit scale jumping or climbing (``"attn"``,
    ``"attn_rise"``; with ``flight=["attn_logit"]``); ``z`` the robust z (inf, NaN); ``column`` the parameter's (or
    norm layer's, or attention block's) column in the flight recorder (-1: a run-level event, or a watch's run-wide
    one: 3 or more columns at one step)."""

    step: int
    trigger: str
    z: float
    column: int = -1


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


class LayerWatch:
    """One layer's series *jumping* while the loss and the global norm need not move: an x1e3 on a parameter
    that carries 1e-5 of the global gradient norm is invisible to the dense series, not to its own.

    ``observe`` takes the flight recorder's new gradient rows at each flush (squared norms ``[rows,
    parameters]``, reduced over the shards, so the same on every rank) and returns an event (trigger
    ``"layer"``) at each step where a parameter's log10 gradient norm rose by a spike of its own step-to-step
    changes (robust z >= ``z`` against its changes over the trailing ``window`` steps, this flush's included
    -- median and MAD, which a few jumps do not move; one median per parameter per flush --, after at least
    ``min_history`` of them: the rule ``reporting.rootcause`` calls a jump), by at least ``min_jump`` decades,
    to ``min_jump`` decades above the column's median over the window (the return from a dip, or a noisy
    embedding gradient swinging 0.2 -> 3 -> 0.2, is no jump), to at least ``min_share`` of that step's global
    norm (a parameter whose gradient is numerically zero, such as a key bias under softmax, jumps by decades in
    noise). A fall is the mirror image and must last ``drop_steps`` steps (``layer_drop``). ``observe_values``
    applies the same rule to a series that is a scale of its own (``flight=["input_absmax"]``: each normalization layer's max |input|,
    which a norm cancels, so that neither the loss nor any gradient shows its jump); there is no global norm
    to share, and the trigger is the watch's own (``LayerWatch(trigger="input")``). Host numpy. The window
    starts afresh at fit start (``min_history`` steps before the first verdict) and goes through a checkpoint
    (``state_dict``).

    Example:
        >>> rows = np.ones((20, 3)); rows[15, 1] = 1e6          # parameter 1 jumps 3 decades at step 15
        >>> [(e.step, e.trigger) for e in LayerWatch().observe(list(range(20)), rows, np.ones((20, 3), bool))]
        [(15, 'layer')]
        >>> absmax = np.ones((20, 2)); absmax[12, 0] = 1e4     # norm layer 0's input x1e4 at step 12
        >>> [(e.step, e.trigger) for e in LayerWatch(trigger="input").observe_values(list(range(20)), absmax)]
        [(12, 'input')]
    """

    def __init__(self, window: int = 128, min_history: int = 8, z: float = 6.0, min_jump: float = 1.0,
                 min_share: float = 1e-4, trigger: str = "layer", trend_window: int = 16,
                 trend_history: int = 64, min_trend: float = 0.5, min_share_quiet: float = 1e-7,
                 trend_z: float | None = None, drop_steps: int = 3, rise_span: int = 16, rise_steps: int = 3,
                 rise_history: int = 64, crowd: int | None = 3, early_rise: float | None = None,
                 flat_steps: int = 8, flat_tol: float = 1e-9) -> None:
        self.window, self.min_history, self.z = window, min_history, z
        self.min_jump, self.min_share, self.trigger = min_jump, min_share, trigger
        self.trend_window, self.trend_history, self.min_trend = trend_window, trend_history, min_trend
        # a zero gradient and a steady rise are not noise-prone as a jump is: a layer carrying 1e-5 of the global
        # norm that stops, or starts to grow, matters; rounding residue (1e-13: a key bias) still does not
        self.min_share_quiet, self.trend_z, self.drop_steps = min_share_quiet, trend_z, drop_steps
        self.rise_span, self.rise_steps, self.rise_history = rise_span, rise_steps, rise_history
        self.crowd, self.early_rise = crowd, early_rise
        self.flat_steps, self.flat_tol = flat_steps, flat_tol
        # per column: steps equal to the one before, the run's start, the last value, the changes seen
        self._flat_state: tuple | None = None
        self._rise_run: tuple | None = None  # per column: steps of the rise in progress, its first step, its z
        self._was_high: np.ndarray | None = None  # per column: the last row seen stood a decade above its past
        self._last_large: np.ndarray | None = None  # per column: carried a share at the last row seen
        self._drop_run: tuple | None = None  # per column: steps of the fall in progress, its first step, its z
        self._log: np.ndarray | None = None  # [steps, columns] log10 values of the trailing window (NaN: none)
        self._slopes: np.ndarray | None = None  # [steps, columns] the trend window's slope at each step (NaN: none)
        self._zero_state: tuple | None = None  # per column: in a zero run, values seen, share at its last value
        self._trending: np.ndarray | None = None  # per column: inside a trend already reported

    def observe(self, steps: Sequence[int], sumsq: np.ndarray, present: np.ndarray) -> list[Event]:
        """Events among new rows of squared gradient norms (``present``: the parameter had a gradient)."""
        sumsq = np.asarray(sumsq, dtype=np.float64)
        usable = present & np.isfinite(sumsq) & (sumsq > 0)  # non-finite: the dense trigger's "nonfinite"
        with np.errstate(divide="ignore", invalid="ignore"):
            log = np.where(usable, 0.5 * np.log10(np.where(usable, sumsq, 1.0)), np.nan)
            share = log - 0.5 * np.log10(np.where(usable, sumsq, 0.0).sum(axis=1, keepdims=True))
            large = share >= math.log10(self.min_share)
            quiet = share >= math.log10(self.min_share_quiet)
        zeros = self._zeros(steps, present & (sumsq == 0), usable, quiet) + self._flats(steps, log)
        return sorted(self._jumps(steps, log, large, quiet) + zeros, key=lambda e: (e.step, e.column))

    def observe_values(self, steps: Sequence[int], values: np.ndarray) -> list[Event]:
        """Events among new rows of positive scales ``[rows, columns]`` (non-finite or zero: no value)."""
        values = np.asarray(values, dtype=np.float64)
        usable = np.isfinite(values) & (values > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log = np.where(usable, np.log10(np.where(usable, values, 1.0)), np.nan)
        return self._jumps(steps, log, usable, usable)

    def _zeros(self, steps: Sequence[int], zero: np.ndarray, usable: np.ndarray, large: np.ndarray) -> list[Event]:
        """``layer_zero`` at the first step of each run of exact zeros of a column that carried a share of the
        global norm at its last value before (a layer whose gradient was cut: it stops learning), after
        ``min_history`` values. The same whatever the flushes (the state goes from one to the next). ``crowd``
        columns or more becoming zero at one step are one run-wide event (column -1): a saturated loss (output
        logits grown until the softmax is one-hot in fp32) zeroes every gradient at once, no layer's own fault."""
        n = zero.shape[1]
        state = self._zero_state if getattr(self, "_zero_state", None) is not None and \
            len(self._zero_state[0]) == n else (np.zeros(n, bool), np.zeros(n, int), np.zeros(n, bool))
        was, seen, big = (x.copy() for x in state)
        events = []
        for i in range(len(zero)):
            start = np.flatnonzero(zero[i] & ~was & (seen >= self.min_history) & big)
            if self.crowd is not None and len(start) >= self.crowd:  # many at once: the softmax of the loss saturated
                events.append(Event(int(steps[i]), f"{self.trigger}_zero", math.nan, -1))
            else:
                events += [Event(int(steps[i]), f"{self.trigger}_zero", math.nan, int(c)) for c in start]
            was = np.where(zero[i], True, np.where(usable[i], False, was))
            seen = seen + usable[i]
            big = np.where(usable[i], large[i], big)
        self._zero_state = (was, seen, big)
        return events

    def _flats(self, steps: Sequence[int], log: np.ndarray) -> list[Event]:
        """``layer_flat`` at the first step of a run of ``flat_steps`` steps whose gradient norm equals the step
        before's (to ``flat_tol`` decades: bit for bit in practice) in a column that had changed ``min_history``
        times before: a stale gradient (the same tensor every step, as from a buffer reused by a hook or a cached
        input), which new batches never give. Gradient norms only: a norm layer's input absmax over frozen
        embeddings is the same token's at every step, a legitimate flat series. ``crowd`` columns or more at one
        step: one run-wide event (column -1; the data stuck on one batch with the weights still)."""
        n = log.shape[1]
        state = self._flat_state if self._flat_state is not None and len(self._flat_state[0]) == n else \
            (np.zeros(n, int), np.zeros(n, int), np.full(n, np.nan), np.zeros(n, int))
        count, start, last, moved = (x.copy() for x in state)
        events = []
        for i in range(len(log)):
            ok = np.isfinite(log[i])
            with np.errstate(invalid="ignore"):
                same = ok & np.isfinite(last) & (np.abs(log[i] - last) <= self.flat_tol)
            moved = moved + (ok & np.isfinite(last) & ~same)
            count = np.where(same, count + 1, np.where(ok, 0, count))
            start = np.where(same & (count == 1), int(steps[i]), start)
            cols = np.flatnonzero((count == self.flat_steps) & (moved >= self.min_history))
            if self.crowd is not None and len(cols) >= self.crowd:
                events.append(Event(int(np.min(start[cols])), f"{self.trigger}_flat", math.nan, -1))
            else:
                events += [Event(int(start[c]), f"{self.trigger}_flat", math.nan, int(c)) for c in cols]
            last = np.where(ok, log[i], last)
        self._flat_state = (count, start, last, moved)
        return events

    def _jumps(self, steps: Sequence[int], log: np.ndarray, large: np.ndarray, quiet: np.ndarray) -> list[Event]:
        history = self._log if self._log is not None and self._log.shape[1] == log.shape[1] else log[:0]
        rows = np.vstack([history, log])
        self._log = rows[-(self.window + 1):]
        trends = self._trends(steps, rows, len(log), quiet)
        changes = np.diff(rows, axis=0)[-self.window:]  # the reference: a few jumps do not move a median
        new = changes[-len(log):] if len(history) else changes  # new[i]: into row i (the fit's first has none)
        large = large[-len(new):] if len(new) else large[:0]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: parameters with no gradient yet
            med = np.nanmedian(changes, axis=0)
            scale = np.maximum(MAD_TO_SIGMA * np.nanmedian(np.abs(changes - med), axis=0), 0.01)
            z = (new - med) / scale
            seen = np.isfinite(changes)
            before = (np.cumsum(seen, axis=0) - seen)[-len(new):] if len(new) else seen[:0]  # changes before each
            # by decades, to beyond the column's own usual level both ways: the return from a fall is no jump, the
            # return from a jump no fall (and a noisy series' swing, 0.2 to 3 and back, is neither); a fall is
            # judged against the share the column carried before it
            level = np.nanmedian(rows[:-1], axis=0) if len(rows) > 1 else np.full(rows.shape[1], np.nan)
            high = rows[-len(new):] >= level + self.min_jump if len(new) else np.zeros_like(new, dtype=bool)
            low = rows[-len(new):] <= level - self.min_jump if len(new) else np.zeros_like(new, dtype=bool)
            hit = (z >= self.z) & (new >= self.min_jump) & high & (before >= self.min_history) & large
            last = self._last_large if self._last_large is not None and len(self._last_large) == large.shape[1] \
                else large[:1].reshape(-1)
            before_large = np.vstack([last[None, :], large[:-1]]) if len(large) else large
            if len(large):
                self._last_large = large[-1].copy()
            drop = (z <= -self.z) & (new <= -self.min_jump) & low & (before >= self.min_history) & before_large
            above, rise_z = self._above(rows, len(new), scale)  # decades above the recent past
            late = before >= self.rise_history
            rise_from = self.rise_history if self.early_rise is None else self.min_history
            # the crossing state (also where no verdict may be given yet: a climb in progress at rise_history is not a
            # crossing then): a decade, or early_rise decades before rise_history where the watch has one
            above = np.where(late | (self.early_rise is None), above >= self.min_jump,
                             above >= (self.early_rise or np.inf))
        offset = len(steps) - len(new)
        events = [Event(int(steps[offset + i]), self.trigger, float(z[i, c]), int(c))
                  for i, c in zip(*np.nonzero(hit))]
        quiet = quiet[-len(new):] if len(new) else quiet[:0]
        rises = self._rises(steps[offset:], above, hit, (before >= rise_from) & quiet, rise_z)
        return events + self._lasting(steps[offset:], drop, low, z) + rises + trends

    def _above(self, rows: np.ndarray, new: int, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per new row: how many decades the column stands above where it was half a ``rise_span`` to a whole one
        before (the median of those rows: one noisy step does not set the reference; NaN: too little past), and
        that in its step-to-step scales (a z for the finding)."""
        span, half = self.rise_span, self.rise_span // 2
        above = np.full((new, rows.shape[1]), np.nan)
        for k in range(new):
            i = len(rows) - new + k
            past = rows[max(0, i - span):max(0, i - half + 1)]
            if not len(past):  # (early in a fit the past is shorter: the first rows)
                continue
            above[k] = rows[i] - np.nanmedian(past, axis=0)
        return above, above / scale

    def _rises(self, steps: Sequence[int], above: np.ndarray, hit: np.ndarray, eligible: np.ndarray,
               z: np.ndarray) -> list[Event]:
        """``layer_rise`` at the first step of a climb that stays a decade above the column's recent past for
        ``rise_steps`` steps: a drift (a weight growing a little each step, attention logits running away) that no
        single step shows, so no jump. A climb must *cross* at its first step (the column was not above the step
        before), after ``rise_history`` values of the column's own (the rises of early training are its history,
        not a verdict) and not by a jump (a level shift stays above its past for a span: it is the jump's event). When
        ``crowd`` columns or more stand above their past at once, none begins and none in progress goes on: on
        the tiny BERT of benchmarks/flight_root_cause.py, attention leaving its uniform start raises 4-9 query and
        key gradients by decades within a few steps (steps 85-130 of a healthy fit), a phase of the run, not a drift.
        ``early_rise`` (decades; the attention watch's 2): before ``rise_history`` a climb of that many decades is a
        verdict already (a learning rate too high sends the attention-logit scale from 0.14 to 112 in 8 steps; a
        healthy fit's climbs about a decade in 16). The run in progress and the last verdict go from one flush to
        the next (and through a checkpoint)."""
        n = above.shape[1]
        run = self._rise_run if self._rise_run is not None and len(self._rise_run[0]) == n else \
            (np.zeros(n, int), np.zeros(n, int), np.zeros(n))
        count, start, first_z = (x.copy() for x in run)
        was = self._was_high.copy() if self._was_high is not None and len(self._was_high) == n else np.ones(n, bool)
        events = []
        for i in range(len(above)):
            count = np.where(count > 0, np.where(above[i], count + 1, 0), 0)
            begin = above[i] & ~was & ~hit[i] & eligible[i] & (count == 0)
            if self.crowd is not None and (above[i] & eligible[i]).sum() >= self.crowd:
                begin[:] = False  # many columns climbing at once: a phase of the whole run, not one layer's drift
                count[:] = 0
            count = np.where(begin, 1, count)
            start = np.where(begin, int(steps[i]), start)
            first_z = np.where(begin, z[i], first_z)
            events += [Event(int(start[c]), f"{self.trigger}_rise", float(first_z[c]), int(c))
                       for c in np.flatnonzero(count == self.rise_steps)]
            # with early_rise, a climb already under way when the first verdict may be given is one (a learning
            # rate too high: the attention logits x1,000 within the first 8 steps); without, it is history
            was = above[i] & (eligible[i] | (self.early_rise is None))
        self._rise_run, self._was_high = (count, start, first_z), was
        return events

    def _lasting(self, steps: Sequence[int], drop: np.ndarray, low: np.ndarray, z: np.ndarray) -> list[Event]:
        """``layer_drop`` at the first step of a fall that stays below the column's usual level for ``drop_steps``
        steps: a bias gradient (a signed sum over the batch) passes near zero for a step now and then, decades
        down and back (the demo's healthy fit had one at its classifier bias); a frozen or cut layer stays down.
        The run in progress goes from one flush to the next (a fall at a flush's last row is judged in the next).
        ``crowd`` columns or more whose falls began at one step are one run-wide event (column -1): after an LR
        x100 most layers' gradients fall by decades together (28-44 per-layer events at one step on the tiny BERT of
        benchmarks/flight_root_cause.py), one fact about the run, not one per layer."""
        n = drop.shape[1]
        run = self._drop_run if self._drop_run is not None and len(self._drop_run[0]) == n else \
            (np.zeros(n, int), np.zeros(n, int), np.zeros(n))
        count, start, first_z = (x.copy() for x in run)
        events = []
        for i in range(len(drop)):
            count = np.where(count > 0, np.where(low[i], count + 1, 0), 0)
            begin = drop[i] & (count == 0)
            count = np.where(begin, 1, count)
            start = np.where(begin, int(steps[i]), start)
            first_z = np.where(begin, z[i], first_z)
            done = np.flatnonzero(count == self.drop_steps)
            for step in np.unique(start[done]):  # the falls confirmed at this row, by their first step
                cols = done[start[done] == step]
                if self.crowd is not None and len(cols) >= self.crowd:  # many layers at once: one run-wide fall
                    events.append(Event(int(step), f"{self.trigger}_drop", float(np.median(first_z[cols])), -1))
                else:
                    events += [Event(int(step), f"{self.trigger}_drop", float(first_z[c]), int(c)) for c in cols]
        self._drop_run = (count, start, first_z)
        return events

    def _trends(self, steps: Sequence[int], rows: np.ndarray, new: int, large: np.ndarray) -> list[Event]:
        """``layer_trend`` at the first step where a column's log10 norm has risen steadily over the last
        ``trend_window`` steps: the least-squares slope over them a robust z >= ``z`` above the column's own slopes
        over the window before (at least ``trend_history`` of them: the rises of early training, such as attention
        leaving its uniform start, are its history, not a verdict), and a rise of >= ``min_trend`` decades. ``trend_z``
        None (the default, and so in the callback): off. At 6, two healthy 500-step SST-2 fits had none and a clean
        x1.3-a-step drift of a synthetic series is found within ~10 steps; but on the 220-step fits of
        benchmarks/flight_root_cause.py the learning phase made 2-19 trend events per healthy fit (many layers
        rising together), and a trend event at a planted x1e4 jump took the jump's place in the report (7 of 10
        jumps named instead of 10 of 10). Until it tells one layer's drift from the learning phase, it is opt-in."""
        if self.trend_z is None:
            return []
        w = self.trend_window
        t = np.arange(w, dtype=np.float64) - (w - 1) / 2
        slopes = np.full((new, rows.shape[1]), np.nan)
        for k in range(new):
            end = len(rows) - new + k + 1
            if end < w:
                continue
            y = rows[end - w:end]
            ok = np.isfinite(y).all(axis=0)
            slopes[k, ok] = (t[:, None] * (y[:, ok] - y[:, ok].mean(axis=0))).sum(axis=0) / (t ** 2).sum()
        old = self._slopes if self._slopes is not None and self._slopes.shape[1] == rows.shape[1] else slopes[:0]
        series = np.vstack([old, slopes])
        self._slopes = series[-self.window:]
        trending = self._trending if self._trending is not None and len(self._trending) == rows.shape[1] else \
            np.zeros(rows.shape[1], dtype=bool)
        events = []
        for k in range(new):
            i = len(series) - new + k
            hist = series[max(0, i - self.window - w):max(0, i - w + 1)]  # slopes whose windows end before this one's
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(hist, axis=0) if len(hist) else np.full(rows.shape[1], np.nan)
                scale = np.maximum(MAD_TO_SIGMA * np.nanmedian(np.abs(hist - med), axis=0), 0.01 / w) \
                    if len(hist) else med
                z = (series[i] - med) / scale
            enough = np.isfinite(hist).sum(axis=0) >= self.trend_history if len(hist) else np.zeros_like(trending)
            up = enough & (z >= self.trend_z) & (series[i] * (w - 1) >= self.min_trend) & large[min(k, len(large) - 1)]
            fresh = up & ~trending
            events += [Event(int(steps[k]), f"{self.trigger}_trend", float(z[c]), int(c)) for c in np.flatnonzero(fresh)]
            trending = np.where(np.isfinite(z), trending | up, trending) & ~(np.isfinite(z) & (z < self.trend_z / 2))
        self._trending = trending
        return events

    def state_dict(self) -> dict:
        """The trailing window (``window + 1`` rows of log10 values, NaN where none), as plain lists: a resumed
        fit judges its first steps against the steps before the checkpoint, as the uninterrupted one would."""
        return {"log": [] if self._log is None else self._log.tolist(),
                "slopes": [] if self._slopes is None else self._slopes.tolist(),
                "zero": [] if self._zero_state is None else [x.tolist() for x in self._zero_state],
                "trending": [] if self._trending is None else self._trending.tolist(),
                "drop": [] if self._drop_run is None else [x.tolist() for x in self._drop_run],
                "rise": [] if self._rise_run is None else [x.tolist() for x in self._rise_run],
                "was_high": [] if self._was_high is None else self._was_high.tolist(),
                "flat": [] if self._flat_state is None else [x.tolist() for x in self._flat_state],
                "last_large": [] if self._last_large is None else self._last_large.tolist()}

    def load_state_dict(self, state: dict) -> None:
        log = np.asarray(state.get("log") or [], dtype=np.float64)
        self._log = log if log.ndim == 2 and len(log) else None  # another layout: observe starts afresh
        slopes = np.asarray(state.get("slopes") or [], dtype=np.float64)
        self._slopes = slopes if slopes.ndim == 2 and len(slopes) else None
        zero = state.get("zero")
        self._zero_state = (np.asarray(zero[0], bool), np.asarray(zero[1], int), np.asarray(zero[2], bool)) \
            if zero and len(zero) == 3 else None
        drop = state.get("drop")
        self._drop_run = (np.asarray(drop[0], int), np.asarray(drop[1], int), np.asarray(drop[2], np.float64)) \
            if drop and len(drop) == 3 else None
        self._last_large = np.asarray(state["last_large"], dtype=bool) if state.get("last_large") else None
        rise = state.get("rise")
        self._rise_run = (np.asarray(rise[0], int), np.asarray(rise[1], int), np.asarray(rise[2], np.float64)) \
            if rise and len(rise) == 3 else None
        self._was_high = np.asarray(state["was_high"], dtype=bool) if state.get("was_high") else None
        flat = state.get("flat")
        self._flat_state = (np.asarray(flat[0], int), np.asarray(flat[1], int), np.asarray(flat[2], np.float64),
                            np.asarray(flat[3], int)) if flat and len(flat) == 4 else None
        self._trending = np.asarray(state["trending"], dtype=bool) if state.get("trending") else None


def _run_wide(events: list[Event], crowd: int = 3) -> list[Event]:
    """Events of one trigger at one step on ``crowd`` columns or more become one run-wide event (column -1, the
    largest z): an LR spike moves every weight and every block's logits in the same step, one fact about the run."""
    groups: dict[tuple, list[Event]] = {}
    for e in events:
        groups.setdefault((e.step, e.trigger), []).append(e)
    out = []
    for (step, trigger), group in groups.items():
        if len(group) >= crowd:
            out.append(Event(step, trigger, max(e.z for e in group), -1))
        else:
            out += group
    return sorted(out, key=lambda e: (e.step, e.column))


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
        self.layers = LayerWatch(window=self._window)
        self.inputs = LayerWatch(window=self._window, trigger="input")
        self.updates = LayerWatch(window=self._window, trigger="update")
        # every block's logits climbing at once is the instability itself (a learning rate too high), not a phase
        self.attention = LayerWatch(window=self._window, trigger="attn", crowd=None, early_rise=2.0)
        self.spikes: list[tuple[str, Spike]] = []
        self.detected_at: int | None = (state or {}).get("detected_at")
        self.hit = False
        if state:
            self.watch.load_state_dict(state["window"])
            self.layers.load_state_dict(state.get("layers") or {})
            self.inputs.load_state_dict(state.get("inputs") or {})
            self.updates.load_state_dict(state.get("updates") or {})
            self.attention.load_state_dict(state.get("attention") or {})

    def observe(self, steps: Sequence[int], values: dict, agree: Callable[[int], int] = int,
                local: Sequence[Event] = ()) -> list[Event]:
        """The events among a flush's ``(values, present)`` (``DenseFlush.host_values``), and ``local`` (this
        rank's ``observe_inputs`` events); ``agree(level)`` returns the largest ``level`` over the ranks
        (``dist.any_rank``) when each rank has its own values, so the decision is rank-identical. One number
        carries both flags: 2 for a dense spike (``spike:K`` ticks follow it), 1 for a local event only (a dump
        follows, no ticks)."""
        found = self.watch.observe(steps, values)
        self.spikes += found
        level = agree(2 * bool(found) + bool(local))  # the same on every rank: a dump's collectives follow it
        self.hit = level > 0
        if level >= 2 and len(steps):
            # the next step is the first whose batch has not started: spike:K ticks from there
            self.detected_at = max(int(steps[-1]), self.detected_at or -1)
        events = {}
        for series, spike in found:
            trigger = "nonfinite" if not math.isfinite(spike.value) else series
            events.setdefault((spike.step, trigger), Event(spike.step, trigger, spike.z))
        return sorted([*events.values(), *local], key=lambda e: (e.step, e.trigger))

    def observe_layers(self, steps: Sequence[int], sumsq: np.ndarray, present: np.ndarray) -> list[Event]:
        """The ``LayerWatch`` events among the flight recorder's new rows; ``hit`` too when there are any (the
        rows are reduced over the shards: every rank finds the same ones). ``spike:K`` ticks do not follow them:
        they are the dense series' ``detected_at``."""
        events = self.layers.observe(steps, sumsq, present)
        self.hit = self.hit or bool(events)
        return events

    def observe_updates(self, steps: Sequence[int], sumsq: np.ndarray, present: np.ndarray) -> list[Event]:
        """The update watch's jumps (trigger ``"update"``) among the flight recorder's new ``update_norm`` rows
        (``flight=["update_norm"]``; reduced over the shards like the gradients'): a weight written outside the
        optimizer, or a step far larger than its usual. Many columns at one step (an LR spike moves every weight)
        are one run-wide event (column -1). Its falls and zeros are left out (a schedule's decay to 0 lowers every
        update together; a frozen layer is the gradient watch's), and so are its climbs: Adam's update of a
        parameter whose gradient was ~0 (a key bias) climbs by decades as attention forms, 3 false climbs in 4 fits
        of benchmarks/flight_root_cause.py."""
        events = _run_wide([e for e in self.updates.observe(steps, sumsq, present) if e.trigger == "update"])
        self.hit = self.hit or bool(events)
        return events

    def observe_attention(self, steps: Sequence[int], scale: np.ndarray) -> list[Event]:
        """The attention watch's jumps and climbs (triggers ``"attn"``, ``"attn_rise"``) among the flight recorder's
        new ``attn_logit`` rows: each block's logit scale, this rank's own batches (pass them to ``observe`` as
        ``local``, like ``observe_inputs``'). A climb of every block together is reported (no crowd rule: that is
        how a learning rate too high shows), as one run-wide event (column -1) when 3 or more blocks start at one
        step. Falls are left out (smaller logits are not an instability)."""
        return _run_wide([e for e in self.attention.observe_values(steps, scale) if e.trigger in ("attn", "attn_rise")])

    def observe_inputs(self, steps: Sequence[int], absmax: np.ndarray) -> list[Event]:
        """The input watch's events (trigger ``"input"``) among the flight recorder's new ``input_absmax`` rows.
        Each rank's own values (its own batches): pass them to ``observe`` as ``local``, whose ``agree`` makes
        the dump decision rank-identical. ``spike:K`` ticks do not follow them."""
        return self.inputs.observe_values(steps, absmax)

    def state_dict(self) -> dict:
        return {"detected_at": self.detected_at, "window": self.watch.state_dict(), "layers": self.layers.state_dict(),
                "inputs": self.inputs.state_dict(), "updates": self.updates.state_dict(),
                "attention": self.attention.state_dict()}
