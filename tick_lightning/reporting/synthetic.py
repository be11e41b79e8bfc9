"""Synthetic tick runs written with ``TickWriter``: the exact record schema, with anomalies planted on request.

Used by the report's tests, its scale benchmark and the documentation examples, so that a report can be
produced (and checked) without training a model. Values follow what a healthy fine-tuning run looks like:
gradient norms decaying slowly with 10% log-normal noise, update/weight ratios around 1e-3, normalization
inputs with RMS about 1.

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
) -> Path:
    """Write a run of ``ticks`` ticks (steps ``0, every, 2*every, ...``) over ``layers`` parameters; return its dir.

    ``spike=(step, name, factor)`` multiplies that parameter's gradient statistics at that tick;
    ``nonfinite_step`` makes that tick's loss NaN and one parameter's gradient infinite (and, with ``amp``,
    marks the optimizer step skipped). ``param_stats`` restricts the per-parameter statistics (default
    ``FULL_STATS``). ``crash=True`` leaves the parts uncompacted, as a killed run does. Ranks share gradient
    and weight statistics (DDP all-reduces gradients) and differ in loss.
    """
    run_dir = Path(run_dir)
    names = synthetic_parameter_names(layers)
    if spike is not None and spike[1] not in names:
        raise ValueError(f"spike layer {spike[1]!r} is not one of the synthetic parameters {names[:4]}...")
    modules = [f"encoder.layer.{i}.output.LayerNorm" for i in range(norm_modules)]
    stats = {k: tuple(v) for k, v in (param_stats or FULL_STATS).items()}
    steps = [t * every for t in range(ticks)]
    total = max(steps[-1] + 1, 1)
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(1.0, 20.0, layers)
    g0 = rng.uniform(0.01, 1.0, layers)
    numel = np.where(np.arange(layers) % 2 == 0, 1024.0, 32.0)

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

    attempt = new_attempt_id()
    create_attempt(run_dir, attempt=attempt, run=attempt, parent=None, resumed_from_step=None, start_step=0, manifest={
        "schedule": f"every:{every}", "precision": "16-mixed" if amp else "32-true", "world_size": ranks,
        "model_class": "SyntheticModel", "parameters": {n: ([32, int(k) // 32] if n.endswith("weight") else [int(k)])
                                                        for n, k in zip(names, numel)},
        "versions": {"tick_lightning": "synthetic"},
    })
    for rank in range(ranks):
        writer = TickWriter(rank_dir(run_dir, attempt, rank), run=attempt, attempt=attempt, rank=rank)
        shared = np.random.default_rng(seed + 1)  # identical on every rank: all-reduced gradients
        own = np.random.default_rng(seed + 100 + rank)
        for t, step in enumerate(steps):
            frac = step / total
            values = np.zeros(len(stat))
            weight_norm = w0 * (1.0 + 0.05 * frac)
            grad_norm = g0 * (0.5 + 0.5 * np.exp(-3 * frac)) * np.exp(0.1 * shared.standard_normal(layers))
            ratio = 1e-3 * np.exp(0.2 * shared.standard_normal(layers))
            grad_nonfinite = np.zeros(layers)
            if spike is not None and spike[0] == step:
                grad_norm[names.index(spike[1])] *= spike[2]
            loss = 0.7 * np.exp(-2 * frac) + 0.05 + 0.01 * own.standard_normal()
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
            values[key_index[("lr", "group0", "lr")]] = 1e-3 * (1.0 - frac)
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
            if "grad" in stats:
                values[key_index[("grad", "", "norm")]] = float(np.sqrt(np.sum(grad_norm**2)))
                values[key_index[("grad", "", "nonfinite")]] = float(grad_nonfinite.sum())
            for m in modules:
                values[key_index[("norm_input", m, "mean")]] = 0.01 * shared.standard_normal()
                values[key_index[("norm_input", m, "rms")]] = float(np.exp(0.05 * shared.standard_normal()))
                values[key_index[("norm_input", m, "absmax")]] = float(6.0 * np.exp(0.1 * shared.standard_normal()))
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
            writer.write(_rows(step, row_state, row_name, row_stat, row_values))
        writer.close(compact=not crash)
    return run_dir


def _rows(step: int, state: list, name: list, stat: list, values: np.ndarray) -> pa.Table:
    """One synthetic tick as ``records.ROW_SCHEMA`` rows (epoch 0)."""
    n = len(values)
    return pa.table({"step": np.full(n, step, dtype=np.int64), "epoch": np.zeros(n, dtype=np.int32), "state": state,
                     "name": name, "stat": stat, "value": np.asarray(values, dtype=np.float64)}, schema=ROW_SCHEMA)
