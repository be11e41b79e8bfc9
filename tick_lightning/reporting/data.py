"""Load a tick run for the report: the records it plots, as compact arrays, plus what went wrong reading it.

Why not ``load_ticks`` directly: a large run (10,000 ticks x 1,000 parameters x several statistics) is
tens of millions of rows, and ``load_ticks`` returns every column of every row sorted with string keys.
The report needs a handful of (state, stat) pairs, so it reads with dictionary-encoded strings, keeps only
those rows, and pivots with integer codes. It uses the store's own file list (``record_files``: parts already
merged into a compact file are skipped) and the same lineage rule as ``load_ticks``; a test
checks both readers agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tick_lightning.guard.spec import GUARD_STATS
from tick_lightning.records import flight_columns
from tick_lightning.store import COLUMNS, read_manifest, read_records, record_files, resolve_run_dir
from tick_lightning.store.layout import PART, attempt_dir

__all__ = ["REPORT_STATS", "ReportInputError", "RunData", "load_run"]

#: The (state, stat) pairs the report reads; everything else in the records is left on disk.
REPORT_STATS: frozenset[tuple[str, str]] = frozenset(
    [("loss", "value"), ("loss", "nonfinite"), ("lr", "lr"), ("amp", "scale"), ("amp", "skipped"),
     ("grad", "norm"), ("grad", "nonfinite"), ("weight", "norm"), ("weight", "nonfinite"),
     ("update", "ratio"), ("norm_input", "mean"), ("norm_input", "rms"), ("norm_input", "absmax"),
     ("dense", "value"), ("flight_event", "z")]
    + [("flight", s) for s in ("grad_norm", "nonfinite", "update_norm", "input_absmax", "attn_logit")]
    + [("renorm", s) for s in ("norm_before", "norm_after", "mean_before", "mean_after", "std_before", "std_after")]
    + [("guard", s) for s in GUARD_STATS]
    + [("metric", "value")]
)
#: States the report reads whole (every stat): the histograms' bins
REPORT_STATES = frozenset({"grad_hist", "weight_hist"})
# Statistics that count or flag events: merged over ranks with max (an event on any rank is an event).
_MAX_STATS = frozenset({"nonfinite", "skipped"})


class ReportInputError(ValueError):
    """A run directory the report cannot use (no records, unknown schema version)."""


@dataclass
class RunData:
    """The records of one run, ready to plot.

    ``records`` has columns ``step`` (int64), ``rank`` (int32), ``state``/``name``/``stat`` (categorical)
    and ``value`` (float64); superseded rows of resumed runs are already dropped. The dense per-step
    series (``state="dense"``) are not in ``records`` (their steps are not ticks): ``dense`` maps each
    series name (``loss``, ``grad_norm``, ``update_norm``) to a step-indexed Series, ranks merged by mean
    (a non-finite value on any rank stays non-finite).

    The flight recorder's rows (``state="flight"``: every step of a window around each event, per
    parameter; ``state="flight_event"``: the events) are not in ``records`` either (their steps are not
    ticks): ``flight`` maps each flight statistic (``grad_norm``, ``nonfinite``, optional ``update_norm``,
    ``input_absmax``) to a step x name table (columns in the manifest's ``flight.parameters`` /
    ``flight.norm_layers`` order when it has them), ranks merged by max for ``nonfinite`` (a non-finite
    gradient on any rank is one) and ``input_absmax`` (each rank's own batches), by mean for the gradient
    and update norms (under DDP every rank holds the same all-reduced gradient); a non-finite value on any
    rank stays non-finite; ``flight_events`` has one row
    per (step, trigger) with columns ``step``, ``trigger``, ``z`` (the largest z over ranks).

    The guard's interventions (``state="guard"``, ``TickCallback(guard=...)``) are not in ``records`` either:
    ``guard`` is indexed by the steps it acted on, one column per ``tick_lightning.guard.GUARD_STATS`` entry plus
    ``tensors`` (the names of the tensors a per-tensor clip scaled) and ``tensor_factor`` (the smallest of their
    factors); its decisions are the same on every rank, so
    the lowest rank's rows stand for all. ``metrics`` (``state="metric"``: what the module logged, at each
    validation of the fit) is step x metric name, rank 0's.
    """

    run_dir: Path
    manifest: dict
    records: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    finished: bool = True
    rank: int | None = None  # None: all ranks, merged
    dense: dict[str, pd.Series] = field(default_factory=dict)
    flight: dict[str, pd.DataFrame] = field(default_factory=dict)
    flight_events: pd.DataFrame = field(default_factory=lambda: _no_events())
    guard: pd.DataFrame = field(default_factory=lambda: _no_guard())
    metrics: pd.DataFrame = field(default_factory=lambda: _no_guard())

    @property
    def ranks(self) -> list[int]:
        return sorted(int(r) for r in self.records["rank"].unique())

    # Integer indexes built once: every view below is integer work on tens of millions of rows.
    @cached_property
    def _step_index(self) -> tuple[np.ndarray, np.ndarray]:
        steps, code = np.unique(self.records["step"].to_numpy(), return_inverse=True)
        return steps, code.astype(np.int64)

    @cached_property
    def _key(self) -> np.ndarray:
        n_stat = len(self.records["stat"].cat.categories)
        return self.records["state"].cat.codes.to_numpy().astype(np.int64) * n_stat + \
            self.records["stat"].cat.codes.to_numpy()

    def _index(self, state: str, stat: str | None = None) -> np.ndarray:
        states, stats = self.records["state"].cat.categories, self.records["stat"].cat.categories
        if state not in states or (stat is not None and stat not in stats):
            return np.zeros(0, dtype=np.int64)
        s = states.get_loc(state)
        if stat is None:
            return np.flatnonzero(self.records["state"].cat.codes.to_numpy() == s)
        return np.flatnonzero(self._key == s * len(stats) + stats.get_loc(stat))

    @property
    def steps(self) -> np.ndarray:
        return self._step_index[0]

    def has(self, state: str, stat: str | None = None) -> bool:
        return len(self._index(state, stat)) > 0

    def rows(self, state: str, stat: str) -> pd.DataFrame:
        return self.records.iloc[self._index(state, stat)]

    def wide(self, state: str, stat: str, names: Iterable[str] | None = None) -> pd.DataFrame:
        """``state/stat`` as a step x name table (model order). Ranks are merged: max for event counts, else mean.

        Example:
            >>> grad = run.wide("grad", "norm")          # doctest: +SKIP
            >>> grad.loc[100, "encoder.layer.0.mlp.weight"]  # doctest: +SKIP
        """
        idx = self._index(state, stat)
        categories = self.records["name"].cat.categories
        name_codes = self.records["name"].cat.codes.to_numpy()[idx]
        if names is None:
            present = np.bincount(name_codes, minlength=len(categories)) > 0 if len(idx) else np.zeros(0, bool)
            names = [n for n, p in zip(categories, present) if p and n != ""]
        names = list(names)
        # category code -> column (-1: not asked for)
        lookup = np.full(len(categories), -1, dtype=np.int64)
        position = {n: i for i, n in enumerate(names)}
        for code, category in enumerate(categories):
            lookup[code] = position.get(category, -1)
        name_code = lookup[name_codes] if len(idx) else np.zeros(0, dtype=np.int64)
        keep = name_code >= 0
        idx, name_code = idx[keep], name_code[keep]
        if len(idx) == 0:
            return pd.DataFrame(index=pd.Index([], name="step", dtype=np.int64), columns=names, dtype=float)
        all_steps, all_codes = self._step_index
        code = all_codes[idx]
        present = np.bincount(code, minlength=len(all_steps)) > 0  # this state's ticks (state_ticks differ)
        steps = all_steps[present]
        step_code = (np.cumsum(present) - 1)[code]
        values = self.records["value"].to_numpy(np.float64)[idx]
        flat = step_code.astype(np.int64) * len(names) + name_code
        size = len(steps) * len(names)
        if stat in _MAX_STATS:
            out = np.full(size, np.nan)
            order = np.argsort(flat, kind="stable")
            f, v = flat[order], values[order]
            starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
            out[f[starts]] = np.fmax.reduceat(v, starts)
        else:
            counts = np.bincount(flat, minlength=size).astype(np.float64)
            sums = np.bincount(flat, weights=values, minlength=size)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        return pd.DataFrame(out.reshape(len(steps), len(names)), index=pd.Index(steps, name="step"), columns=names)

    def scalar(self, state: str, name: str, stat: str, per_rank: bool = False) -> pd.DataFrame | pd.Series:
        """One global value over steps: a Series (ranks merged), or a step x rank table with ``per_rank``."""
        r = self.rows(state, stat)
        r = r[r["name"] == name]
        if per_rank:
            return r.pivot_table(index="step", columns="rank", values="value", aggfunc="mean", dropna=False)
        agg = "max" if stat in _MAX_STATS else "mean"
        return r.groupby("step")["value"].agg(agg)


def _read_part(path: Path) -> pa.Table:
    table = pq.read_table(path, columns=["step", "rank", "state", "name", "stat", "value"],
                          read_dictionary=["state", "name", "stat"])
    for col in ("step", "rank", "value"):
        if not table.schema.field(col).type.equals(COLUMNS.field(col).type):
            raise TypeError(f"column {col!r} has type {table.schema.field(col).type}, expected {COLUMNS.field(col).type}")
    # Keep the wanted (state, stat) pairs with a lookup table over the two dictionaries' indices:
    # integer work per row, strings only per distinct value.
    masks = []
    for state, stat in zip(table["state"].chunks, table["stat"].chunks):
        states, stats = state.dictionary.to_pylist(), stat.dictionary.to_pylist()
        lut = np.array([[(a, b) in REPORT_STATS or a in REPORT_STATES for b in stats] for a in states],
                       dtype=bool).reshape(len(states), len(stats))
        si = state.indices.to_numpy(zero_copy_only=False)
        ki = stat.indices.to_numpy(zero_copy_only=False)
        masks.append(lut[si, ki] if len(si) else np.zeros(0, dtype=bool))
    return table.filter(pa.chunked_array(masks, type=pa.bool_()))


def _finished(run_dir: Path, manifest: dict) -> bool:
    """The newest attempt of the run reached the end of its fit: none of its rank folders has loose parts."""
    folder = attempt_dir(run_dir, manifest["attempt"]) if manifest.get("attempt") else None
    if folder is None:
        return True
    return not any(PART.match(p.name) for rank_dir in folder.glob("rank*") for p in rank_dir.iterdir())


def load_run(run_dir: str | os.PathLike, rank: int | None = None, run: str | None = None) -> RunData:
    """Read a tick run directory (or a recipe run directory holding ``ticks/``) for the report.

    Raises ``ReportInputError`` for a directory with no tick records or an unknown schema version. A corrupt
    part is skipped and described in ``RunData.problems``; the rest is used.

    Example:
        >>> import tempfile
        >>> from tick_lightning.reporting.synthetic import write_synthetic_run
        >>> run = load_run(write_synthetic_run(tempfile.mkdtemp(), ticks=3, layers=2))
        >>> run.steps.tolist(), run.wide("grad", "norm").shape
        ([0, 10, 20], (3, 2))
    """
    try:
        path = resolve_run_dir(run_dir)
    except FileNotFoundError as err:
        raise ReportInputError(str(err)) from None
    problems: list[str] = []
    try:
        manifest = read_manifest(path, run=run)
        files, _ = record_files(path, run, problems=problems)
    except ValueError as err:
        raise ReportInputError(str(err)) from None
    tables, _ = read_records(files, read=_read_part, problems=problems)
    tables = [t.filter(pc.invert(t["superseded"])).drop_columns("superseded") for t in tables]
    if rank is not None:
        tables = [t.filter(pc.equal(t["rank"], rank)) for t in tables]
    if not tables or sum(t.num_rows for t in tables) == 0:
        what = f" for rank {rank}" if rank is not None else ""
        raise ReportInputError(
            f"No tick records{what} in {str(path)!r}: expected attempts/*/rank*/*.parquet files "
            "written by TickCallback (is this the run's ticks/ directory, and did the run reach its first tick?)."
            + (f" Unreadable: {'; '.join(problems)}" if problems else "")
        )
    table = pa.concat_tables(tables).unify_dictionaries()
    df = table.to_pandas()
    for col in ("state", "name", "stat"):
        if not isinstance(df[col].dtype, pd.CategoricalDtype):
            df[col] = df[col].astype("category")
    is_dense = (df["state"] == "dense").to_numpy()
    is_flight = (df["state"] == "flight").to_numpy()
    is_event = (df["state"] == "flight_event").to_numpy()
    is_guard = (df["state"] == "guard").to_numpy()
    is_metric = (df["state"] == "metric").to_numpy()
    metrics = _metric_table(df[is_metric])
    dense = _dense_series(df[is_dense])
    flight = _flight_tables(df[is_flight], manifest.get("flight") or {})
    events = _flight_events(df[is_event])
    guard = _guard_table(df[is_guard])
    df = df[~(is_dense | is_flight | is_event | is_guard | is_metric)].reset_index(drop=True)
    df["state"] = df["state"].cat.remove_unused_categories()
    return RunData(run_dir=path, manifest=manifest, records=df, problems=problems,
                   finished=_finished(path, manifest), rank=rank, dense=dense, flight=flight,
                   flight_events=events, guard=guard, metrics=metrics)


def _dense_series(rows: pd.DataFrame) -> dict[str, pd.Series]:
    """Per name, the mean over ranks at each step; a sum (not a NaN-skipping mean) keeps non-finite values."""
    out = {}
    for name, group in rows.groupby("name", observed=True):
        steps, code = np.unique(group["step"].to_numpy(), return_inverse=True)
        sums = np.bincount(code, weights=group["value"].to_numpy(np.float64), minlength=len(steps))
        counts = np.bincount(code, minlength=len(steps))
        out[str(name)] = pd.Series(sums / counts, index=pd.Index(steps, name="step"), name=str(name))
    return out


def _no_events() -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series([], dtype=np.int64), "trigger": pd.Series([], dtype=object),
                         "column": pd.Series([], dtype=np.int64), "z": pd.Series([], dtype=np.float64)})


def _flight_tables(rows: pd.DataFrame, flight_manifest: dict) -> dict[str, pd.DataFrame]:
    """Per flight statistic, a step x name table; ranks merged (max for ``nonfinite``, ``input_absmax``, ``attn_logit``,
    else a mean; both keep non-finite values); columns in the manifest's registration order, unknown names
    after them."""
    out: dict[str, pd.DataFrame] = {}
    for stat, group in rows.groupby("stat", observed=True):
        stat = str(stat)
        values = group["value"].astype(np.float64)
        keys = [group["step"].to_numpy(), group["name"].astype(str).to_numpy()]
        # input_absmax / attn_logit are each rank's own batches' max (never gathered): over the ranks, their max
        largest = stat in _MAX_STATS or stat in ("input_absmax", "attn_logit")
        merged = values.groupby(keys).max() if largest else values.groupby(keys).sum() / values.groupby(keys).count()
        if stat not in _MAX_STATS:  # count() and max() skip NaN: a NaN on one rank must stay NaN
            nan = values.isna().groupby(keys).any()
            merged[nan.to_numpy()] = np.nan
        wide = merged.unstack()
        wide.index = pd.Index(wide.index.astype(np.int64), name="step")
        known = flight_columns(flight_manifest, stat)
        columns = [n for n in known if n in wide.columns] + [n for n in wide.columns if n not in set(known)]
        out[stat] = wide[columns].sort_index()
    return out


def _no_guard() -> pd.DataFrame:
    return pd.DataFrame(index=pd.Index([], name="step", dtype=np.int64))


def _guard_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The steps the guard acted on: its step row's statistics wide, plus the names of the tensors it scaled."""
    if rows.empty:
        return _no_guard()
    rows = rows[rows["rank"] == rows["rank"].min()]
    step_rows = rows[rows["name"] == ""]
    wide = step_rows.pivot_table(index="step", columns="stat", values="value", aggfunc="first", dropna=False,
                                 observed=True)
    wide.columns = [str(c) for c in wide.columns]
    wide.index = pd.Index(wide.index.astype(np.int64), name="step")
    named = rows[(rows["name"] != "") & (rows["stat"] == "factor")]
    tensors = named.groupby("step")["name"].agg(lambda names: [str(n) for n in names])
    smallest = named.groupby("step")["value"].min()
    wide["tensors"] = [tensors.get(step, []) for step in wide.index]
    wide["tensor_factor"] = [float(smallest.get(step, np.nan)) for step in wide.index]
    return wide.sort_index()


def _metric_table(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return _no_guard()
    rows = rows[rows["rank"] == rows["rank"].min()]
    wide = rows.pivot_table(index="step", columns="name", values="value", aggfunc="last", observed=True)
    wide.columns = [str(c) for c in wide.columns]
    wide.index = pd.Index(wide.index.astype(np.int64), name="step")
    return wide.sort_index()


def _flight_events(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, trigger, column): an event seen on several ranks (or written twice) is one event;
    ``column`` -1 for a run-level event, else the layer's column (``<trigger>@<column>`` in the records)."""
    if rows.empty:
        return _no_events()
    names = rows["name"].astype(str).str.split("@", n=1, expand=True).reindex(columns=[0, 1])
    frame = pd.DataFrame({"step": rows["step"].to_numpy(np.int64), "trigger": names[0].to_numpy(),
                          "column": pd.to_numeric(names[1], errors="coerce").fillna(-1).astype(np.int64).to_numpy(),
                          "z": rows["value"].to_numpy(np.float64)})
    events = frame.groupby(["step", "trigger", "column"], as_index=False, sort=True)["z"].max()  # NaN stays NaN
    return events.reset_index(drop=True)
