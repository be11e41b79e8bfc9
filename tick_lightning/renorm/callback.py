"""``RenormCallback``: re-normalization on its own, without ``TickCallback``; records the same ``renorm`` rows."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import torch

from tick_lightning.amp import found_inf, grad_scaler
from tick_lightning.collect.steps import total_steps
from tick_lightning.records import to_host
from tick_lightning.renorm.engine import RenormEngine
from tick_lightning.renorm.spec import Renorm
from tick_lightning.schedule import ScheduleSpec, TickSchedule
from tick_lightning.store import Recorder

__all__ = ["RenormCallback"]


class RenormCallback(L.Callback):
    """Re-normalize chosen weights right after optimizer steps and record each application.

    Args:
        specs: ``Renorm`` specs (a single one is accepted too).
        ticks: this callback's schedule: what ``at="ticks"`` follows, and when ``at="step"`` specs are
            recorded (they apply every step, recording every step would be costly). Default ``"every:100"``.
        dirpath: where tick records go; default ``<trainer.log_dir>/ticks``. Rank 0 writes.

    Example:
        >>> from tick_lightning import Renorm, RenormCallback
        >>> cb = RenormCallback([Renorm("*.attention.self.*.weight", method="unit", at="step")], ticks="every:50")
        >>> # L.Trainer(callbacks=[cb]).fit(model)  ->  load_ticks("<log_dir>/ticks").query("state == 'renorm'")
    """

    def __init__(self, specs: Renorm | Sequence[Renorm], ticks: ScheduleSpec = "every:100",
                 dirpath: str | os.PathLike | None = None) -> None:
        self.ticks = TickSchedule.parse(ticks)
        self.engine = RenormEngine(specs, self.ticks)
        self.dirpath = dirpath
        self.run_dir: str | None = None
        self._schedule = self.ticks
        self._recorder = Recorder()
        self._step_before = -1
        self._found_inf: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(specs=[s.describe() for s in self.engine.specs])

    # -------------------------------------------------------------- set-up
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_model and the strategy's setup: plans point at the live (possibly sharded) parameters
        total = total_steps(trainer)
        self._schedule = self.ticks.bind(total)  # an error only when ticks has log:/frac: and total is unknown
        self.engine.resolve(pl_module, total)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after checkpoint restore (global_step is the resumed one), before the first batch
        run_dir = str(self.dirpath) if self.dirpath is not None else os.path.join(trainer.log_dir or ".", "ticks")
        self.run_dir = run_dir
        manifest = {
            "schedule": str(self.ticks),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "model_class": type(pl_module).__name__,
            "parameters": {n: list(p.shape) for n, p in pl_module.named_parameters()},
            "versions": {"torch": torch.__version__, "lightning": L.__version__},
            "renorm": [s.describe() for s in self.engine.specs],
        }
        self._recorder.start(run_dir, rank=trainer.global_rank, start_step=trainer.global_step, manifest=manifest,
                             writes=trainer.is_global_zero, broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0))

    # ------------------------------------------------------------ training
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step
        self._found_inf = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the scaler has unscaled by now; found_inf is what makes scaler.step skip optimizer.step()
        inf = found_inf(grad_scaler(trainer), optimizer)
        if inf is not None:
            self._found_inf = inf if self._found_inf is None else self._found_inf + inf.to(self._found_inf.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step <= self._step_before:  # accumulating micro-batch: no optimizer step yet
            return
        step = self._step_before
        is_tick = self._schedule.is_step_tick(step)
        if not self.engine.due(step, is_tick):
            return
        record = is_tick or self.engine.due_scheduled(step, is_tick)
        blocks = self.engine.apply(step, is_tick, self._found_inf, record=record)
        if blocks:
            self._recorder.write(step, trainer.current_epoch, to_host(blocks))  # the one host copy

    # ------------------------------------------------------------- closing
    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._recorder.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._recorder.close(compact=False)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._recorder.reset()  # a new run unless a checkpoint restores our state after this hook

    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict(), "records": self._recorder.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._recorder.load_state_dict(state_dict.get("records", {}))
        if "engine" in state_dict:
            self.engine.load_state_dict(state_dict["engine"])
