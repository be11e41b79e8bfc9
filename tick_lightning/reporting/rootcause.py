"""Root cause of an event from the flight recorder: the layers whose own gradient (or norm input) deviated
first, and how many steps before the loss or the global gradient norm moved.

The flight recorder (``state="flight"`` rows) keeps every optimizer step's per-parameter gradient norm for
a window of steps around each event. For an event at step ``E``:

* **Coverage**: the flight steps of the window that holds ``E`` (the maximal run of flight steps, at most
  ``gap`` steps apart, whose last step before ``E`` is at most ``gap`` steps from it), up to ``E``: what
  came after the event is its effect, not its cause. No such window: no verdict (``root_cause`` returns an
  empty table and the report keeps the run-level finding as it was).
* **A layer deviates** at the steps where its gradient norm is a spike of its *own* series over those
  flight steps, by the rule of ``tick_lightning.spikes`` (``detect_spikes``: robust z of log10 against the
  trailing ``window`` values, at least ``min_history`` of them, ``z`` up; a non-finite gradient is a spike
  with z = inf). Its **start** is the first step of the chain of its spikes (hops of at most ``gap`` steps)
  that reaches ``E``: an unrelated blip 100 steps earlier does not make it the origin. Exactly-zero
  gradients carry no scale and are left out of its series. A layer with fewer than ``min_history`` flight
  steps before a finite deviation has no verdict.
* **Moved**: the first step of the chain of spikes of the dense loss or global gradient norm (every step,
  same rule, non-finite included) that reaches ``E``; ``E`` itself when neither series spiked within
  ``gap`` steps before it. **Lead** = moved - start: how many steps the layer's gradient was off before
  the run-level series showed it (0: they moved together, a bad batch).
* **Jump**: a layer *jumped* when, between its start and ``E``, a step-to-step change of its log10 norm
  is a spike of its own step-to-step changes (the same rule on the differences). A fault jumps; training
  that moves a layer's scale steadily (an attention weight leaving its uniform start grows ~0.1 decade a
  step for dozens of steps: real fits, ``benchmarks/flight_root_cause.py``) is a chain of level spikes
  with no jump. An instability that grows fast enough to matter jumps at its onset.
* **Norm inputs** (``flight=["input_absmax"]``): each normalization layer's max |input| is judged by the same
  rules and ranked with the parameters (column ``series``). A norm cancels its input's scale, so a jump
  there (activations blowing up into a norm) shows in no gradient. Among norm inputs that started at the
  same step the earliest in forward order ranks first (a blow-up in the residual stream reaches every later
  norm in the same forward); a norm input non-finite at the first non-finite step ranks before the
  gradients (the forward pass went non-finite: its earliest such input is the origin).
* **Scope**: ``run-wide`` when at least ``RUN_WIDE_SHARE`` of the judged layers (and 3) start at the first finite
  start step together, or moved (rose within a step of the step the run moved, or *fell* by a spike of their own
  below their trailing median from a step before it to two steps after the event) (``share``: the larger fraction) and no layer *jumped* before that (a precursor
  keeps its name), else ``layer``: a learning-rate spike or a bad
  batch moves dozens of layers in one step, and none of them is the origin. (An LR x100 on the tiny BERT of
  ``benchmarks/flight_root_cause.py`` drops most gradients by decades at the step the loss spikes; before the
  falls counted, its table was empty or named a key weight trending since the learning phase, with a 20-step
  "lead".) When no layer rose but a run-wide share fell, the table lists the fallen layers (negative ``z``). A non-finite first row keeps ``layer``: a NaN spreads in
  backward from its origin to every layer before it within the step, and the non-finite rule names the origin.
* **Aftermath**: with ``after`` (the previous event's step), a layer whose chain starts at or before it is that
  event's aftermath (``aftermath`` True): its lead is 0, not the steps back to the earlier event.
* **Rank**: the non-finite parameters of the first non-finite step first (nearest the output first: in
  backward a NaN spreads from its origin towards the input, never back); then the layers that jumped
  before those that only trended; then earliest start, larger z, nearest the output (backward order, the
  reverse of the model's registration order).

Pure numpy/pandas (no torch), like ``tick_lightning.spikes``.

Example:
    >>> import numpy as np, pandas as pd
    >>> steps = np.arange(60)
    >>> rng = np.random.default_rng(0)
    >>> g = pd.DataFrame(np.exp(0.1 * rng.standard_normal((60, 3))), index=steps, columns=["a", "b", "c"])
    >>> g.loc[40:, "b"] *= 10.0                       # b blows up at 40 ...
    >>> loss = pd.Series(np.r_[np.ones(50), 100.0, np.ones(9)] * np.exp(0.01 * rng.standard_normal(60)), index=steps)
    >>> t = root_cause(50, g, {"loss": loss}, order=["a", "b", "c"])   # ... the loss moves at 50
    >>> first = t.iloc[0]
    >>> first.layer, int(first.start_step), int(first.lead)
    ('b', 40, 10)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tick_lightning.spikes import MAD_TO_SIGMA, detect_spikes

__all__ = ["TABLE_COLUMNS", "chain_start", "dense_moves", "flight_segment", "root_cause"]

_MIN_SCALE = 0.01  # detect_spikes' floor of the robust standard deviation (log10), passed explicitly to both
#: Columns of ``root_cause``'s table (the report's ``root_cause.csv`` adds ``event_step`` and ``trigger`` before them).
TABLE_COLUMNS = ["rank", "layer", "series", "start_step", "z", "lead", "moved_step", "scope", "share", "aftermath"]
#: With at least this share of the judged layers (and 3 of them) starting at the first start together, an event is
#: run-wide (a learning-rate spike, a bad batch): no single layer is its origin.
RUN_WIDE_SHARE = 0.2


def flight_segment(steps: Sequence[int] | np.ndarray, event_step: int, gap: int = 8) -> np.ndarray:
    """The flight steps covering ``event_step``, up to it (sorted); empty when no window covers it.

    Example:
        >>> flight_segment([0, 1, 2, 50, 51, 52, 53], 52).tolist()
        [50, 51, 52]
        >>> flight_segment([0, 1, 2], 30).tolist()        # 28 steps after the window: not covered
        []
    """
    s = np.unique(np.asarray(steps, dtype=np.int64))
    s = s[s <= event_step]
    if not len(s) or event_step - s[-1] > gap:
        return s[:0]
    breaks = np.flatnonzero(np.diff(s) > gap)
    return s[breaks[-1] + 1:] if len(breaks) else s


def chain_start(spike_steps: Sequence[int] | np.ndarray, anchor: int, gap: int = 8) -> int | None:
    """The first step of the chain of ``spike_steps`` (hops of at most ``gap``) that reaches ``anchor``
    (its last step at most ``gap`` before it); None when none does.

    Example:
        >>> chain_start([3, 20, 24, 30], 33), chain_start([3], 33)
        (20, None)
    """
    s = np.unique(np.asarray(spike_steps, dtype=np.int64))
    s = s[s <= anchor]
    if not len(s) or anchor - s[-1] > gap:
        return None
    breaks = np.flatnonzero(np.diff(s) > gap)
    return int(s[breaks[-1] + 1] if len(breaks) else s[0])


def dense_moves(dense: Mapping[str, pd.Series], *, window: int = 128, min_history: int = 8,
                z: float = 6.0) -> np.ndarray:
    """Steps at which the loss or the global gradient norm (``dense["loss"]``, ``dense["grad_norm"]``)
    spiked up or was non-finite, by ``detect_spikes`` (the rule of ``loss_spike`` / ``grad_spike``); sorted.

    Example:
        >>> dense_moves({"loss": pd.Series(np.r_[np.ones(20), 50.0, np.ones(5)])}).tolist()
        [20]
    """
    out: set[int] = set()
    for name in ("loss", "grad_norm"):
        series = dense.get(name)
        if series is None or series.empty:
            continue
        v = series.to_numpy(np.float64)
        finite = np.isfinite(v)
        # log10 needs positive values: a non-positive finite loss (a regression target) is compared linearly
        log = bool(finite.any()) and bool((v[finite] > 0).all())
        found = detect_spikes(series.index.to_numpy(), v, window=window, z=z,
                              min_history=min(min_history, window), log=log)
        out.update(sp.step for sp in found)
    return np.array(sorted(out), dtype=np.int64)


def _layer_spikes(steps: np.ndarray, values: np.ndarray, window: int, min_history: int,
                  z: float) -> dict[int, float]:
    """step -> robust z of one layer's spikes (non-finite: inf); zero gradients left out (no log10)."""
    keep = values != 0  # NaN and inf stay: a non-finite gradient is a spike (z = inf)
    s, v = steps[keep], values[keep]
    if not len(s):
        return {}
    if (v[np.isfinite(v)] < 0).any():
        raise ValueError("root_cause: a gradient norm is negative.")
    return {sp.step: sp.z for sp in detect_spikes(s, v, window=window, z=z, min_history=min_history, log=True,
                                                  min_scale=_MIN_SCALE)}


def _jumps(steps: np.ndarray, values: np.ndarray, window: int, min_history: int, z: float) -> np.ndarray:
    """Steps at which one layer's log10 gradient norm rose by a spike of its own step-to-step changes (``z``
    up, the trailing robust rule of ``detect_spikes`` on the differences of its finite, non-zero values):
    a jump, which a steady trend of any slope is not."""
    keep = np.isfinite(values) & (values > 0)
    s, v = steps[keep], values[keep]
    if len(s) < 2:
        return s[:0]
    found = detect_spikes(s[1:], np.diff(np.log10(v)), window=window, z=z, min_history=min(min_history, window),
                          log=False, min_scale=_MIN_SCALE)
    return np.array([sp.step for sp in found if math.isfinite(sp.z)], dtype=np.int64)


def _candidates(logv: np.ndarray, window: int, min_history: int, z: float) -> np.ndarray:
    """Columns of a finite (steps x layers) log10 table that may hold a spike: the trailing robust z of
    every cell at once, with 0.9 x the threshold. Only a filter, so that ``detect_spikes`` (the verdict)
    runs on a handful of the 1,000 layers of a model rather than all of them: one vectorised median per
    step instead of one Python loop per layer. For columns with no missing value the trailing window of
    rows is exactly ``detect_spikes``' window of finite values."""
    hit = np.zeros(logv.shape[1], dtype=bool)
    for i in range(min_history, len(logv)):
        h = logv[max(0, i - window):i]
        med = np.median(h, axis=0)
        scale = np.maximum(MAD_TO_SIGMA * np.median(np.abs(h - med), axis=0), _MIN_SCALE)
        hit |= (logv[i] - med) / scale > 0.9 * z
    return hit


def _deviations(seg: np.ndarray, values: np.ndarray, names: Sequence, event_step: int, window: int,
                min_history: int, z: float, gap: int) -> list[tuple]:
    """``(name, start, z, first non-finite step or None, jumped)`` of each column of a (steps x layers) table
    over ``seg`` that deviated before or at ``event_step`` (the module docstring's rules)."""
    rows = []
    regular = (np.isfinite(values) & (values > 0)).all(axis=0)  # no zero, absent or non-finite cell
    check = ~regular
    if regular.any():
        with np.errstate(divide="ignore"):
            check[regular] = _candidates(np.log10(values[:, regular]), window, min_history, z)
    for j in np.flatnonzero(check):
        spikes = _layer_spikes(seg, values[:, j], window, min_history, z)
        start = chain_start(list(spikes), event_step, gap)
        if start is not None:
            bad = seg[~np.isfinite(values[:, j])]
            jumps = _jumps(seg, values[:, j], window, min_history, z)
            jumped = bool(((jumps >= start) & (jumps <= event_step)).any())
            rows.append((str(names[j]), start, float(spikes[start]), int(bad[0]) if len(bad) else None, jumped))
    return rows


def _falls(seg: np.ndarray, values: np.ndarray, names: Sequence, lo: int, hi: int, window: int, min_history: int,
           z: float) -> list[tuple]:
    """``(name, step, -z)`` of each column whose log10 value *fell* by a spike (robust z >= ``z`` below its trailing
    median, after ``min_history`` rows) at a step in ``[lo, hi]``, its first such step: the mirror image of a level
    spike, for the scope (an LR spike drops dozens of layers' gradients by decades at the step the loss spikes)."""
    regular = (np.isfinite(values) & (values > 0)).all(axis=0)
    if not regular.any():
        return []
    logv = np.log10(values[:, regular])
    cols = np.asarray(names, dtype=object)[regular]
    found: dict[int, tuple] = {}
    for i in np.flatnonzero((seg >= lo) & (seg <= hi)):
        h = logv[max(0, i - window):i]
        if len(h) < min_history:
            continue
        med = np.median(h, axis=0)
        scale = np.maximum(MAD_TO_SIGMA * np.median(np.abs(h - med), axis=0), _MIN_SCALE)
        down = (med - logv[i]) / scale
        for j in np.flatnonzero(down >= z):
            found.setdefault(int(j), (str(cols[j]), int(seg[i]), -float(down[j])))
    return list(found.values())


def root_cause(event_step: int, grad_norm: pd.DataFrame, dense: Mapping[str, pd.Series] | None,
               order: Sequence[str] | None = None, *, nonfinite: pd.DataFrame | None = None,
               inputs: pd.DataFrame | None = None, moves: Sequence[int] | np.ndarray | None = None,
               window: int = 128, min_history: int = 8, z: float = 6.0, gap: int = 8,
               after: int | None = None) -> pd.DataFrame:
    """The layers that deviated before or at ``event_step``, ranked (columns ``TABLE_COLUMNS``, rank 1 first).

    ``grad_norm``: the flight recorder's step x parameter table of gradient norms (``RunData.flight
    ["grad_norm"]``); ``nonfinite`` (optional, same shape): 1 where the gradient had a NaN/inf element
    (such a cell counts as non-finite whatever its norm says; a NaN norm with a 0 flag is an absent
    gradient and left out). ``inputs`` (optional): the step x norm layer table of input absmax
    (``flight=["input_absmax"]``), judged by the same rules and ranked with the parameters (``series``
    tells them apart): a norm cancels its input's scale, so a jump there shows in no gradient. ``dense``:
    the dense per-step series (``RunData.dense``: ``loss``, ``grad_norm``) for the step the run moved; or
    pass ``moves`` (``dense_moves`` of them, computed once for many events). ``order``: parameter names in
    registration (forward) order (the manifest's ``flight.parameters``); names not in it rank after those in
    it on ties. An empty table: the event has no flight coverage, or no layer deviated.
    """
    dtypes = {"layer": object, "series": object, "scope": object, "z": np.float64, "share": np.float64,
              "aftermath": bool}
    empty = pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, np.int64)) for c in TABLE_COLUMNS})
    seg = flight_segment(grad_norm.index.to_numpy(), event_step, gap)
    if not len(seg):
        return empty
    g = grad_norm.reindex(index=seg).astype(np.float64)
    if nonfinite is not None and not nonfinite.empty:
        flag = nonfinite.reindex(index=seg, columns=g.columns).to_numpy(np.float64)
        v = g.to_numpy(copy=True)
        v[flag > 0] = np.inf  # a NaN/inf element anywhere in the gradient: non-finite, whatever the norm
        v[np.isnan(v) & (flag == 0)] = 0.0  # no gradient at all that step: left out like a zero one
        g = pd.DataFrame(v, index=g.index, columns=g.columns)
    if moves is None:
        moves = dense_moves(dense or {}, window=window, min_history=min_history, z=z)
    moved = chain_start(moves, event_step, gap)
    moved = event_step if moved is None else moved
    names = list(order or [])
    backward = {n: i for i, n in enumerate(reversed(names))}  # 0: nearest the output
    rows = [(*r, "grad_norm") for r in _deviations(seg, g.to_numpy(np.float64), g.columns, event_step, window,
                                                   min_history, z, gap)]
    judged = int((np.isfinite(g.to_numpy(np.float64)) & (g.to_numpy(np.float64) != 0)).any(axis=0).sum())
    forward = {}
    if inputs is not None and not inputs.empty:
        x = inputs.reindex(index=seg, fill_value=0.0).astype(np.float64)  # a step without a row: no value
        v = x.to_numpy(copy=True)
        v[np.isnan(v)] = np.inf  # a recorded NaN absmax is a NaN input: non-finite, as inf is
        forward = {str(n): i for i, n in enumerate(x.columns)}  # the manifest's norm_layers: forward order
        rows += [(*r, "input_absmax") for r in _deviations(seg, v, x.columns, event_step, window, min_history,
                                                            z, gap)]
        judged += int(((v != 0) & ~np.isnan(v)).any(axis=0).sum())
    # falls up to 2 steps after the event: an LR spike's loss moves at the step after the first large update, the
    # gradients computed on the moved weights one or two steps later
    idx = grad_norm.index.to_numpy()
    later = grad_norm[(idx >= seg[0]) & (idx <= event_step + 2)].astype(np.float64)
    falls = _falls(later.index.to_numpy(), later.to_numpy(np.float64), later.columns, moved - 1, event_step + 2,
                   window, min_history, z)
    if not rows:
        if len(falls) < 3 or len(falls) < RUN_WIDE_SHARE * max(1, judged):
            return empty
        rows = [(name, step, fz, None, False, "grad_norm") for name, step, fz in falls]  # what moved: they fell
    # Ranking (module docstring): the first non-finite layers, then the layers that jumped, so that a layer
    # trending up since earlier (attention leaving its uniform start) cannot outrank a NaN's or a jump's
    # origin; then the earliest start, the larger z, nearest the output.
    first_bad = min((r[3] for r in rows if r[3] is not None), default=None)

    def key(r):
        nonfinite_first = first_bad is not None and r[3] == first_bad
        # a norm input non-finite at the first non-finite step: the forward pass went non-finite there (a
        # gradient alone would leave every input finite until the next step), so its origin is the earliest
        # such input in forward order, ahead of the gradients it made non-finite
        forward_nan = nonfinite_first and r[5] == "input_absmax"
        return (not nonfinite_first, not forward_nan, not r[4], r[1], -r[2],
                forward[r[0]] if forward_nan else backward.get(r[0], len(backward)))

    rows.sort(key=key)
    # Norm inputs that started together: a blow-up in the residual stream reaches every later norm in the same
    # forward, with a larger z further on; the earliest in forward order is its origin. Reorder them among the
    # places they hold (parameters keep theirs).
    for group in {(r[4], r[1]) for r in rows if r[5] == "input_absmax"}:
        places = [i for i, r in enumerate(rows) if r[5] == "input_absmax" and (r[4], r[1]) == group]
        for i, r in zip(places, sorted((rows[i] for i in places), key=lambda r: forward[r[0]])):
            rows[i] = r
    # a non-finite gradient spreads in backward from its origin to every layer before it within one step: its
    # rows start together by construction, and the non-finite rule names the origin; only finite starts count
    finite_rows = [r for r in rows if r[3] is None or r[3] != r[1]]
    earliest = min((r[1] for r in finite_rows), default=None)
    together = sum(1 for r in finite_rows if r[1] == earliest)
    share = together / max(1, judged)
    # the layers that moved, either way, at the step the run moved: a layer trending since earlier (attention leaving
    # its uniform start) must not make an LR spike's event one layer's because it started first; one that *jumped*
    # before the run moved is a precursor and keeps its name (a layer blown up 25 steps before a bad batch)
    at_move = {r[0] for r in finite_rows if abs(r[1] - moved) <= 1} | {f[0] for f in falls}
    precursor = any(r[4] and r[1] < moved - 1 for r in finite_rows)
    if not precursor and len(at_move) >= 3 and len(at_move) / max(1, judged) > share:
        together, share = len(at_move), len(at_move) / max(1, judged)
    nonfinite_first = rows[0][3] is not None and rows[0][3] == rows[0][1]
    scope = "run-wide" if together >= 3 and share >= RUN_WIDE_SHARE and not nonfinite_first else "layer"
    aftermath = np.array([after is not None and r[1] <= after for r in rows], dtype=bool)
    lead = np.array([moved - r[1] for r in rows], dtype=np.int64)
    lead[aftermath] = 0  # the earlier event's doing: no lead over this one
    lead[lead < 0] = 0  # fell after the run moved (an LR spike's aftermath): no lead
    return pd.DataFrame({"rank": np.arange(1, len(rows) + 1, dtype=np.int64),
                         "layer": [r[0] for r in rows],
                         "series": [r[5] for r in rows],
                         "start_step": np.array([r[1] for r in rows], dtype=np.int64),
                         "z": np.array([r[2] for r in rows], dtype=np.float64),
                         "lead": lead,
                         "moved_step": np.full(len(rows), moved, dtype=np.int64),
                         "scope": [scope] * len(rows),
                         "share": np.full(len(rows), share, dtype=np.float64),
                         "aftermath": aftermath})[TABLE_COLUMNS]
