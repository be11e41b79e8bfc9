"""Global states: ``loss``, ``lr``, ``amp``, ``time``, ``memory``, ``renorm``; and the ``nonfinite`` watch.

None of them reads a device value on the host before the tick's one copy: tensor learning rates and the
loss scale are cloned on the device, host numbers (float learning rates, allocator counters) go into
host blocks directly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tick_lightning import amp, dist
from tick_lightning.collect.base import Collector, Tick
from tick_lightning.records import Block
from tick_lightning.stats import sumsq_partials

__all__ = ["AmpCollector", "LossCollector", "LrCollector", "MemoryCollector", "NonfiniteWatch", "RenormCollector",
           "TimeCollector"]


class LossCollector(Collector):
    """The sum of the tick's micro-batch losses as Lightning back-propagated them (each / accumulation)."""

    states = ("loss",)

    def open(self, tick: Tick) -> None:
        self._loss: Tensor | None = None

    def micro_batch(self, tick: Tick, loss: Tensor | None) -> None:
        if isinstance(loss, Tensor):
            loss = dist.local_view(loss.detach()).float().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss

    def blocks(self, tick: Tick) -> list[Block]:
        if getattr(self, "_loss", None) is None:
            return []
        loss = self._loss.reshape(1, 1)
        return [Block("loss", ("",), ("value", "nonfinite"), torch.cat([loss, (~torch.isfinite(loss)).float()], 1))]

    def close(self, tick: Tick) -> None:
        self._loss = None


def _momentum(group: dict) -> Any:
    if "momentum" in group:
        return group["momentum"]
    betas = group.get("betas")
    return betas[0] if betas else None


class LrCollector(Collector):
    """Learning rate (and momentum / Adam beta1) of every param group of every optimizer that stepped.

    Names: ``group{i}`` with one optimizer; ``opt{k}.group{i}`` with several (manual optimization).
    """

    states = ("lr",)

    def open(self, tick: Tick) -> None:
        self._blocks: list[Block] = []

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        prefix = f"opt{index}." if tick.optimizers > 1 else ""
        for i, group in enumerate(optimizer.param_groups):
            values = {"lr": group.get("lr"), "momentum": _momentum(group)}
            values = {k: v for k, v in values.items() if v is not None}
            name = (f"{prefix}group{i}",)
            tensors = [v for v in values.values() if isinstance(v, Tensor)]
            if not tensors:
                self._blocks.append(Block("lr", name, tuple(values), np.asarray([[float(v) for v in values.values()]])))
                continue
            like = tensors[0].detach()  # a tensor lr (capturable schedulers): cloned now, copied with the tick
            row = [v.detach().to(like.device, torch.float32).reshape(()).clone() if isinstance(v, Tensor)
                   else torch.full((), float(v), dtype=torch.float32, device=like.device) for v in values.values()]
            self._blocks.append(Block("lr", name, tuple(values), torch.stack(row).reshape(1, -1)))

    def blocks(self, tick: Tick) -> list[Block]:
        return list(getattr(self, "_blocks", []))

    def close(self, tick: Tick) -> None:
        self._blocks = []


class AmpCollector(Collector):
    """fp16 loss scale and whether the scaler skipped the step (1.0 / 0.0 without a scaler)."""

    states = ("amp",)

    def open(self, tick: Tick) -> None:
        self._scale: Tensor | None = None
        self._seen = False

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        self._seen = True
        scale = amp.loss_scale(amp.grad_scaler(tick.trainer))
        if scale is not None and self._scale is None:
            self._scale = scale.float().reshape(())

    def blocks(self, tick: Tick) -> list[Block]:
        if not getattr(self, "_seen", False):
            return []
        if self._scale is None:
            return [Block.scalars("amp", {"scale": 1.0, "skipped": 0.0})]
        skipped = (tick.found_inf.float().reshape(()).to(self._scale.device) > 0).float() \
            if tick.found_inf is not None else torch.zeros_like(self._scale)
        return [Block("amp", ("",), ("scale", "skipped"), torch.stack([self._scale, skipped]).reshape(1, 2))]

    def close(self, tick: Tick) -> None:
        self._scale, self._seen = None, False


class TimeCollector(Collector):
    """Wall time of the tick step: CUDA events on GPUs (recorded on the stream, read after the one copy)."""

    states = ("time",)

    def open(self, tick: Tick) -> None:
        self._events = None
        self._t1 = None
        if tick.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0 = time.perf_counter()

    def after_step(self, tick: Tick) -> None:
        self.stop()

    def stop(self) -> None:
        """The step's end: before the statistics of ``after_step`` and before the tick's host copy."""
        if self._t1 is None:
            self._t1 = time.perf_counter()
            if self._events is not None:
                self._events[1].record()

    def blocks(self, tick: Tick) -> list[Block]:
        self.stop()  # a tick that ended without an optimizer step
        return []

    def host_blocks(self, tick: Tick) -> list[Block]:
        if self._events is not None:  # the one host copy came after the end event: it has completed
            self._events[1].synchronize()
            seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0
        else:
            seconds = self._t1 - self._t0
        return [Block.scalars("time", {"step_seconds": seconds})]

    def close(self, tick: Tick) -> None:
        self._events = None


class MemoryCollector(Collector):
    """Peak device memory, without touching the global peak counter (CUDA only).

    ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` read at the first ``on_before_optimizer_step`` of
    the tick, before this callback's own temporaries: the peak since the process started (or since the
    user's last ``reset_peak_memory_stats``), as ``DeviceStatsMonitor`` reports it. ``peak_increase_bytes``
    is how much the tick step's forward and backward raised it. ``reset_peak=True`` resets the counter at
    each tick's start instead (then ``peak_bytes`` is this step's own peak), a global side effect on every
    other reader of that counter, so it is opt-in.
    """

    states = ("memory",)

    def __init__(self, reset_peak: bool = False) -> None:
        self.reset_peak = reset_peak

    def open(self, tick: Tick) -> None:
        self._values = None
        self._start = None
        if tick.device.type == "cuda":
            if self.reset_peak:
                torch.cuda.reset_peak_memory_stats(tick.device)
            self._start = torch.cuda.max_memory_allocated(tick.device)

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        if self._start is not None and self._values is None:
            peak = torch.cuda.max_memory_allocated(tick.device)  # allocator counters: host numbers, no sync
            self._values = {"peak_bytes": float(peak), "peak_increase_bytes": float(peak - self._start)}

    def host_blocks(self, tick: Tick) -> list[Block]:
        return [Block.scalars("memory", self._values)] if self._values else []


class RenormCollector(Collector):
    """Applies ``Renorm`` specs right after real optimizer steps (every rank) and records them on ticks."""

    states = ("renorm",)

    def __init__(self, engine, is_tick) -> None:
        self.engine = engine
        self.is_tick = is_tick
        self.record = True  # False on ranks that apply but do not record (ranks="zero")
        self._values = None

    def wants(self, tick: Tick) -> bool:
        return self.engine.due(tick.step, self.is_tick(tick.step))

    def open(self, tick: Tick) -> None:
        self._values = None

    def after_step(self, tick: Tick) -> None:
        is_tick = self.is_tick(tick.step)
        if not self.engine.due(tick.step, is_tick):
            return
        # specs with their own schedule are recorded at every application, at="step" ones on ticks
        record = self.record and ("renorm" in tick.due or self.engine.due_scheduled(tick.step, is_tick))
        skipped = tick.found_inf  # no parameter moved: the scaler skipped the step, or the guard did
        if tick.guard_skip is not None:
            skipped = tick.guard_skip if skipped is None else skipped.float() + tick.guard_skip.to(skipped.device)
        self._values = self.engine.apply(tick.step, is_tick, skipped, record=record)

    def blocks(self, tick: Tick) -> list[Block]:
        return list(self._values or [])

    def close(self, tick: Tick) -> None:
        self._values = None


class NonfiniteWatch:
    """The ``nonfinite`` schedule term: is this step's loss or gradient not finite?

    One host read per optimizer step (the documented cost of the term), and under sharding one all-reduce
    of the flag first, so every rank takes the same branch before the tick's collectives.
    """

    def __init__(self) -> None:
        self._loss_flag: Tensor | None = None

    def reset(self) -> None:
        self._loss_flag = None

    def observe_loss(self, loss: Tensor) -> None:
        flag = (~torch.isfinite(dist.local_view(loss.detach()))).float().reshape(())
        self._loss_flag = flag if self._loss_flag is None else self._loss_flag + flag

    def check(self, found_inf: Tensor | None, grads: list[Tensor], sharded: bool) -> bool:
        flags = [] if self._loss_flag is None else [self._loss_flag]
        if found_inf is not None:
            flags.append(found_inf.float().reshape(()))
        elif grads:
            views = [dist.local_view(g) for g in grads]
            flags.append((~torch.isfinite(sumsq_partials(views).sum())).float())  # a NaN / inf element: not finite
        self._loss_flag = None
        if not flags:
            return False
        flag = torch.stack([f.to(flags[0].device) for f in flags]).sum()
        if sharded:
            flag = dist.any_rank(flag)
        return bool(flag > 0)
