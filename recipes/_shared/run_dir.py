"""Where a run's files go, and which run ``--ckpt_path last`` continues.

Run directory (``--run_dir``, default ``<--trainer.default_root_dir or runs>/<recipe>-<YYYYmmdd-HHMMSS>``)::

    config.yaml      the resolved config (re-run it with --config)
    ticks/           TickCallback records (tick_lightning.store.load_ticks reads them)
    checkpoints/     Lightning checkpoints (last.ckpt; resume with --ckpt_path last)
    metrics.json     final validation / test metrics
    model/           save_pretrained of the Hugging Face model (+ tokenizer or image processor)
    report/          the tick report (tick_lightning.report)
    logs/            logger output
"""

from __future__ import annotations

import datetime as _dt
import glob
import os
from pathlib import Path
from typing import Optional, Union

from recipes._shared.errors import RecipeError

#: rank 0 exports its run directory here; the ranks Lightning's DDP launcher starts later inherit it
RUN_DIR_ENV = "TICK_LIGHTNING_RUN_DIR"


#: checkpoint path values Lightning resolves itself (``trainer.fit(ckpt_path=...)``)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def default_run_dir(recipe: str, root: Union[str, os.PathLike, None] = None) -> str:
    """``<root>/<recipe>-<YYYYmmdd-HHMMSS>``; ``root`` is ``--trainer.default_root_dir``, else ``runs``.

    Lightning's DDP launcher re-runs the command once per extra local rank, seconds later: those ranks
    (``LOCAL_RANK`` > 0) take the directory rank 0 chose instead of a timestamp of their own.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    return os.path.join(root or "runs", f"{recipe}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def latest_run_dir(recipe: str, root: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """The newest ``<root>/<recipe>-*`` run directory that holds a ``checkpoints/last*.ckpt`` (None if none).

    ``--ckpt_path last`` without ``--run_dir`` continues this run.
    """
    found = glob.glob(os.path.join(glob.escape(str(root or "runs")), glob.escape(recipe) + "-*", "checkpoints",
                                   "last*.ckpt"))
    if not found:
        return None
    return str(Path(max(found, key=os.path.getmtime)).parent.parent)


def resolve_run_dir(recipe: str, run_dir: Optional[str], default_root_dir: Optional[str],
                    ckpt_path: Optional[str]) -> Path:
    """The run directory of this invocation: ``--run_dir``; else, with ``--ckpt_path last``, the latest run of
    this recipe under the root (``--trainer.default_root_dir`` or ``runs``); else a new timestamped one there."""
    if run_dir:
        return Path(run_dir)
    if ckpt_path == "last" and os.environ.get("LOCAL_RANK", "0") == "0":
        latest = latest_run_dir(recipe, default_root_dir)
        if latest is not None:
            return Path(latest)
    return Path(default_run_dir(recipe, default_root_dir))


def check_ckpt_path(ckpt_path: Optional[str], run_dir: Path) -> None:
    """Refuse a ``--ckpt_path`` file that does not exist (``last``/``best``/``hpc`` are Lightning's to resolve)."""
    if ckpt_path in (None, "", *SPECIAL_CKPT_PATHS) or "://" in str(ckpt_path) or os.path.exists(ckpt_path):
        return
    raise RecipeError(f"--ckpt_path={ckpt_path!r} does not exist; pass an existing checkpoint, or --ckpt_path=last "
                      f"to resume the latest checkpoint of the run directory ({run_dir / 'checkpoints'}).")
