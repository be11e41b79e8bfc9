"""``TickCallback``: record the state of a Lightning training run at scheduled ticks.

Hooks only decide (integer comparisons) and delegate: schedules in ``schedule.py``, statistics on the
device in ``stats.py``, storage off the training thread in ``store.py``.

Step semantics: a tick at step ``s`` is the optimizer step whose batch is processed while
``trainer.global_step == s``. Its gradients are that batch's (summed over accumulation micro-batches,
after AMP unscaling, before gradient clipping), its weights are those *before* the update, ``update``
is the change the optimizer applied, and ``loss`` is the sum of the micro-batch losses Lightning
back-propagated (each already divided by ``accumulate_grad_batches``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from tick_lightning import amp
from tick_lightning.records import STATES, Block
from tick_lightning.schedule import ScheduleSpec, TickSchedule
from tick_lightning.select import Selector, select_modules, select_parameters
from tick_lightning.stats import (
    NORM_INPUT_STATS,
    TENSOR_STATS,
    NormInputAccumulator,
    global_norm,
    tensor_stats,
    update_norms,
)
from tick_lightning.store import Recorder

__all__ = ["TickCallback"]

DEFAULT_STATES = tuple(s for s in STATES if s not in ("snapshot", "renorm"))
RANKS = ("zero", "all")


@dataclass
class _Window:
    """What is being gathered for the optimizer step of one tick (across accumulation micro-batches)."""

    step: int
    states: frozenset
    loss: Tensor | None = None
    chunks: list = field(default_factory=list)  # (keys, device tensor) in record order
    host: list = field(default_factory=list)  # (state, name, stat, float) known on the host
    before: list | None = None  # weight copies for `update`
    found_inf: Tensor | None = None
    optimizer_stepped: bool = False
    hooks: list = field(default_factory=list)
    observed: list = field(default_factory=list)  # patched norms whose tick_observer we set
    t0: float = 0.0
    events: tuple | None = None
    gathered: bool = False  # on_before_optimizer_step ran (manual optimization may step several optimizers)
    snapshot: dict | None = None


def _keys(state: str, names: Sequence[str], stats: Sequence[str]) -> tuple[list, list, list]:
    s, n, k = [], [], []
    for name in names:
        for stat in stats:
            s.append(state)
            n.append(name)
            k.append(stat)
    return s, n, k


class TickCallback(Callback):
    """Record loss, learning rates, weight / gradient / update statistics, norm-layer inputs, AMP state,
    time and memory at scheduled ticks; cost nothing between ticks.

    Args:
        ticks: the schedule (see ``tick_lightning.schedule``): ``[50, 100]``, ``"0,50,100,every:25"``,
            ``"log:20"``, ``"frac:0.5"``, ``"epoch"``, ``"nonfinite"``.
        states: states to record (default: all of ``loss, lr, amp, weight, grad, update, norm_input,
            time, memory``; add ``"snapshot"`` for safetensors copies of the selected parameters).
        state_ticks: per-state schedules overriding ``ticks``, e.g. ``{"weight": "every:500"}``.
        select: parameters for per-parameter states: globs over names and/or kinds
            (``"norm"``, ``"attention"``, ``"embedding"``, ``"lora"``, ``"linear"``); ``!`` excludes.
        norm_select: which normalization layers feed ``norm_input`` (default: every norm layer).
        dirpath: run directory for the records (default ``<trainer.log_dir>/ticks``).
        patch_norms: patch every normalization layer (``tick_lightning.patch_norms``) in ``setup``,
            before any strategy wraps the model; ``norm_input`` is then read from the patched layers.
        renorm: ``Renorm`` specs applied after real optimizer steps (see ``tick_lightning.renorm``).
        ranks: ``"zero"`` (global rank 0 records; others do nothing) or ``"all"`` (each rank writes
            its own records, e.g. to see per-rank losses).
        log_to_loggers: also send global scalars to the Trainer's loggers under ``ticks/``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tick_lightning import TickCallback, load_ticks
        >>> ticks = TickCallback(ticks="0,50,100,every:25", state_ticks={"weight": "every:100"})
        >>> trainer = Trainer(max_steps=200, callbacks=[ticks])        # doctest: +SKIP
        >>> trainer.fit(model, datamodule)                             # doctest: +SKIP
        >>> load_ticks(ticks.dirpath).query("state == 'loss'")          # doctest: +SKIP
    """

    def __init__(
        self,
        ticks: ScheduleSpec = "every:100",
        states: Sequence[str] | None = None,
        state_ticks: Mapping[str, ScheduleSpec] | None = None,
        select: Selector = None,
        norm_select: Selector = "norm",
        dirpath: str | Path | None = None,
        patch_norms: bool = False,
        renorm: Sequence[Any] | None = None,
        ranks: str = "zero",
        log_to_loggers: bool = True,
    ) -> None:
        super().__init__()
        self.schedule = TickSchedule.parse(ticks)
        chosen = tuple(DEFAULT_STATES if states is None else ([states] if isinstance(states, str) else states))
        unknown = [s for s in chosen if s not in STATES]
        if unknown:
            raise ValueError(f"Unknown tick state(s) {unknown}; valid states: {', '.join(STATES)}.")
        state_ticks = dict(state_ticks or {})
        unknown = [s for s in state_ticks if s not in STATES]
        if unknown:
            raise ValueError(f"state_ticks has unknown state(s) {unknown}; valid states: {', '.join(STATES)}.")
        if ranks not in RANKS:
            raise ValueError(f"ranks={ranks!r} is not valid; choose one of {RANKS}.")
        self.renorm_specs = list(renorm or [])
        if self.renorm_specs and "renorm" not in chosen:
            chosen = chosen + ("renorm",)
        self.states = chosen
        self.state_schedules = {s: TickSchedule.parse(state_ticks.get(s, self.schedule)) for s in self.states}
        self.select = select
        self.norm_select = norm_select
        self.dirpath = None if dirpath is None else str(dirpath)
        self._dirpath_arg = self.dirpath
        self.patch_norms = patch_norms
        self.ranks = ranks
        self.log_to_loggers = log_to_loggers

        # resume state (state_dict): the run and attempt being continued, the last tick recorded
        self._recorder = Recorder()
        self.last_tick_step = -1
        # per-fit state
        self._records = False
        self._window: _Window | None = None
        self._renorm = None
        if self.renorm_specs:  # validates the specs now; resolved against the model in setup
            from tick_lightning.renorm import RenormEngine

            self._renorm = RenormEngine(self.renorm_specs, default_schedule=self.state_schedules["renorm"])
        self._norm_patch_report = None
        self._params: list = []
        self._grad_params: list = []
        self._norm_modules: list = []
        self._norm_acc: NormInputAccumulator | None = None
        self._watch_nonfinite = any(s.nonfinite for s in self.state_schedules.values())
        self._nonfinite_loss: Tensor | None = None
        self._sharded = False

    # ------------------------------------------------------------------ setup
    @property
    def state_key(self) -> str:
        return self._generate_state_key(ticks=str(self.schedule), dirpath=self._dirpath_arg)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # a new fit is a new run unless Lightning restores our state from a checkpoint after this hook
        self._recorder.reset()
        self.last_tick_step = -1
        self.dirpath = self._dirpath_arg
        # validate everything a user wrote before the first step, on every rank (no communication)
        self._params = select_parameters(pl_module, self.select)
        self._grad_params = [(n, p) for n, p in self._params if p.requires_grad]
        if self.patch_norms:
            from tick_lightning.norms import patch_norms

            self._norm_patch_report = patch_norms(pl_module, select=None, stats=True)
        if "norm_input" in self.states:
            try:
                self._norm_modules = select_modules(pl_module, self.norm_select, what="normalization layer")
            except ValueError:
                if self.norm_select != "norm":
                    raise
                self._norm_modules = []  # a model without normalization layers records no norm_input

    @staticmethod
    def _total(trainer: pl.Trainer) -> float | None:
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - unknown length (iterable dataset without max_steps)
            return None
        # Lightning answers inf, or max_steps (-1) for an unsized dataloader, when the total is unknown
        return None if total is None or math.isinf(total) or total <= 0 else total

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        needs_total = any(s.needs_total for s in self.state_schedules.values())
        total = self._total(trainer) if needs_total else None
        self.state_schedules = {s: sched.bind(total) for s, sched in self.state_schedules.items()}
        # strategies may replace Parameter objects (FSDP2 makes DTensors): look them up again by name
        self._params = _refresh(pl_module, self._params)
        self._grad_params = _refresh(pl_module, self._grad_params)
        self._sharded = any(_is_dtensor(p) for _, p in self._params)
        if self._renorm is not None:  # after configure_model and the strategy's setup: the live parameters
            self._renorm.resolve(pl_module, total_steps=self._total(trainer))
        # ranks="zero": only rank 0 records; sharded statistics need every rank in the reductions
        self._records = self.ranks == "all" or trainer.global_rank == 0 or self._sharded
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "ticks")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after checkpoint restore and dataloader setup: global_step and our state_dict are the resumed ones
        if any(s.epoch_every for s in self.state_schedules.values()) and math.isinf(trainer.num_training_batches):
            raise ValueError("Tick schedule term 'epoch' needs a sized train dataloader (its last batch ends the epoch); "
                             "use 'every:N' for iterable datasets.")
        writes = self.ranks == "all" or trainer.global_rank == 0
        self._recorder.start(self.dirpath, rank=trainer.global_rank, start_step=trainer.global_step,
                             manifest=self._manifest(trainer, pl_module), writes=writes,
                             broadcast=lambda obj: trainer.strategy.broadcast(obj, src=0))
        if self._norm_modules:
            self._norm_acc = NormInputAccumulator(len(self._norm_modules), device=pl_module.device)

    def _manifest(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        import lightning
        import transformers

        model = getattr(pl_module, "model", pl_module)
        return {
            "schedule": str(self.schedule),
            "state_schedules": {s: str(v) for s, v in self.state_schedules.items()},
            "states": list(self.states),
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": {n: list(p.shape) for n, p in self._params},
            "norm_layers": [n for n, _ in self._norm_modules],
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                         "transformers": transformers.__version__, "tick_lightning": _version()},
        }

    # --------------------------------------------------------------- decision
    def _due(self, trainer, step: int, batch_idx: int) -> frozenset:
        """States due at ``step``. Integer arithmetic only: this runs on every optimizer step."""
        if step <= self.last_tick_step:  # resumed: never record a step twice
            return frozenset()
        acc = trainer.accumulate_grad_batches
        # the epoch's last optimizer step is the one whose window holds its last batch
        last_of_epoch = batch_idx // acc == (int(trainer.num_training_batches) - 1) // acc \
            if not math.isinf(trainer.num_training_batches) else False
        epoch = trainer.current_epoch
        return frozenset(s for s, sched in self.state_schedules.items()
                         if sched.is_step_tick(step) or (last_of_epoch and sched.is_epoch_tick(epoch)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._window is not None and self._window.step == step:
            return  # a further accumulation micro-batch of the same optimizer step
        if self._window is not None:  # the previous window ended without an optimizer step (skipped batch)
            self._finish(trainer, pl_module)
        due = self._due(trainer, step, batch_idx) if self._records else frozenset()
        renorm_due = self._renorm is not None and self._renorm.due(step, self._is_tick(step))
        if due or renorm_due or (self._records and self._watch_nonfinite):
            self._open(trainer, pl_module, step, due)

    def _open(self, trainer, pl_module, step: int, due: frozenset) -> None:
        window = _Window(step=step, states=due)
        self._window = window
        if not due:
            return  # opened only to watch for non-finite values / apply renorm after the step
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
            window.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            window.events[0].record()
        window.t0 = time.perf_counter()
        if "norm_input" in due and self._norm_acc is not None:
            self._norm_acc.reset()
            for i, (_, module) in enumerate(self._norm_modules):
                observer = self._norm_acc.observer(i)
                if hasattr(module, "tick_observer"):  # a patched norm layer observes its own input
                    module.tick_observer = observer
                    window.observed.append(module)
                else:
                    window.hooks.append(module.register_forward_pre_hook(_pre_hook(observer)))

    # ---------------------------------------------------------------- gather
    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        window = self._window
        if window is not None and self._records and self._watch_nonfinite and not window.states:
            # device-side flag (AMP scaling keeps finiteness); read once per step in on_before_optimizer_step
            flag = (~torch.isfinite(loss.detach())).float().reshape(())
            self._nonfinite_loss = flag if self._nonfinite_loss is None else self._nonfinite_loss + flag

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        window = self._window
        if window is None:
            return
        scaler = amp.grad_scaler(trainer)
        window.found_inf = amp.found_inf(scaler, optimizer)
        if not window.states and self._records and self._watch_nonfinite:
            self._check_nonfinite(trainer, window)
        due = window.states
        if not due or window.gathered:
            return
        window.gathered = True
        if "snapshot" in due and self._params:  # weights before the update, like the `weight` statistics
            window.snapshot = {n: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu().clone() for n, p in self._params}
        if "weight" in due and self._params:
            stats = tensor_stats([p.detach() for _, p in self._params])
            window.chunks.append((self._keys("weight", [n for n, _ in self._params]), stats))
        if "grad" in due and self._grad_params:
            grads = [p.grad for _, p in self._grad_params]
            have = [g for g in grads if g is not None]
            stats = tensor_stats(have) if have else None
            full = torch.full((len(grads), len(TENSOR_STATS)), float("nan"), device=pl_module.device)
            if stats is not None:
                idx = [i for i, g in enumerate(grads) if g is not None]
                full[idx] = stats.to(full.device)
                gnorm = global_norm(have).to(full.device).reshape(1)
                nonfinite = stats[:, 4].sum().to(full.device).reshape(1)
            else:
                gnorm = nonfinite = torch.full((1,), float("nan"), device=full.device)
            window.chunks.append((self._keys("grad", [n for n, _ in self._grad_params]), full))
            window.chunks.append(((["grad", "grad"], ["", ""], ["norm", "nonfinite"]), torch.cat([gnorm, nonfinite])))
        if "update" in due and self._grad_params:
            window.before = [p.detach().clone() for _, p in self._grad_params]
        if "amp" in due:
            scale = amp.loss_scale(scaler)
            skipped = window.found_inf if window.found_inf is not None else None
            values = torch.stack([
                scale.float().reshape(()) if scale is not None else torch.tensor(1.0, device=pl_module.device),
                (skipped.float().reshape(()) > 0).float() if skipped is not None else torch.tensor(0.0, device=pl_module.device),
            ]).to(pl_module.device)
            window.chunks.append(((["amp", "amp"], ["", ""], ["scale", "skipped"]), values))
        if "lr" in due:
            for i, group in enumerate(optimizer.param_groups):
                window.host.append(("lr", f"group{i}", "lr", _as_float(group.get("lr"))))
                momentum = group.get("momentum", group.get("betas", (None,))[0] if "betas" in group else None)
                if momentum is not None:
                    window.host.append(("lr", f"group{i}", "momentum", _as_float(momentum)))

    def _check_nonfinite(self, trainer, window: _Window) -> None:
        """One host read per step, only when the schedule has ``nonfinite``: the documented cost of that term."""
        flags = []
        if self._nonfinite_loss is not None:
            flags.append(self._nonfinite_loss.reshape(1))
        if window.found_inf is not None:
            flags.append(window.found_inf.float().reshape(1).to(flags[0].device if flags else window.found_inf.device))
        else:
            grads = [p.grad for _, p in self._grad_params if p.grad is not None]
            if grads:
                norm = global_norm(grads).reshape(1)
                flags.append((~torch.isfinite(norm)).float().to(flags[0].device if flags else norm.device))
        self._nonfinite_loss = None
        if flags and bool(torch.cat([f.to(flags[0].device) for f in flags]).sum() > 0):
            due = frozenset(s for s, sched in self.state_schedules.items() if sched.nonfinite) - {"norm_input"}
            window.states = due
            window.t0 = time.perf_counter()
            self.on_before_optimizer_step(trainer, trainer.lightning_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        window = self._window
        if window is None:
            return
        if "loss" in window.states or (self._records and self._watch_nonfinite):
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, Tensor):
                loss = loss.detach().float().reshape(())
                window.loss = loss if window.loss is None else window.loss + loss
        if trainer.global_step > window.step:
            window.optimizer_stepped = True
            self._finish(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._window is not None:
            self._finish(trainer, pl_module)
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._remove_hooks()
        self._close(compact=False)  # what was recorded stays on disk as parts

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    # ---------------------------------------------------------------- finish
    def _finish(self, trainer, pl_module) -> None:
        window, self._window = self._window, None
        self._remove_hooks(window)
        if window is None:
            return
        skipped = window.found_inf
        renorm_rows = None
        if window.optimizer_stepped and self._renorm is not None:
            is_tick = self._is_tick(window.step)
            if self._renorm.due(window.step, is_tick):
                # every rank applies it (identical weights stay identical); only recording ranks record
                # specs with their own schedule are recorded at every application, at="step" ones on ticks
                record = self._records and ("renorm" in window.states
                                            or self._renorm.due_scheduled(window.step, is_tick))
                renorm_rows = self._renorm.apply(window.step, is_tick, skipped, record=record) or None
        if not window.states and renorm_rows is None:
            return
        due = window.states
        if window.loss is not None:
            loss = window.loss.reshape(1)
            window.chunks.append(((["loss", "loss"], ["", ""], ["value", "nonfinite"]),
                                  torch.cat([loss, (~torch.isfinite(loss)).float()])))
        if window.before is not None and window.optimizer_stepped:
            after = [p.detach() for _, p in self._grad_params]
            values = update_norms(after, window.before)
            if skipped is not None:  # a skipped fp16 step applied no update: not counted as one
                values = torch.where(skipped.reshape(1, 1).to(values.device) > 0,
                                     torch.full_like(values, float("nan")), values)
            window.chunks.append((self._keys("update", [n for n, _ in self._grad_params], ("norm", "ratio")), values))
        if "norm_input" in due and self._norm_acc is not None:
            window.chunks.append((self._keys("norm_input", [n for n, _ in self._norm_modules], NORM_INPUT_STATS),
                                  self._norm_acc.values()))
        for block in renorm_rows or []:
            window.chunks.append((self._keys(block.state, block.names, block.stats), block.values))
        if "memory" in due and trainer.strategy.root_device.type == "cuda":
            window.chunks.append(((["memory"], [""], ["peak_bytes"]),
                                  torch.tensor([float(torch.cuda.max_memory_allocated(trainer.strategy.root_device))])))
        self._write(trainer, window, window.snapshot, with_time="time" in due)
        self.last_tick_step = window.step

    def _write(self, trainer, window: _Window, snapshot, with_time: bool) -> None:
        states, names, stats, device_values = [], [], [], []
        for (s, n, k), values in window.chunks:
            states += s
            names += n
            stats += k
            device_values.append(values.detach().reshape(-1).float().to(window.chunks[0][1].device))
        # the one host copy of this tick
        host_values = torch.cat(device_values).cpu().tolist() if device_values else []
        if with_time:
            if window.events is not None:
                window.events[1].record()
                window.events[1].synchronize()
                seconds = window.events[0].elapsed_time(window.events[1]) / 1000.0
            else:
                seconds = time.perf_counter() - window.t0
            window.host.append(("time", "", "step_seconds", seconds))
        for s, n, k, v in window.host:
            states.append(s)
            names.append(n)
            stats.append(k)
            host_values.append(v)
        if not states:
            return
        self._recorder.write(window.step, trainer.current_epoch,
                             [Block(s, (n,), (k,), np.array([[v]], dtype=np.float64))
                              for s, n, k, v in zip(states, names, stats, host_values)])
        if snapshot is not None:
            self._snapshot(trainer, window.step, snapshot)
        if self.log_to_loggers and trainer.loggers and trainer.global_rank == 0:
            metrics = {f"ticks/{s}/{k}" if not n or s != "lr" else f"ticks/lr/{n}/{k}": v
                       for s, n, k, v in zip(states, names, stats, host_values) if n == "" or s == "lr"}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=window.step)

    def _snapshot(self, trainer, step: int, tensors: dict) -> None:
        from safetensors.torch import save_file

        out = self._recorder.snapshot_dir
        out.mkdir(parents=True, exist_ok=True)
        host = {name: t.contiguous() for name, t in tensors.items()}
        save_file(host, str(out / f"step{step:08d}-rank{trainer.global_rank}.safetensors"))

    def _is_tick(self, step: int) -> bool:
        return self.state_schedules["renorm"].is_step_tick(step) if "renorm" in self.state_schedules \
            else self.schedule.is_step_tick(step)

    def _keys(self, state: str, names: Sequence[str], stats: Sequence[str] = TENSOR_STATS):
        cache = self.__dict__.setdefault("_key_cache", {})
        key = (state, tuple(stats), tuple(names))
        if key not in cache:
            cache[key] = _keys(state, names, stats)
        return cache[key]

    def _remove_hooks(self, window: _Window | None = None) -> None:
        window = window or self._window
        if window is None:
            return
        for handle in window.hooks:
            handle.remove()
        for module in window.observed:
            module.tick_observer = None
        window.hooks, window.observed = [], []

    def _close(self, compact: bool = True) -> None:
        self._recorder.close(compact=compact)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        # flushes first: a checkpoint never claims a tick that is not on disk
        state = {**self._recorder.state_dict(), "last_tick_step": self.last_tick_step, "dirpath": self.dirpath}
        if self._renorm is not None:
            state["renorm"] = self._renorm.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recorder.load_state_dict(state_dict)
        self.last_tick_step = int(state_dict.get("last_tick_step", -1))
        if self.dirpath is None and state_dict.get("dirpath"):
            self.dirpath = state_dict["dirpath"]
        if self._renorm is not None and "renorm" in state_dict:
            self._renorm.load_state_dict(state_dict["renorm"])

    @property
    def norm_patch_report(self):
        """The ``NormPatchReport`` of ``patch_norms=True`` (``None`` otherwise)."""
        return self._norm_patch_report


def _refresh(pl_module: nn.Module, params: list) -> list:
    current = {_clean_name(n): p for n, p in pl_module.named_parameters()}
    return [(n, current.get(n, p)) for n, p in params]


def _clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _pre_hook(observer):
    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            observer(args[0])

    return hook


def _as_float(value: Any) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tick-lightning")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"
