"""``TickTrainerCallback``: the ticks, dense series and flight recorder of ``TickCallback`` from a Hugging Face
``transformers.Trainer``, read by the same ``load_ticks`` and ``tick-lightning report``.

Usage (the same arguments as ``TickCallback``)::

    from transformers import Trainer
    from tick_lightning.hf import TickTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[TickTrainerCallback(ticks="every:50")])
    trainer.train()          # records in <args.output_dir>/ticks unless dirpath= is given

**How it maps the Trainer's loop** (transformers 5: ``Trainer._run_epoch``) onto ``TickCallback``'s hooks, so that
each statistic means what it means under Lightning (docs/getting-started.md, "Step semantics"):

* a micro-batch's ``training_step`` -> ``on_train_batch_start`` before it and ``on_train_batch_end`` after it with
  the loss it back-propagated (already divided by the accumulation steps, as Lightning's); the last micro-batch of
  an optimizer step ends after the step (``on_step_end``: ``state.global_step`` has moved);
* the gradients are read when the accelerator has **unscaled** them (``Accelerator.unscale_gradients``, which the
  Trainer calls inside its gradient clipping, and inside its norm computation when ``max_grad_norm`` is 0) and
  **before** it clips them: statistics are pre-clip, as in Lightning (``on_before_optimizer_step``). No Trainer
  callback event sees them there (``on_pre_optimizer_step`` comes after the clipping), so the adapter wraps that
  one method of the Trainer's accelerator for the fit and restores it at its end; likewise the Trainer's
  ``training_step``. The Trainer is the one whose loop calls ``on_train_begin``.

**Checkpoints**: when the Trainer is about to save ``checkpoint-<step>`` (``control.should_save`` at the step's or
epoch's end), every record up to that step is flushed to disk and the adapter's state (the record lineage, the last
tick, the spike watch) is written into that folder first (``tick_lightning.pt``, atomically). A resume
(``trainer.train(resume_from_checkpoint=...)``) continues from it: every tick exactly once, what a killed attempt
wrote after its checkpoint superseded (tests/test_hf_trainer.py kills the Trainer with ``os._exit(137)``). A
checkpoint without that file is refused in one line.

**Processes**: under ``accelerate launch`` (DDP; on CPU ``--multi_gpu --num_processes N``, since ``--cpu`` starts
one process) the gradients are read after DDP's all-reduce, as under Lightning's DDP; ``ranks="all"`` has every
rank write its own records. **Loggers**: with ``report_to=["tensorboard"]`` / ``["wandb"]`` the tick tags go to the
Trainer's own writer / run, the tags Lightning's loggers get (W&B's step key is the Trainer's
``train/global_step``).

**Refused** in one line at ``on_train_begin``, before anything is written: DeepSpeed (its partitioned gradients are
no whole parameters), FSDP (not tested with the Trainer yet), ``guard=`` and ``renorm=`` (their steps are
Lightning's).
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from tick_lightning.core import TickCore, TrainerView

__all__ = ["TickTrainerCallback"]


class _TensorBoard:
    """The Trainer's ``TensorBoardCallback`` (``report_to=["tensorboard"]``) as the Lightning logger ``log_tick``
    writes to: its own ``SummaryWriter``, so the tick tags land in the Trainer's event file."""

    def __init__(self, callback: Any) -> None:
        self._callback = callback

    @property
    def experiment(self) -> Any:
        return self._callback.tb_writer

    def log_metrics(self, metrics: dict, step: int) -> None:
        writer = self._callback.tb_writer
        if writer is not None:
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step=step)


class _Wandb:
    """The Trainer's ``WandbCallback`` (``report_to=["wandb"]``) as the Lightning logger ``log_tick`` writes to: one
    row per tick in its run, histograms included, at ``train/global_step`` (the step metric the Trainer's W&B
    integration defines; Lightning's ``WandbLogger`` names it ``trainer/global_step``)."""

    wandb_rows = True

    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def log_metrics(self, metrics: dict, step: int) -> None:
        run = getattr(getattr(self._callback, "_wandb", None), "run", None)
        if run is not None:
            run.log({**metrics, "train/global_step": step})


def _report_to(trainer: Trainer) -> list:
    """The Trainer's ``report_to`` integrations that get the tick tags, as loggers (rank 0 only, as Lightning's)."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    bridges = {TensorBoardCallback: _TensorBoard, WandbCallback: _Wandb}
    return [bridge(cb) for cb in trainer.callback_handler.callbacks for kind, bridge in bridges.items()
            if isinstance(cb, kind)]


class _TrainerView(TrainerView):
    """``TickCore``'s trainer view of a Hugging Face Trainer: its arguments, and its state for the step counters."""

    def __init__(self, trainer: Trainer, optimizer: Any, train_dataloader: Any) -> None:
        args, self._state = trainer.args, trainer.state
        try:
            batches = len(train_dataloader)
        except TypeError:
            batches = math.inf
        super().__init__(getattr(optimizer, "optimizer", optimizer),  # accelerate's AcceleratedOptimizer wraps it
                         str(args.output_dir), accumulate=int(args.gradient_accumulation_steps),
                         scaler=getattr(trainer.accelerator, "scaler", None), num_training_batches=batches,
                         precision="16-mixed" if args.fp16 else "bf16-mixed" if args.bf16 else "32-true")
        self.loggers = _report_to(trainer) if self.is_global_zero else []
        # set at each epoch's begin: the Trainer's float moves to the next epoch at its last step's end, Lightning's
        # counter after it
        self.current_epoch = int(self._state.epoch or 0)

    @property
    def global_step(self) -> int:
        return int(self._state.global_step)

    @property
    def max_steps(self) -> int:
        return int(self._state.max_steps)

    @property
    def estimated_stepping_batches(self) -> int:
        return int(self._state.max_steps)


#: the adapter's state in a Trainer checkpoint folder (``checkpoint-<step>/``), beside the Trainer's own files
STATE_FILE = "tick_lightning.pt"


def _calling_trainer() -> tuple[Trainer | None, str | None]:
    """The ``Trainer`` whose loop called this callback event -- the ``self`` of the nearest calling frame that is
    one (the Trainer passes itself to no callback; ``CallbackHandler.call_event`` sits between) -- and that frame's
    ``resume_from_checkpoint`` (``_inner_training_loop``'s argument: the folder a resume restored, resolved)."""
    frame = inspect.currentframe()
    try:
        for _ in range(12):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None, None
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                resume = frame.f_locals.get("resume_from_checkpoint")
                return owner, resume if isinstance(resume, (str, os.PathLike)) else None
        return None, None
    finally:
        del frame


class TickTrainerCallback(TrainerCallback):
    """``TickCallback``'s records from a Hugging Face ``Trainer`` (module docstring): the same arguments, the same
    records.

    Example:
        >>> from tick_lightning.hf import TickTrainerCallback
        >>> str(TickTrainerCallback(ticks="every:50", states=["loss", "grad"]).tick.schedule)
        'every:50'
    """

    def __init__(self, **kwargs: Any) -> None:
        #: the recorder this adapter drives (``TickCallback``'s core: its arguments, schedule, collectors, records)
        self.tick = TickCore(**kwargs)
        self._trainer: Trainer | None = None
        self._view: _TrainerView | None = None
        self._model: nn.Module | None = None
        self._undo: list = []
        self._micro = 0  # micro-batches begun this epoch (Lightning's batch_idx)
        self._pending: tuple | None = None  # the step's last micro-batch: (loss, batch_idx), ended at on_step_end
        self._read = False  # the step's gradients were read (at the accelerator's unscale)

    # -- fit start / end ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        trainer, resume = _calling_trainer()
        if trainer is None:
            raise RuntimeError("TickTrainerCallback: on_train_begin was not called by a transformers.Trainer's "
                               "training loop; add it with Trainer(callbacks=[TickTrainerCallback(...)]).")
        self._refuse(trainer)
        saved = self._saved_state(resume, int(state.global_step))
        self._trainer, self._model = trainer, model
        self._view = _TrainerView(trainer, optimizer, train_dataloader)
        self._micro = 0
        if saved is not None and math.isfinite(self._view.num_training_batches):  # the Trainer skips the epoch's
            self._micro = int(state.global_step * self._view.accumulate_grad_batches  # batches done
                              % self._view.num_training_batches)
        self.tick.fit_begin(self._view, model, saved)
        self._patch(trainer)

    def _refuse(self, trainer: Trainer) -> None:
        """The setups this adapter cannot record exactly yet, each in one line, before anything is written."""
        why = None
        if getattr(trainer, "is_deepspeed_enabled", False):
            why = "DeepSpeed (its partitioned gradients are not whole parameters)"
        elif getattr(trainer, "is_fsdp_enabled", False):
            why = "FSDP (not tested with the Trainer yet; Lightning's ModelParallelStrategy is)"
        elif self.tick._guard is not None or self.tick._renorm is not None:
            why = "guard= / renorm= (their steps are Lightning's); use TickCallback for them"
        if why is not None:
            raise RuntimeError(f"TickTrainerCallback does not support {why}.")

    @staticmethod
    def _saved_state(resume: str | None, step: int) -> dict | None:
        """The state a resumed fit continues (``STATE_FILE`` in the checkpoint folder the Trainer restored), ``None``
        for a new fit; a resume whose checkpoint has none is refused: its records could not be exactly-once."""
        if step == 0:
            return None
        path = Path(resume) / STATE_FILE if resume is not None else None
        if path is None or not path.is_file():
            raise RuntimeError(f"TickTrainerCallback: the Trainer resumes at step {step} from {resume!r}, which holds "
                               f"no {STATE_FILE} (saved without TickTrainerCallback); the records would not be "
                               f"exactly-once. Resume from a checkpoint this callback saved, or start a new run.")
        return torch.load(path, map_location="cpu", weights_only=False)

    def _before_save(self, args, state, control) -> None:
        """The Trainer saves ``checkpoint-<global_step>`` next: every record up to this step is on disk first (the
        state flushes them), and the state goes into that folder before the Trainer's own files, atomically."""
        if not control.should_save or self._view is None:
            return
        saved = self.tick.state_dict()  # every rank: it flushes its own records
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{STATE_FILE}.tmp"
        torch.save(saved, tmp)
        os.replace(tmp, folder / STATE_FILE)

    def _patch(self, trainer: Trainer) -> None:
        """Wrap the Trainer's ``training_step`` and its accelerator's ``unscale_gradients`` for this fit (instance
        attributes, removed at its end): the loss of each micro-batch, and the gradients unscaled before clipping."""
        self._unpatch()  # a fit that ended in an exception left its wrappers: never wrap a wrapper
        step, unscale = trainer.training_step, trainer.accelerator.unscale_gradients

        def training_step(model, inputs, *args, **kwargs):
            index = self._micro
            self._micro += 1
            self.tick.batch_begin(self._view, self._model, index)
            try:
                loss = step(model, inputs, *args, **kwargs)
            except BaseException as err:
                self.tick.fit_failed(self._view, self._model, err)
                raise
            if trainer.accelerator.sync_gradients:  # the step's last micro-batch: it ends after the optimizer step
                self._pending = (loss, index)
            else:
                self.tick.batch_end(self._view, loss, index)
            return loss

        def unscale_gradients(*args, **kwargs):
            out = unscale(*args, **kwargs)
            self._gradients_ready()
            return out

        trainer.training_step, trainer.accelerator.unscale_gradients = training_step, unscale_gradients
        self._undo = [(trainer, "training_step"), (trainer.accelerator, "unscale_gradients")]

    def _unpatch(self) -> None:
        for owner, name in self._undo:
            owner.__dict__.pop(name, None)  # the class's method again
        self._undo = []

    def _gradients_ready(self) -> None:
        if not self._read and self._view is not None:
            self._read = True
            self.tick.gradients_ready(self._view, self._model, self._view.optimizers[0])

    # -- per step -----------------------------------------------------------------------------
    def on_epoch_begin(self, args, state, control, **kwargs):
        if self._view is not None:
            self._view.current_epoch = int(state.epoch or 0)
            if self._micro >= self._view.num_training_batches:
                self._micro = 0  # (a resumed fit begins inside an epoch)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)
        self._micro = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """The evaluation's metrics as rows ``state="metric"`` at the steps done, as after a Lightning validation."""
        if self._view is not None and metrics:
            self._view.callback_metrics = dict(metrics)
            self.tick._record_metrics(self._view)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._gradients_ready()  # a path that did not unscale (none in transformers 5 but DeepSpeed's, refused)

    def on_step_end(self, args, state, control, **kwargs):
        self._read = False
        if self._pending is not None:
            loss, index = self._pending
            self._pending = None
            self.tick.batch_end(self._view, loss, index)
        self._before_save(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        try:
            if self._view is not None:
                self.tick.fit_end(self._view, self._model)
        finally:
            self._unpatch()
            self._view = self._trainer = None

    @property
    def dirpath(self) -> str | None:
        """Where the records are (``<args.output_dir>/ticks`` unless ``dirpath=`` was given)."""
        return self.tick.dirpath
