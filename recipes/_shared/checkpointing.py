"""Checkpoints during training: the ``checkpoint`` config group and :class:`RunCheckpoint`, which writes
``<run_dir>/checkpoints/last.ckpt`` every N optimizer steps and/or a time interval, and at the end
(``--ckpt_path last`` resumes from it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from recipes._shared.errors import RecipeError


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` config group: when ``<run_dir>/checkpoints/last.ckpt`` is written during training.

    It is written every ``every_n_train_steps`` optimizer steps, every ``train_time_interval`` (whichever comes
    first; either can be ``null``), and when training ends. ``--ckpt_path last`` resumes from it.
    """

    every_n_train_steps: Optional[int] = 500
    train_time_interval: Optional[timedelta] = timedelta(minutes=30)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing only ``last.ckpt``: every N optimizer steps and/or time interval, and at the end.

    Lightning's ``ModelCheckpoint`` with ``save_top_k=0`` writes ``last.ckpt`` only when a top-k checkpoint was
    written at the same step, or at ``on_train_end`` when no ``last.ckpt`` was written before (so a run killed
    before its end has none, and a run that saved at step 500 of 600 ends with the step-500 one). Here the step
    and time triggers save ``last.ckpt`` directly (``on_train_batch_end`` saves last after top-k either way), and
    the end of training always saves the final state.

    Example:
        >>> RunCheckpoint("runs/x/checkpoints", every_n_train_steps=100).save_last
        True
    """

    def __init__(self, dirpath: Union[str, os.PathLike], every_n_train_steps: Optional[int] = None,
                 train_time_interval: Optional[timedelta] = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise RecipeError(f"--checkpoint.every_n_train_steps={every_n_train_steps} must be >= 1, or null to "
                              "save only on the time interval and at the end.")
        if train_time_interval is not None and train_time_interval.total_seconds() <= 0:
            raise RecipeError(f"--checkpoint.train_time_interval={train_time_interval} must be positive (e.g. "
                              "0:30:00), or null.")
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         train_time_interval=None if every_n_train_steps else train_time_interval)
        # Lightning's __init__ accepts one trigger, but its on_train_batch_end saves when either one fires. The
        # attribute is private: fail loudly if a Lightning release renames it, instead of never saving on time
        if "_train_time_interval" not in vars(self):
            raise RuntimeError("RunCheckpoint: this Lightning's ModelCheckpoint has no _train_time_interval; "
                               "pass only one of every_n_train_steps / train_time_interval.")
        self._train_time_interval = train_time_interval

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips fast_dev_run and a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
