"""Tick records on disk: attempts kept apart, lineages resolved on reading, nothing overwritten.

- ``layout``: the folders and file names, what an attempt is, the lineage rule (read its docstring).
- ``writer``: one rank's Parquet parts of one attempt, off the training thread, atomic and durable.
- ``lock``: which attempts are running now (to say so when two processes share a directory).
- ``recorder``: a callback's view -- one attempt per fit, run/lineage in the checkpoint, flush before it.
- ``reader``: ``load_ticks``, ``list_runs``, ``read_manifest``.

Example:
    >>> import tempfile
    >>> from tick_lightning.records import Block
    >>> d = tempfile.mkdtemp()
    >>> rec = Recorder(); rec.reset(); rec.start(d, rank=0, start_step=0, manifest={})
    >>> rec.write(0, 0, [Block.scalars("loss", {"value": 0.7})]); rec.close()
    >>> load_ticks(d)[["step", "state", "stat", "value"]].values.tolist()
    [[0, 'loss', 'value', 0.7]]
"""

from tick_lightning.records import STATES
from tick_lightning.store.layout import SCHEMA_VERSION, Attempt, lineage, read_attempts
from tick_lightning.store.reader import (
    RecordFile,
    TickRecordsError,
    has_records,
    list_runs,
    load_dense,
    load_flight,
    load_guard,
    load_ticks,
    read_manifest,
    read_records,
    record_files,
    resolve_run_dir,
)
from tick_lightning.store.recorder import Recorder
from tick_lightning.store.writer import COLUMNS, TickWriteError, TickWriter

__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "STATES",
    "Attempt",
    "RecordFile",
    "Recorder",
    "TickRecordsError",
    "TickWriteError",
    "TickWriter",
    "has_records",
    "lineage",
    "list_runs",
    "load_dense",
    "load_flight",
    "load_guard",
    "load_ticks",
    "read_attempts",
    "read_manifest",
    "read_records",
    "record_files",
    "resolve_run_dir",
]
