"""``Recorder``: what a callback needs from storage across fits -- a new attempt per fit, the run and
lineage it continues, rows written off the training thread, and durability before a checkpoint.

It knows nothing of Lightning: the callback passes its rank, the step the fit starts at and a
``broadcast`` function, and puts ``Recorder.state_dict()`` into its own checkpoint state.

Lifecycle, per ``trainer.fit``::

    recorder.reset()                  # setup(stage="fit"): a fresh fit unless a checkpoint says otherwise
    recorder.load_state_dict(state)   # only when Lightning restores the callback from a checkpoint
    recorder.start(dirpath, ...)      # on_train_start: creates the attempt (rank 0), opens the writer
    recorder.write(step, epoch, blocks)
    recorder.state_dict()             # in the callback's state_dict: flushes first (checkpoint time only)
    recorder.close()                  # end of fit (compact) or on an exception (parts stay)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tick_lightning.records import Block, tick_table
from tick_lightning.store.layout import attempt_dir, create_attempt, new_attempt_id, rank_dir, read_attempts
from tick_lightning.store.lock import AttemptLock, is_running
from tick_lightning.store.writer import TickWriter

__all__ = ["Recorder"]


class Recorder:
    """One callback's records: run identity and lineage (checkpointed), the current attempt's writer.

    Example:
        >>> import tempfile, numpy as np
        >>> from tick_lightning.records import Block
        >>> from tick_lightning.store import load_ticks
        >>> d = tempfile.mkdtemp()
        >>> rec = Recorder()
        >>> rec.reset(); rec.start(d, rank=0, start_step=0, manifest={"schedule": "every:5"})
        >>> rec.write(0, 0, [Block.scalars("loss", {"value": 0.7})])
        >>> state = rec.state_dict(); rec.close()
        >>> rec.reset(); rec.load_state_dict(state)           # a resume from that checkpoint
        >>> rec.start(d, rank=0, start_step=0, manifest={}); rec.write(0, 0, [Block.scalars("loss", {"value": 0.6})])
        >>> rec.close(); load_ticks(d).value.tolist()         # the resumed attempt supersedes step 0
        [0.6]
    """

    def __init__(self) -> None:
        self.run: str | None = None  # the run being continued (from a checkpoint), else set by start
        self.parent: str | None = None  # the attempt that wrote the restored checkpoint
        self.attempt: str | None = None
        self.run_dir: Path | None = None
        self._writer: TickWriter | None = None
        self._lock: AttemptLock | None = None

    # -- lifecycle ---------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous fit: the next ``start`` begins a new run unless ``load_state_dict`` comes first."""
        self.close(compact=False)
        self.run = self.parent = self.attempt = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run = state.get("run")
        self.parent = state.get("attempt")

    def start(self, run_dir: str | os.PathLike, *, rank: int, start_step: int, manifest: dict,
              writes: bool = True, broadcast: Callable[[Any], Any] = lambda obj: obj) -> None:
        """Begin this fit's attempt. Every rank calls it (``broadcast`` makes the attempt id rank-identical);
        global rank 0 creates the attempt's folder and info, ranks with ``writes`` open a writer."""
        resumed = self.run is not None
        attempt = broadcast(new_attempt_id())
        self.attempt, self.run_dir = attempt, Path(run_dir)
        if not resumed:
            self.run = attempt
        if rank == 0:
            create_attempt(self.run_dir, attempt=attempt, run=self.run, parent=self.parent,
                           resumed_from_step=int(start_step) if resumed else None, start_step=start_step,
                           manifest=manifest)
            self._lock = AttemptLock(attempt_dir(self.run_dir, attempt))
            # look for others only once our own attempt is visible and locked: of two fits starting at once,
            # the later to look always sees the earlier (looking first, both could miss each other)
            self._warn_about_others(resumed)
        if writes:
            self._writer = TickWriter(rank_dir(self.run_dir, attempt, rank), run=self.run, attempt=attempt, rank=rank)

    def _warn_about_others(self, resumed: bool) -> None:
        others = [a for a in read_attempts(self.run_dir) if a.attempt != self.attempt]
        running = [a for a in others if is_running(attempt_dir(self.run_dir, a.attempt))]
        if running:
            pids = ", ".join(f"attempt {a.attempt} (pid {a.pid} on {a.host})" for a in running)
            warnings.warn(f"TickCallback: another fit is recording into {str(self.run_dir)!r} right now: {pids}. "
                          "This fit records into its own attempt folder, so nothing is overwritten; give each "
                          "concurrent fit its own dirpath to keep them easy to tell apart.", stacklevel=3)
        earlier = [r for r in dict.fromkeys(a.run for a in others) if r != self.run]
        if earlier and not resumed:
            warnings.warn(f"TickCallback: {str(self.run_dir)!r} already holds tick records of run(s) "
                          f"{', '.join(earlier)}. This fit starts a new run {self.run}, kept apart: "
                          f"load_ticks(dir) reads the latest run, load_ticks(dir, run=...) another, run='all' "
                          "every one. Resume with ckpt_path=... to continue a run instead.", stacklevel=3)

    def write(self, step: int, epoch: int, blocks: Sequence[Block]) -> None:
        """Queue one tick's host blocks (after ``records.to_host``)."""
        if self._writer is not None and blocks:
            self._writer.write(tick_table(step, epoch, blocks))

    def write_rows(self, rows) -> None:
        """Queue a ``records.ROW_SCHEMA`` table whose rows carry their own steps (the dense series)."""
        if self._writer is not None and rows.num_rows:
            self._writer.write(rows)

    @property
    def snapshot_dir(self) -> Path | None:
        """Where this attempt's tensor snapshots go (inside its own folder)."""
        return None if self.attempt is None else attempt_dir(self.run_dir, self.attempt) / "snapshots"

    def flush(self) -> None:
        """Every tick queued so far on disk (fsync'd): what a checkpoint needs before it claims them."""
        if self._writer is not None:
            self._writer.flush()

    def state_dict(self) -> dict[str, Any]:
        """``{"run", "attempt"}`` for the checkpoint, after making every queued tick durable."""
        self.flush()
        return {"run": self.run, "attempt": self.attempt}

    def close(self, compact: bool = True) -> None:
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close(compact=compact)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
