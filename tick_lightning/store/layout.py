"""Where the files of a tick directory live, what an attempt is, and which rows a lineage keeps.

A *tick directory* (``TickCallback(dirpath=...)``, default ``<trainer.log_dir>/ticks``) holds any number
of fit *attempts*, each in a folder of its own that no other attempt ever writes::

    <dir>/attempts/<attempt>/attempt.json                         who, when, resumed from what, the manifest
    <dir>/attempts/<attempt>/rank{R}/part-{N:08d}.parquet         one file per tick (N counts this rank's ticks)
    <dir>/attempts/<attempt>/rank{R}/compact-{A:08d}-{B:08d}.parquet  parts A..B merged at the end of the fit
    <dir>/attempts/<attempt>/snapshots/step{S:08d}-rank{R}.safetensors  optional tensor snapshots
    <dir>/attempts/<attempt>/.lock                                held (flock) while the attempt is running

Attempt names start with their UTC start time (to the microsecond), so ``ls`` lists them in order, and end
in random hex, so two processes starting at the same moment never share a folder.

The rule (``lineage``): every ``trainer.fit`` is a new attempt. A fit that does not resume from a
checkpoint starts a new *run* (its id is the attempt's). A fit that resumes from a checkpoint continues
the run that wrote the checkpoint, as a child of the attempt that wrote it, from the checkpoint's step.
The *lineage* of a run is its newest attempt and that attempt's ancestors; an ancestor keeps the rows
of the steps before its child resumed, the rows from there on are *superseded* (the child recorded
those steps again). An attempt outside the lineage (an abandoned resume) is superseded whole.
Superseded rows stay on disk; ``load_ticks(..., superseded=True)`` reads them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "SCHEMA_VERSION",
    "Attempt",
    "attempt_dir",
    "create_attempt",
    "lineage",
    "new_attempt_id",
    "rank_dir",
    "read_attempts",
]

#: Version 2: attempts/<attempt>/rank{R}/ folders, run and attempt columns (version 1: one manifest, sessions).
SCHEMA_VERSION = 2
ATTEMPTS = "attempts"
INFO = "attempt.json"
PART = re.compile(r"^part-(\d+)\.parquet$")
COMPACT = re.compile(r"^compact-(\d+)-(\d+)\.parquet$")


@dataclass(frozen=True)
class Attempt:
    """One ``trainer.fit`` that recorded into a tick directory (``attempt.json``)."""

    attempt: str
    run: str
    parent: str | None  # the attempt that wrote the checkpoint this one resumed from
    resumed_from_step: int | None  # the checkpoint's global_step; None for a fresh fit
    start_step: int
    started_ns: int
    pid: int
    host: str
    schema_version: int = SCHEMA_VERSION
    manifest: dict = field(default_factory=dict)


def new_attempt_id() -> str:
    """``20261201T194501.123456-3fa2c9d1``: sorts by start time (UTC, to the microsecond), unique across processes."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000_000))
    return f"{stamp}.{now // 1000 % 1_000_000:06d}-{secrets.token_hex(4)}"


def attempt_dir(run_dir: str | os.PathLike, attempt: str) -> Path:
    return Path(run_dir) / ATTEMPTS / attempt


def rank_dir(run_dir: str | os.PathLike, attempt: str, rank: int) -> Path:
    return attempt_dir(run_dir, attempt) / f"rank{int(rank)}"


def create_attempt(run_dir: str | os.PathLike, *, attempt: str, run: str, parent: str | None,
                   resumed_from_step: int | None, start_step: int, manifest: dict) -> Attempt:
    """Create the attempt's folder (refusing one that exists: nothing is ever overwritten) and its info."""
    info = Attempt(attempt=attempt, run=run, parent=parent, resumed_from_step=resumed_from_step,
                   start_step=int(start_step), started_ns=time.time_ns(), pid=os.getpid(),
                   host=socket.gethostname(), manifest=manifest)
    folder = attempt_dir(run_dir, attempt)
    folder.mkdir(parents=True, exist_ok=True)  # other ranks may already have made it for their parts
    if (folder / INFO).exists():
        raise FileExistsError(f"tick attempt folder {folder} already belongs to another attempt")
    tmp = folder / (INFO + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(asdict(info), handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / INFO)
    fsync_dir(folder)
    fsync_dir(folder.parent)
    return info


def fsync_dir(path: Path) -> None:
    """Make renames and new files in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def read_attempts(run_dir: str | os.PathLike, problems: list | None = None) -> list[Attempt]:
    """Every attempt of a tick directory, oldest first; an unreadable ``attempt.json`` is skipped with a warning."""
    root = Path(run_dir) / ATTEMPTS
    out = []
    for info in sorted(root.glob(f"*/{INFO}")):
        try:
            data = json.loads(info.read_text())
            out.append(Attempt(**{k: data[k] for k in Attempt.__dataclass_fields__ if k in data}))
        except Exception as err:  # noqa: BLE001 - damage is contained to this attempt, and said
            msg = f"skipping unreadable attempt info {info}: {type(err).__name__}: {err}"
            warnings.warn(msg, stacklevel=2)
            if problems is not None:
                problems.append(msg)
    return sorted(out, key=lambda a: (a.started_ns, a.attempt))


def lineage(attempts: list[Attempt], run: str) -> list[tuple[Attempt, int | None]]:
    """The run's lineage, oldest first, each attempt with the first step its child recorded again.

    ``(attempt, cutoff)``: the attempt's rows with ``step >= cutoff`` are superseded; ``None`` keeps all.
    """
    mine = [a for a in attempts if a.run == run]
    if not mine:
        return []
    by_id = {a.attempt: a for a in mine}
    chain: list[tuple[Attempt, int | None]] = []
    current, cutoff = mine[-1], None
    seen = set()
    while current is not None and current.attempt not in seen:
        seen.add(current.attempt)
        chain.append((current, cutoff))
        cutoff = current.resumed_from_step
        current = by_id.get(current.parent) if current.parent else None
    return chain[::-1]
