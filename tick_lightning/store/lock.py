"""Which attempts of a tick directory are running right now: each running attempt holds a ``flock``.

The kernel drops the lock when the process ends, however it ends (``kill -9`` included), so a lock that
can be taken means the attempt is over. Used to tell a user that two processes write one directory; the
attempts' own folders already keep their records apart. Where ``fcntl`` is missing (Windows) nothing is
detected.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["AttemptLock", "is_running"]

LOCK = ".lock"


class AttemptLock:
    """Held from an attempt's start to its end (``release``)."""

    def __init__(self, folder: Path) -> None:
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        self._fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        # blocking: the folder is fresh, but another fit's is_running may hold a shared lock on the file for an
        # instant (it probes every attempt); a non-blocking request would fail this fit's start on that instant
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def is_running(folder: Path) -> bool:
    """Whether the attempt in ``folder`` holds its lock now (its process is alive and has not finished)."""
    path = folder / LOCK
    if fcntl is None or not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops a shared lock we may have taken
    return False
