"""Synthetic tick runs written with ``TickWriter``: the exact record schema, with anomalies planted on request.

Used by the report's tests, its scale benchmark and the documentation examples, so that a report can be
produced (and checked) without training a model. Values follow what a healthy fine-tuning run looks like:
gradient norms decaying slowly with 10% log-normal noise, update/weight ratios around 1e-3, normalization
inputs with RMS about 1.

Planting options (all off by default; each one is a case of ``benchmarks/anomaly_suite.py``):
``spike`` (one layer's gradient blown up at one tick), ``loss_spike`` (the loss and every layer's
gradient up at one step, a tick or a step between ticks), ``nonfinite_step``, ``dead_layer`` (gradient
exactly zero), ``frozen_layer`` (gradient as usual, never updated), ``diverge_step`` (learning rate too
high from there: update ratios near 1, loss and gradients growing), ``norm_outlier`` (a norm layer's input
absmax far above its RMS at one tick); healthy shapes: ``converge`` (loss 0.69 -> 0.01, gradients
shrinking with it), ``adam_start`` (update/weight ratio ~0.1 on every layer at step 0, as Adam's
bias-corrected first steps are lr x sign(g)). ``dense=True`` adds the dense per-step series
(``state="dense"``, see docs/records.md). ``flight=True`` adds the flight recorder's rows (every step's
per-parameter gradient norm in windows around each event, and the events), with ``layer_fault`` (one
layer's gradient blown up for a few steps) and ``flight_nan`` (a NaN gradient in one layer, propagated to
the layers before it in backward order) to plant what the root-cause table must find.

Example:
    >>> import tempfile
    >>> from tick_lightning.store import load_ticks
    >>> run = write_synthetic_run(tempfile.mkdtemp(), ticks=5, layers=4, spike=(20, "encoder.layer.0.mlp.weight", 1e3))
    >>> sorted(load_ticks(run).state.unique())[:3]
    ['grad', 'loss', 'lr']
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from tick_lightning.records import ROW_SCHEMA
from tick_lightning.spikes import detect_spikes
from tick_lightning.store import TickWriter
from tick_lightning.store.layout import create_attempt, new_attempt_id, rank_dir

__all__ = ["FULL_STATS", "synthetic_parameter_names", "write_synthetic_run"]

#: Per-parameter statistics TickCallback writes, by state.
FULL_STATS: dict[str, tuple[str, ...]] = {
    "weight": ("norm", "mean", "std", "absmax", "nonfinite"),
    "grad": ("norm", "mean", "std", "absmax", "nonfinite"),
    "update": ("norm", "ratio"),
}
_SUFFIXES = ("attention.query.weight", "attention.query.bias", "mlp.weight", "mlp.bias")


def synthetic_parameter_names(count: int) -> list[str]:
    """``count`` parameter names shaped like a transformer's: ``encoder.layer.{i}.{attention.query|mlp}.{weight|bias}``."""
    return [f"encoder.layer.{i // len(_SUFFIXES)}.{_SUFFIXES[i % len(_SUFFIXES)]}" for i in range(count)]


def _write_records(run_dir: Path, manifest: dict, parts_by_rank: list[list[tuple]], compact: bool) -> None:
    """Every store call of this module: one attempt (a fresh run), a writer per rank, one write per part.

    A part is ``(step, state, name, stat, values)``; ``step`` is an int or, for the dense rows written with
    a tick, an int array with one step per row (as the callback writes its per-step buffer).
    """
    attempt = new_attempt_id()
    create_attempt(run_dir, attempt=attempt, run=attempt, parent=None, resumed_from_step=None, start_step=0,
                   manifest=manifest)
    for rank, parts in enumerate(parts_by_rank):
        writer = TickWriter(rank_dir(run_dir, attempt, rank), run=attempt, attempt=attempt, rank=rank)
        for step, state, name, stat, values in parts:
            writer.write(_rows(step, state, name, stat, values))
        writer.close(compact=compact)


def _check_step(option: str, step: int, last: int) -> None:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= last:
        raise ValueError(f"{option} step {step!r} is outside the run's steps 0..{last}.")


def write_synthetic_run(
    run_dir: str | os.PathLike,
    *,
    ticks: int = 20,
    every: int = 10,
    layers: int = 8,
    norm_modules: int = 2,
    ranks: int = 1,
    amp: bool = False,
    spike: tuple[int, str, float] | None = None,
    nonfinite_step: int | None = None,
    renorm_every: int = 0,
    param_stats: Mapping[str, Sequence[str]] | None = None,
    crash: bool = False,
    seed: int = 0,
    dense: bool = False,
    loss_spike: tuple[int, float] | None = None,
    dead_layer: str | None = None,
    frozen_layer: str | None = None,
    diverge_step: int | None = None,
    norm_outlier: tuple[int, str, float] | None = None,
    converge: bool = False,
    adam_start: bool = False,
    grad_noise: float = 0.1,
    flight: bool = False,
    flight_window: int = 128,
    layer_fault: tuple[str, int, int, float] | None = None,
    flight_nan: tuple[str, int] | None = None,
    flight_exception: int | None = None,
) -> Path:
    """Write a run of ``ticks`` ticks (steps ``0, every, 2*every, ...``) over ``layers`` parameters; return its dir.

    ``spike=(step, name, factor)`` multiplies that parameter's gradient statistics at that tick;
    ``nonfinite_step`` makes that step's loss NaN and one parameter's gradient infinite (and, with ``amp``,
    marks the optimizer step skipped); a step between ticks is seen in the dense series only.
    ``loss_spike=(step, factor)`` multiplies the loss by ``factor`` and each layer's gradient by a factor
    drawn log-uniformly in [10, 1400] (what a bad batch does). ``dead_layer``: that parameter's gradient
    and update are exactly 0 at every tick; ``frozen_layer``: its gradient is as usual, its update 0 (a
    parameter missing from the optimizer). ``diverge_step``: from there the learning rate is 100x, update
    ratios ~0.5, and loss and gradients grow 10x every 50 steps. ``norm_outlier=(step, module, factor)``
    multiplies that norm layer's input absmax at that tick. ``converge``: the loss falls 0.69 -> 0.01 over the
    first tenth of the run and every gradient shrinks with it. ``adam_start``: update/weight ratio ~0.1 on every layer at step 0.
    ``grad_noise``: log-normal sigma of the gradient norms (0.1 default; real runs are often nearer 0.3).
    ``param_stats`` restricts the per-parameter statistics (default ``FULL_STATS``). ``crash=True``
    leaves the parts uncompacted, as a killed run does. Ranks share gradient and weight statistics (DDP
    all-reduces gradients) and differ in loss.

    ``flight=True`` writes the flight recorder's rows (``state="flight"``: ``grad_norm`` and ``nonfinite``
    per parameter at every step of a ``flight_window``-step window ending at each event and at the last
    step, as the recorder dumps its ring buffer; ``state="flight_event"``: each event, found on rank 0's
    dense series by ``detect_spikes`` as the callback does online, z = inf for a non-finite step) and the
    manifest's ``flight`` entry. Its per-layer norms are drawn like the ticks' (same scale and noise, own
    draws). ``layer_fault=(name, start, steps, factor)`` multiplies that parameter's gradient by ``factor``
    for ``steps`` steps from ``start`` (flight rows, tick records at those steps, and the dense global
    norm as the root of a sum of squares: a small layer's fault may not move it at all).
    ``flight_nan=(name, step)``: at ``step`` that parameter's gradient and every parameter registered before
    it (later in backward order) is NaN, and so are the loss and the global gradient norm.
    ``flight_exception``: an ``exception`` event at that step (z NaN), its window dumped (the run's records
    go on: only the event is planted).
    """
    run_dir = Path(run_dir)
    names = synthetic_parameter_names(layers)
    for option, value in (("spike", spike[1] if spike else None), ("dead_layer", dead_layer),
                          ("frozen_layer", frozen_layer), ("layer_fault", layer_fault[0] if layer_fault else None),
                          ("flight_nan", flight_nan[0] if flight_nan else None)):
        if value is not None and value not in names:
            raise ValueError(f"{option} layer {value!r} is not one of the synthetic parameters {names[:4]}...")
    modules = [f"encoder.layer.{i}.output.LayerNorm" for i in range(norm_modules)]
    if norm_outlier is not None and norm_outlier[1] not in modules:
        raise ValueError(f"norm_outlier module {norm_outlier[1]!r} is not one of {modules}.")
    stats = {k: tuple(v) for k, v in (param_stats or FULL_STATS).items()}
    steps = [t * every for t in range(ticks)]
    for option, value in (("loss_spike", loss_spike[0] if loss_spike else None), ("nonfinite_step", nonfinite_step),
                          ("diverge_step", diverge_step), ("norm_outlier", norm_outlier[0] if norm_outlier else None),
                          ("layer_fault", layer_fault[1] if layer_fault else None),
                          ("flight_nan", flight_nan[1] if flight_nan else None),
                          ("flight_exception", flight_exception)):
        if value is not None:
            _check_step(option, value, steps[-1])
    total = max(steps[-1] + 1, 1)
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(1.0, 20.0, layers)
    g0 = rng.uniform(0.01, 1.0, layers)
    numel = np.where(np.arange(layers) % 2 == 0, 1024.0, 32.0)
    # planted factors from their own generator: the default run's values do not depend on the options
    spike_factors = 10.0 ** np.random.default_rng(seed + 7).uniform(1.0, np.log10(1400.0), layers)

    def base_loss(step: int) -> float:
        frac = step / total
        if converge:  # 0.69 -> 0.01 over the first tenth (log-linear), then stays there
            return 0.69 * (0.01 / 0.69) ** min(1.0, 10 * frac)
        return 0.7 * np.exp(-2 * frac) + 0.05

    def base_grad(step: int) -> np.ndarray:
        frac = step / total
        return g0 * (base_loss(step) / 0.69 if converge else 0.5 + 0.5 * np.exp(-3 * frac))

    def divergence(step: int) -> float:
        return 10.0 ** ((step - diverge_step) / 50.0) if diverge_step is not None and step >= diverge_step else 1.0

    def diverging(step: int) -> bool:
        return diverge_step is not None and step >= diverge_step

    def lr_at(step: int) -> float:
        return 1e-3 * (1.0 - step / total) * (100.0 if diverging(step) else 1.0)

    # The fixed (state, name, stat) layout of one tick, as TickCallback builds it once per fit.
    state: list[str] = []
    name: list[str] = []
    stat: list[str] = []

    def add(s: str, n: str, ss: Sequence[str]) -> None:
        state.extend([s] * len(ss))
        name.extend([n] * len(ss))
        stat.extend(ss)

    add("loss", "", ("value", "nonfinite"))
    add("lr", "group0", ("lr", "momentum"))
    if amp:
        add("amp", "", ("scale", "skipped"))
    for s in ("weight", "grad", "update"):
        for n in names:
            add(s, n, stats.get(s, ()))
    if "grad" in stats:
        add("grad", "", ("norm", "nonfinite"))
    for m in modules:
        add("norm_input", m, ("mean", "rms", "absmax"))
    add("time", "", ("step_seconds",))
    add("memory", "", ("peak_bytes",))
    renorm_names = names[::2]  # weights only
    key_index = {(s, n, st): i for i, (s, n, st) in enumerate(zip(state, name, stat))}

    # Index arrays make a tick one vectorised assignment per (state, stat) rather than a Python loop per value.
    param_slots = {
        (s, st): np.array([key_index[(s, n, st)] for n in names]) for s in stats for st in stats[s]
    }

    def put(values: np.ndarray, s: str, st: str, per_param: np.ndarray) -> None:
        if (s, st) in param_slots:
            values[param_slots[(s, st)]] = per_param

    dense_names = ("loss", "grad_norm", "update_norm")
    all_steps = np.arange(steps[-1] + 1)
    # the flight recorder's per-layer norms at every step (shared by ranks: all-reduced gradients)
    flight_clean = np.array([base_grad(s) * divergence(s) for s in all_steps]) \
        * np.exp(grad_noise * np.random.default_rng(seed + 500).standard_normal((len(all_steps), layers)))
    fault = np.ones((len(all_steps), layers))  # layer_fault's multiplier of each layer's gradient, per step
    if layer_fault is not None:
        fault[layer_fault[1]:layer_fault[1] + layer_fault[2], names.index(layer_fault[0])] = layer_fault[3]
    batch = np.ones((len(all_steps), layers))
    if loss_spike is not None:
        batch[loss_spike[0]] = spike_factors  # the bad batch reaches every layer, as at a tick
    bad_rows = np.zeros((len(all_steps), layers), dtype=bool)  # planted non-finite gradients
    if nonfinite_step is not None:
        bad_rows[nonfinite_step, -1] = True
    if flight_nan is not None:
        bad_rows[flight_nan[1], :names.index(flight_nan[0]) + 1] = True
    flight_grad = np.where(bad_rows, np.nan, flight_clean * fault * batch)
    if nonfinite_step is not None:
        flight_grad[nonfinite_step, -1] = np.inf
    parts_by_rank: list[list[tuple]] = []
    for rank in range(ranks):
        parts: list[tuple] = []
        shared = np.random.default_rng(seed + 1)  # identical on every rank: all-reduced gradients
        own = np.random.default_rng(seed + 100 + rank)
        dense_shared = np.random.default_rng(seed + 200)
        dense_own = np.random.default_rng(seed + 300 + rank)
        adam = np.random.default_rng(seed + 400)
        # the dense series of every optimizer step; tick steps are overwritten with the tick's own values
        dense_steps = np.arange(steps[-1] + 1)
        dense_loss = np.array([base_loss(s) for s in dense_steps]) + 0.01 * dense_own.standard_normal(len(dense_steps))
        dense_grad = np.array([np.sqrt(np.sum(base_grad(s) ** 2)) for s in dense_steps]) \
            * np.exp(0.5 * grad_noise * dense_shared.standard_normal(len(dense_steps)))
        dense_update = 1e-3 * np.sqrt(np.sum(w0**2)) * np.exp(0.1 * dense_shared.standard_normal(len(dense_steps)))
        growth = np.array([divergence(s) for s in dense_steps])
        dense_loss *= growth
        dense_grad *= growth
        dense_update *= np.where([diverging(s) for s in dense_steps], 500.0, 1.0)
        if loss_spike is not None:
            dense_loss[loss_spike[0]] *= loss_spike[1]
            dense_grad[loss_spike[0]] *= float(np.exp(np.mean(np.log(spike_factors))))
        if nonfinite_step is not None:
            dense_loss[nonfinite_step] = float("nan")
            dense_grad[nonfinite_step] = float("inf")
        if layer_fault is not None:  # the fault's extra energy in the global norm (a sum of squares)
            j, span = names.index(layer_fault[0]), slice(layer_fault[1], layer_fault[1] + layer_fault[2])
            dense_grad[span] = np.sqrt(dense_grad[span] ** 2 + (layer_fault[3] ** 2 - 1) * flight_clean[span, j] ** 2)
        if flight_nan is not None:
            dense_loss[flight_nan[1]] = dense_grad[flight_nan[1]] = float("nan")
        previous_tick = -1
        for t, step in enumerate(steps):
            frac = step / total
            values = np.zeros(len(stat))
            weight_norm = w0 * (1.0 + 0.05 * frac)
            grad_norm = base_grad(step) * np.exp(grad_noise * shared.standard_normal(layers))
            ratio = 1e-3 * np.exp(0.2 * shared.standard_normal(layers))
            if adam_start and step == 0:
                ratio = 0.1 * np.exp(0.1 * adam.standard_normal(layers))
            grad_nonfinite = np.zeros(layers)
            if layer_fault is not None:
                grad_norm = grad_norm * fault[step]
            if flight_nan is not None and flight_nan[1] == step:
                grad_norm[bad_rows[step]] = float("nan")
                grad_nonfinite[bad_rows[step]] = numel[bad_rows[step]]
            if spike is not None and spike[0] == step:
                grad_norm[names.index(spike[1])] *= spike[2]
            loss = base_loss(step) + 0.01 * own.standard_normal()
            if flight_nan is not None and flight_nan[1] == step:
                loss = float("nan")
            grad_norm = grad_norm * divergence(step)
            loss *= divergence(step)
            if diverging(step):
                ratio = 0.5 * np.exp(0.2 * shared.standard_normal(layers))
            if loss_spike is not None and loss_spike[0] == step:
                loss *= loss_spike[1]
                grad_norm = grad_norm * spike_factors
            if dead_layer is not None:
                grad_norm[names.index(dead_layer)] = 0.0
                ratio[names.index(dead_layer)] = 0.0
            if frozen_layer is not None:
                ratio[names.index(frozen_layer)] = 0.0
            skipped = 0.0
            if nonfinite_step is not None and nonfinite_step == step:
                loss = float("nan")
                grad_norm[-1] = float("inf")
                grad_nonfinite[-1] = numel[-1]
                if amp:
                    skipped = 1.0
                    ratio = np.zeros(layers)  # the skipped step applied no update
            values[key_index[("loss", "", "value")]] = loss
            values[key_index[("loss", "", "nonfinite")]] = float(not np.isfinite(loss))
            values[key_index[("lr", "group0", "lr")]] = lr_at(step)
            values[key_index[("lr", "group0", "momentum")]] = 0.9
            if amp:
                values[key_index[("amp", "", "scale")]] = 65536.0 / (2.0 if skipped else 1.0)
                values[key_index[("amp", "", "skipped")]] = skipped
            std = weight_norm / np.sqrt(numel)
            put(values, "weight", "norm", weight_norm)
            put(values, "weight", "mean", 0.01 * std)
            put(values, "weight", "std", std)
            put(values, "weight", "absmax", 4.0 * std)
            put(values, "weight", "nonfinite", np.zeros(layers))
            gstd = grad_norm / np.sqrt(numel)
            put(values, "grad", "norm", grad_norm)
            put(values, "grad", "mean", np.zeros(layers))
            put(values, "grad", "std", gstd)
            put(values, "grad", "absmax", 4.0 * gstd)
            put(values, "grad", "nonfinite", grad_nonfinite)
            put(values, "update", "norm", ratio * weight_norm)
            put(values, "update", "ratio", ratio)
            global_grad = float(np.sqrt(np.sum(grad_norm**2)))
            if "grad" in stats:
                values[key_index[("grad", "", "norm")]] = global_grad
                values[key_index[("grad", "", "nonfinite")]] = float(grad_nonfinite.sum())
            for m in modules:
                values[key_index[("norm_input", m, "mean")]] = 0.01 * shared.standard_normal()
                values[key_index[("norm_input", m, "rms")]] = float(np.exp(0.05 * shared.standard_normal()))
                values[key_index[("norm_input", m, "absmax")]] = float(6.0 * np.exp(0.1 * shared.standard_normal()))
                if norm_outlier is not None and norm_outlier[:2] == (step, m):
                    values[key_index[("norm_input", m, "absmax")]] *= norm_outlier[2]
            values[key_index[("time", "", "step_seconds")]] = 0.1
            values[key_index[("memory", "", "peak_bytes")]] = 1e9
            row_state, row_name, row_stat, row_values = state, name, stat, values
            if renorm_every and t > 0 and t % renorm_every == 0:
                extra_values = []
                extra_names = []
                for n in renorm_names:
                    j = names.index(n)
                    before, after = weight_norm[j], w0[j]
                    sd = np.sqrt(numel[j])
                    extra_names += [n] * 6
                    extra_values += [before, after, 0.01 * before / sd, 0.0, before / sd, after / sd]
                row_state = state + ["renorm"] * len(extra_names)
                row_name = name + extra_names
                row_stat = stat + ["norm_before", "norm_after", "mean_before", "mean_after", "std_before",
                                   "std_after"] * len(renorm_names)
                row_values = np.concatenate([values, np.asarray(extra_values)])
            row_step: int | np.ndarray = step
            if dense:  # the dense rows of the steps since the previous tick travel with this tick's copy
                dense_loss[step], dense_grad[step] = loss, global_grad
                dense_update[step] = float(np.sqrt(np.nansum((ratio * weight_norm) ** 2)))
                span = dense_steps[previous_tick + 1: step + 1]
                k = len(span)
                row_step = np.r_[np.full(len(row_values), step), np.tile(span, 3)]
                row_state = list(row_state) + ["dense"] * (3 * k)
                row_name = list(row_name) + [n for n in dense_names for _ in range(k)]
                row_stat = list(row_stat) + ["value"] * (3 * k)
                row_values = np.concatenate([row_values, dense_loss[span], dense_grad[span], dense_update[span]])
            previous_tick = step
            parts.append((row_step, row_state, row_name, row_stat, row_values))
        if flight:
            if rank == 0:  # the events, found online on rank 0's dense series
                events = _flight_events(all_steps, dense_loss, dense_grad)
                if flight_exception is not None:
                    events = sorted(events + [(flight_exception, "exception", float("nan"))])
            parts.append(_flight_part(events, flight_grad, bad_rows, names, flight_window, int(all_steps[-1])))
        parts_by_rank.append(parts)
    manifest = {
        "schedule": f"every:{every}", "precision": "16-mixed" if amp else "32-true", "world_size": ranks,
        "model_class": "SyntheticModel", "parameters": {n: ([32, int(k) // 32] if n.endswith("weight") else [int(k)])
                                                       for n, k in zip(names, numel)},
        "norm_layers": modules, "states": ["loss", "lr", *(["amp"] if amp else []), *stats, "norm_input",
                                           "time", "memory"],
        "versions": {"tick_lightning": "synthetic"},
    }
    if flight:
        manifest["flight"] = {"window": flight_window, "parameters": names, "norm_layers": modules,
                              "stats": ["grad_norm", "nonfinite"]}
    _write_records(run_dir, manifest, parts_by_rank, compact=not crash)
    return run_dir


def _rows(step: int | np.ndarray, state: list, name: list, stat: list, values: np.ndarray) -> pa.Table:
    """One synthetic part as ``records.ROW_SCHEMA`` rows (epoch 0); ``step`` one int or one per row."""
    n = len(values)
    return pa.table({"step": np.broadcast_to(np.asarray(step, dtype=np.int64), (n,)).copy(), "epoch": np.zeros(n, dtype=np.int32), "state": state,
                     "name": name, "stat": stat, "value": np.asarray(values, dtype=np.float64)}, schema=ROW_SCHEMA)


def _flight_events(steps: np.ndarray, loss: np.ndarray, grad: np.ndarray) -> list[tuple[int, str, float]]:
    """``(step, trigger, z)`` of every spike of the dense loss / global gradient norm (``detect_spikes``,
    its defaults) and every non-finite step (trigger ``nonfinite``, z = inf), as the callback finds them."""
    out: dict[tuple[int, str], float] = {}
    for trigger, values in (("loss", loss), ("grad_norm", grad)):
        for sp in detect_spikes(steps, values):
            if np.isfinite(sp.value):
                out[(sp.step, trigger)] = sp.z
            else:
                out[(sp.step, "nonfinite")] = float("inf")
    return [(s, t, z) for (s, t), z in sorted(out.items())]


def _flight_part(events: list[tuple[int, str, float]], grad: np.ndarray, bad: np.ndarray, names: list[str],
                 window: int, last: int) -> tuple:
    """One part of flight rows: each step of a ``window``-step window ending at each event and at ``last``
    (the fit-end dump) written once, every parameter's ``grad_norm`` and ``nonfinite``; then the events."""
    ends = sorted({s for s, _, _ in events} | {last})
    covered = np.unique(np.concatenate([np.arange(max(0, e - window + 1), e + 1) for e in ends]))
    k = len(names)
    step = np.repeat(covered, 2 * k)
    name = [n for _ in covered for n in names for _ in (0, 1)]
    stat = ["grad_norm", "nonfinite"] * (len(covered) * k)
    values = np.stack([grad[covered], bad[covered].astype(np.float64)], axis=-1).reshape(-1)
    step = np.r_[step, np.array([s for s, _, _ in events], dtype=np.int64)]
    return (step, ["flight"] * len(name) + ["flight_event"] * len(events), name + [t for _, t, _ in events],
            stat + ["z"] * len(events), np.r_[values, np.array([z for _, _, z in events], dtype=np.float64)])
