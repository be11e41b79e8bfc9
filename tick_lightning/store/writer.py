"""``TickWriter``: one rank's parts of one attempt, written off the training thread.

Each tick becomes its own Parquet part, written to a temporary name, fsync'd and renamed, so a reader
never sees a half-written file and a crash loses nothing already written. ``flush`` is what a checkpoint
waits for: every queued part on disk, the folder fsync'd, before the checkpoint may claim those ticks.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tick_lightning.records import ROW_SCHEMA
from tick_lightning.store.layout import PART, fsync_dir

__all__ = ["COLUMNS", "TickWriteError", "TickWriter"]

#: The columns of every record file: ``records.ROW_SCHEMA`` with who wrote the row after the epoch.
COLUMNS = pa.schema(
    list(ROW_SCHEMA)[:2]
    + [pa.field("rank", pa.int32()), pa.field("run", pa.string()), pa.field("attempt", pa.string())]
    + list(ROW_SCHEMA)[2:]
)


def write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as handle:  # the data must be on disk before the rename makes it visible
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class TickWriteError(RuntimeError):
    """The records could not be written (a full disk, a directory gone): one line naming the directory."""


class TickWriter:
    """Writes the parts of one rank of one attempt on a background thread.

    Args:
        folder: the rank's folder (``layout.rank_dir(run_dir, attempt, rank)``); created if missing.
        run, attempt, rank: the values of the ``run``, ``attempt`` and ``rank`` columns.
        background: write on a thread (the default) or synchronously (tests, tools).

    Example:
        >>> import tempfile, torch
        >>> from tick_lightning.records import Block, tick_table
        >>> w = TickWriter(tempfile.mkdtemp(), run="r", attempt="a", rank=0)
        >>> w.write(tick_table(5, 0, [Block("loss", ("",), ("value",), torch.tensor([[0.7]]).numpy())]))
        >>> w.close()
        >>> sorted(p.name for p in w.folder.iterdir())
        ['part-00000000.parquet']
    """

    def __init__(self, folder: str | os.PathLike, *, run: str, attempt: str, rank: int = 0,
                 background: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run, self.attempt, self.rank = str(run), str(attempt), int(rank)
        existing = [int(m.group(1)) for p in self.folder.iterdir() if (m := PART.match(p.name))]
        self._seq = max(existing, default=-1) + 1
        self._first_seq = self._seq
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"tick-writer-rank{self.rank}", daemon=True)
            self._thread.start()

    # -- training thread -------------------------------------------------------
    def write(self, rows: pa.Table) -> None:
        """Queue one tick's rows (``records.ROW_SCHEMA``: step, epoch, state, name, stat, value)."""
        self._raise_pending()
        item = (self._seq, rows)
        self._seq += 1
        if self._thread is None:
            self._write_item(item)
        else:
            self._queue.put(item)

    def flush(self) -> None:
        """Block until every queued part is on disk and its rename is durable."""
        if self._thread is not None:
            self._queue.join()
        self._raise_pending()
        fsync_dir(self.folder)

    def close(self, compact: bool = True) -> None:
        if self._thread is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_pending()
        if compact:
            self._compact()
        fsync_dir(self.folder)

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
        seq, rows = item
        write_atomic(self._with_origin(rows), self.folder / f"part-{seq:08d}.parquet")

    def _with_origin(self, rows: pa.Table) -> pa.Table:
        n = rows.num_rows
        return pa.table(
            {
                "step": rows["step"],
                "epoch": rows["epoch"],
                "rank": pa.array(np.full(n, self.rank, dtype=np.int32)),
                "run": pa.array([self.run] * n, type=pa.string()),
                "attempt": pa.array([self.attempt] * n, type=pa.string()),
                "state": rows["state"],
                "name": rows["name"],
                "stat": rows["stat"],
                "value": rows["value"],
            },
            schema=COLUMNS,
        )

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, OSError):
                why = f"{err.strerror or err} (errno {err.errno})" if err.errno else str(err)
                raise TickWriteError(f"tick-lightning could not write tick records to {str(self.folder)!r}: {why}; "
                                     "free space there or record elsewhere (TickCallback(dirpath=...)); the records "
                                     "written before this one are intact.") from None
            raise RuntimeError(f"tick-lightning could not write tick records to {self.folder}: {err}") from err

    def _compact(self) -> None:
        """Merge this writer's parts into one file; the parts go only once the merge reads back whole."""
        parts = sorted((int(m.group(1)), p) for p in self.folder.iterdir()
                       if (m := PART.match(p.name)) and int(m.group(1)) >= self._first_seq)
        if len(parts) < 2:
            return
        tables = [pq.read_table(p, schema=COLUMNS) for _, p in parts]
        table = pa.concat_tables(tables)
        first, last = parts[0][0], parts[-1][0]
        target = self.folder / f"compact-{first:08d}-{last:08d}.parquet"
        write_atomic(table, target)
        if pq.ParquetFile(target).metadata.num_rows != table.num_rows:  # pragma: no cover - disk lied
            raise RuntimeError(f"tick-lightning: compacted file {target} does not read back whole; parts kept")
        fsync_dir(self.folder)
        for _, p in parts:
            p.unlink(missing_ok=True)

