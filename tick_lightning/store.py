"""Tick records on disk: one Parquet part per tick (crash-safe), a JSON manifest, and a reader.

Layout of a run directory::

    <run_dir>/manifest.json                 schema version, schedule, precision, parameters, sessions ...
    <run_dir>/rank{R}/part-{S:03d}-{N:08d}.parquet   one file per tick (session S, sequence N)
    <run_dir>/rank{R}/compact-{S:03d}-{A:08d}-{B:08d}.parquet   parts A..B merged at the end of a fit
    <run_dir>/snapshots/step{STEP:08d}-rank{R}.safetensors      optional tensor snapshots

Records are in long format, one row per value (see ``COLUMNS``). Each part is written to a temporary
name and renamed, so a reader never sees a half-written file and a crash loses nothing already written.

A *session* is one ``trainer.fit`` call. When a run resumes from a checkpoint at step ``s``, rows of
earlier sessions with ``step >= s`` were recorded after that checkpoint and are superseded: the new
session records those steps again. ``load_ticks`` drops superseded rows, so a resumed run reads as
if it had never stopped.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["COLUMNS", "SCHEMA_VERSION", "STATES", "TickWriter", "load_ticks", "read_manifest", "superseded"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

#: The states a tick can record (``TickCallback(states=...)``), in the order they are documented.
STATES = (
    "loss",  # the tick batch's loss, summed over accumulation micro-batches
    "lr",  # learning rate (and momentum / betas[0]) per param group
    "amp",  # AMP loss scale and whether the optimizer step was skipped
    "weight",  # per-parameter weight statistics (before the tick's update)
    "grad",  # per-parameter gradient statistics (after unscaling) and the global norm (name "")
    "update",  # per-parameter applied-update statistics
    "norm_input",  # mean / rms / absmax of every normalization layer's input
    "time",  # wall time of the tick step
    "memory",  # peak device memory
    "renorm",  # re-normalization before/after statistics
    "snapshot",  # safetensors snapshots of selected parameters (off by default)
)

COLUMNS = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int32()),
        ("rank", pa.int32()),
        ("session", pa.int32()),
        ("state", pa.string()),
        ("name", pa.string()),
        ("stat", pa.string()),
        ("value", pa.float64()),
    ]
)

_PART = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_COMPACT = re.compile(r"^compact-(\d+)-(\d+)-(\d+)\.parquet$")


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as handle:  # the data must be on disk before the rename makes it visible
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def build_table(step: int, epoch: int, rank: int, session: int, state, name, stat, values) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            "step": pa.array(np.full(n, step, dtype=np.int64)),
            "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
            "rank": pa.array(np.full(n, rank, dtype=np.int32)),
            "session": pa.array(np.full(n, session, dtype=np.int32)),
            "state": pa.array(state, type=pa.string()),
            "name": pa.array(name, type=pa.string()),
            "stat": pa.array(stat, type=pa.string()),
            "value": pa.array(np.asarray(values, dtype=np.float64)),
        },
        schema=COLUMNS,
    )


class TickWriter:
    """Writes tick parts for one rank on a background thread.

    ``write`` returns at once; the thread writes and renames the part. ``flush`` waits for every queued
    part; ``close`` flushes, merges this session's parts into one compact file and stops the thread.

    Example:
        >>> import tempfile, numpy as np
        >>> d = tempfile.mkdtemp()
        >>> w = TickWriter(d, rank=0, session=0)
        >>> w.write(5, 0, ["loss"], [""], ["value"], np.array([0.7]))
        >>> w.close()
        >>> float(load_ticks(d).value.iloc[0])
        0.7
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int = 0, session: int = 0, background: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.session = int(session)
        self.dir = self.run_dir / f"rank{self.rank}"
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = [int(m.group(2)) for p in self.dir.iterdir() if (m := _PART.match(p.name)) and int(m.group(1)) == self.session]
        self._seq = max(existing, default=-1) + 1
        self._first_seq = self._seq
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"tick-writer-rank{self.rank}", daemon=True)
            self._thread.start()

    # -- training thread -------------------------------------------------------
    def write(self, step: int, epoch: int, state, name, stat, values) -> None:
        """Queue one tick's rows (parallel sequences ``state``/``name``/``stat``/``values``)."""
        self._raise_pending()
        item = (self._seq, step, epoch, state, name, stat, values)
        self._seq += 1
        if self._thread is None:
            self._write_item(item)
        else:
            self._queue.put(item)

    def flush(self) -> None:
        if self._thread is not None:
            self._queue.join()
        self._raise_pending()

    def close(self, compact: bool = True) -> None:
        if self._thread is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if compact:
            self._compact()
        self._raise_pending()

    # -- writer thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write_item(item)
            except BaseException as err:  # noqa: BLE001 - surfaced on the training thread at the next write/flush
                self._error = err
            finally:
                self._queue.task_done()

    def _write_item(self, item) -> None:
        seq, step, epoch, state, name, stat, values = item
        table = build_table(step, epoch, self.rank, self.session, state, name, stat, values)
        _write_atomic(table, self.dir / f"part-{self.session:03d}-{seq:08d}.parquet")

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"tick-lightning could not write tick records to {self.dir}: {err}") from err

    def _compact(self) -> None:
        """Merge this session's parts into one file; the parts are removed only after the merge is on disk."""
        parts = sorted(
            (int(m.group(2)), p)
            for p in self.dir.iterdir()
            if (m := _PART.match(p.name)) and int(m.group(1)) == self.session and int(m.group(2)) >= self._first_seq
        )
        if len(parts) < 2:
            return
        table = pa.concat_tables([pq.read_table(p) for _, p in parts])
        first, last = parts[0][0], parts[-1][0]
        _write_atomic(table, self.dir / f"compact-{self.session:03d}-{first:08d}-{last:08d}.parquet")
        for _, p in parts:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------- manifest
def read_manifest(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_manifest(run_dir: str | os.PathLike, manifest: dict) -> None:
    path = Path(run_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def start_session(run_dir: str | os.PathLike, session: int, start_step: int, base: dict) -> dict:
    """Record session ``session`` (a fit starting at ``start_step``) in the manifest; returns the manifest."""
    manifest = read_manifest(run_dir) or {}
    manifest.update({k: v for k, v in base.items() if k != "sessions"})
    manifest["schema_version"] = SCHEMA_VERSION
    sessions = [s for s in manifest.get("sessions", []) if s["session"] != session]
    sessions.append({"session": session, "start_step": int(start_step)})
    manifest["sessions"] = sorted(sessions, key=lambda s: s["session"])
    write_manifest(run_dir, manifest)
    return manifest


# ------------------------------------------------------------------------ reading
def resolve_run_dir(path: str | os.PathLike) -> Path:
    """Accept the tick directory itself or a directory holding it under ``ticks/`` (a recipe run dir)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Tick run directory {str(path)!r} does not exist.")
    if (path / MANIFEST).exists() or any(path.glob("rank*/*.parquet")):
        return path
    if (path / "ticks").is_dir():
        return path / "ticks"
    return path


def read_checked_manifest(run_dir: Path) -> dict:
    """The run's manifest; a ``ValueError`` when its records have a schema version this code cannot read."""
    manifest = read_manifest(run_dir)
    version = manifest.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"Tick records in {str(run_dir)!r} have schema version {version!r}; this tick-lightning reads version "
            f"{SCHEMA_VERSION}. Read them with the tick-lightning version that wrote them."
        )
    return manifest


def _files(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("rank*/*.parquet"))
    covered: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for f in files:
        if m := _COMPACT.match(f.name):
            covered.setdefault((f.parent.name, int(m.group(1))), []).append((int(m.group(2)), int(m.group(3))))
    keep = []
    for f in files:
        m = _PART.match(f.name)
        if m:  # a part already merged into a compact file (crash between merge and delete)
            ranges = covered.get((f.parent.name, int(m.group(1))), [])
            if any(a <= int(m.group(2)) <= b for a, b in ranges):
                continue
        keep.append(f)
    return keep


def load_ticks(path: str | os.PathLike, *, all_sessions: bool = False, errors: list | None = None):
    """Read every tick record of a run (all ranks, all parts; a crashed run too) as a ``pandas.DataFrame``.

    Columns: ``step, epoch, rank, session, state, name, stat, value``. Rows of an earlier session
    superseded by a resume are dropped unless ``all_sessions=True``. A corrupt part is skipped with a
    warning (and appended to ``errors`` when a list is given); the rest is returned.

    Example:
        >>> df = load_ticks("lightning_logs/version_0/ticks")               # doctest: +SKIP
        >>> df[(df.state == "grad") & (df.name == "")].plot(x="step", y="value")  # doctest: +SKIP
    """

    run_dir = resolve_run_dir(path)
    manifest = read_checked_manifest(run_dir)
    tables = []
    for f in _files(run_dir):
        try:
            tables.append(pq.read_table(f, schema=COLUMNS))
        except Exception as err:  # noqa: BLE001 - corrupt or truncated part: use the rest, say which one
            msg = f"skipping unreadable tick part {f}: {type(err).__name__}: {err}"
            warnings.warn(msg, stacklevel=2)
            if errors is not None:
                errors.append(msg)
    if not tables:
        raise FileNotFoundError(
            f"No tick records found in {str(run_dir)!r} (expected rank*/part-*.parquet files written by TickCallback)."
        )
    df = pa.concat_tables(tables).to_pandas()
    if not all_sessions:
        df = df[~superseded(df["step"].to_numpy(), df["session"].to_numpy(), manifest)]
    # integer keys only: within a step and rank, rows keep the order they were recorded in
    return df.sort_values(["step", "rank"], kind="stable").reset_index(drop=True)


def superseded(step: np.ndarray, session: np.ndarray, manifest: dict) -> np.ndarray:
    """Mask of rows recorded after the checkpoint a later session resumed from (they were recorded again).

    A row of session ``k`` at ``step`` is superseded when a session ``j > k`` started at a step ``<= step``.
    """
    later_start = np.full(len(step), np.iinfo(np.int64).max, dtype=np.int64)
    for entry in manifest.get("sessions", []):
        later_start = np.where(session < entry["session"], np.minimum(later_start, entry["start_step"]), later_start)
    return step >= later_start
