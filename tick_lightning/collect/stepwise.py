"""The every-step phase: what runs on *every* optimizer step, and the one place its partial sums are computed.

Two step collectors (``base.StepCollector``) share it: ``dense.DenseCollector`` (the run's loss and global
gradient / update norm, one row per step) and ``flight.FlightRecorder`` (each parameter's gradient norm,
non-finite flag, update norm and norm-layer input absmax over the last ``window`` steps). Both are built on
the same per-parameter local squared norms (``stats.sumsq_partials``), computed **once** per optimizer and
step here and handed to each collector: the dense global norm is their sum per placement, the flight row is
the vector itself.

``StepPhase`` keeps the step bookkeeping the collectors would otherwise each repeat (which step is open,
whether its optimizer stepped, when it is complete) and the persistent copy of the trainable parameters
that update norms need (opt-in: one model's worth of memory).

Budget: per step a few device kernels per optimizer (one foreach norm per dtype, a stack, a square, one
``index_add_`` / ``copy_`` per collector); no host read, no host-to-device copy (index tensors are made once,
at setup or the first time a set of present gradients is seen), no collective. Under sharding the columns
hold local partials; they are reduced when a collector's rows are taken (``take(gather)``: one collective
per process group, in the flush's ``dist.Gather``).

Example (a single process, one optimizer):
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.SGD([w], lr=0.1)
    >>> layout = StepLayout.build([opt], {id(w): "w"}, device=torch.device("cpu"))
    >>> layout.names, layout.width
    (('w',), 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tick_lightning import dist
from tick_lightning.collect.base import StepCollector
from tick_lightning.collect.params import optimizer_params
from tick_lightning.stats import acc_dtype, placement_key, sumsq_partials

__all__ = ["StepCollector", "StepFlush", "StepLayout", "StepNorms", "StepPhase"]

_HALF = (torch.float16, torch.bfloat16)


def _learning_rates(optimizer: torch.optim.Optimizer, order: list[int]) -> dict[str, float]:
    """``{group name: lr}`` of the optimizer's param groups whose lr is a Python number (named as the ``lr`` tick
    state names them: ``group{i}``, ``opt{k}.group{i}`` with several optimizers)."""
    prefix = f"opt{order.index(id(optimizer))}." if len(order) > 1 and id(optimizer) in order else ""
    return {f"{prefix}group{i}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)
            if isinstance(g.get("lr"), (int, float)) and not isinstance(g.get("lr"), bool)}


@dataclass
class StepLayout:
    """The trainable parameters as columns: ``names[c]`` is column ``c``; one optimizer's columns are contiguous.

    ``placement[c]`` is the column's placement (``stats.placement_key``: its shard groups and collective
    device) as an index into ``groups``; ``placement_index`` is the same as a device tensor, for the one
    ``index_add_`` that sums a step's per-parameter partials into per-placement totals.
    """

    params: list[Tensor]
    names: tuple[str, ...]
    placement: list[int]
    groups: list[tuple[tuple, torch.device]]  # per placement: (shard groups, collective device)
    placement_index: Tensor
    optimizer_columns: dict[int, range]  # id(optimizer) -> its columns

    @property
    def width(self) -> int:
        return len(self.params)

    @classmethod
    def build(cls, optimizers: Sequence[torch.optim.Optimizer], names: Mapping[int, str], device: torch.device,
              flat_group=None) -> StepLayout:
        """Columns of every optimizer's trainable parameters, in optimizer then parameter order.

        ``flat_group``: the process group over which *plain* tensors are shards of flat parameters (FSDP1's
        sharding group, ``dist.flat_shard_group``): their partials are then summed over it like a
        ``DTensor``'s (the norm of a rank's slice is not the parameter's).
        """
        params, columns, seen = [], {}, set()
        for opt in optimizers:
            start = len(params)
            for p in optimizer_params(opt):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            columns[id(opt)] = range(start, len(params))
        keys: dict[tuple, int] = {}
        groups, placement = [], []
        for p in params:
            key = placement_key(p)
            if key not in keys:
                keys[key] = len(groups)
                own = dist.shard_groups(p)
                groups.append((own if own or flat_group is None else (flat_group,), dist.mesh_device(p)))
            placement.append(keys[key])
        index = torch.tensor(placement, dtype=torch.long, device=device)
        return cls(params, tuple(names.get(id(p), f"param{i}") for i, p in enumerate(params)), placement, groups,
                   index, columns)


@dataclass
class StepNorms:
    """One optimizer's partials at one step: ``sumsq[k]`` belongs to column ``columns[k]`` (device index too)."""

    sumsq: Tensor
    columns: range | list[int]
    index: Tensor  # the columns as a device tensor
    placement_index: Tensor  # the columns' placements as a device tensor


@dataclass
class _Plan:
    """Cached per (optimizer, which gradients are present): the device index tensors of the present columns."""

    columns: list[int]
    index: Tensor
    placement_index: Tensor


@dataclass
class StepFlush:
    """What one flush took: the dense rows, a flight dump, the layer watch's flight rows (any of them), their
    device blocks in one host copy."""

    dense: Any = None  # dense.DenseFlush
    flight: Any = None  # flight.FlightDump: rows to write
    watch: Any = None  # flight.FlightDump(watch=True): rows for triggers.LayerWatch, not written
    guard: Any = None  # guard.engine.GuardFlush: the guard's decisions
    _sizes: tuple = (0, 0, 0, 0)

    def blocks(self) -> list:
        parts = ([self.dense.block()] if self.dense is not None else [],
                 self.flight.blocks() if self.flight is not None else [],
                 self.watch.blocks() if self.watch is not None else [],
                 self.guard.blocks() if self.guard is not None else [])
        self._sizes = tuple(len(p) for p in parts)
        return [b for p in parts for b in p]

    def split(self, host: list) -> tuple[Any, list, list, list]:
        """The host copies of ``blocks()``: (the dense block or None, the flight blocks, the watch's blocks, the
        guard's blocks)."""
        d, f, w, g = self._sizes
        return (host[0] if d else None), list(host[d:d + f]), list(host[d + f:d + f + w]), \
            list(host[d + f + w:d + f + w + g])


@dataclass
class StepPhase:
    """Routes Lightning's per-step hooks to the step collectors; computes their shared partial sums once.

    ``dense`` (``dense.DenseCollector``) and ``flight`` (``flight.FlightRecorder``) are either ``None``.
    """

    dense: Any = None
    flight: Any = None
    guard: Any = None  # guard.GuardEngine: judges every step from the same partials, acts before the update
    layout: StepLayout | None = None
    open_step: int | None = None
    _global_step: int = 0
    _stepped: bool = False
    _before: dict[int, Tensor] = field(default_factory=dict)  # id(param) -> persistent copy of its local view
    _copied: list[int] = field(default_factory=list)  # ids of the optimizers whose parameters were copied
    _plans: dict[tuple, _Plan] = field(default_factory=dict)
    _judged: dict[int, _Plan] = field(default_factory=dict)  # id(optimizer) -> the plan the guard judged

    @property
    def collectors(self) -> list[StepCollector]:
        return [c for c in (self.dense, self.flight) if c is not None]

    @property
    def ready(self) -> bool:
        return self.layout is not None

    def take(self, gather: dist.Gather, dense: bool = True, flight: bool = False) -> StepFlush | None:
        """The rows a flush writes (their partials added to ``gather``): the dense rows, and the flight
        recorder's unwritten steps when ``flight``; with the dense rows, the flight steps the layer watch has not
        seen. Every rank calls it at the same step."""
        if not self.ready:
            return None
        has_flight = self.flight is not None
        out = StepFlush(self.dense.take(gather) if dense and self.dense is not None else None,
                        self.flight.take(gather) if flight and has_flight else None,
                        self.flight.take(gather, watch=True) if dense and has_flight else None,
                        self.guard.take() if dense and self.guard is not None else None)
        return out if out.dense is not None or out.flight is not None or out.guard is not None else None

    @property
    def full(self) -> bool:
        """A buffer of the every-step rows is full: the callback flushes now."""
        return any(c is not None and c.full for c in (self.dense, self.guard))

    def setup(self, optimizers: Sequence[torch.optim.Optimizer], module: nn.Module, device: torch.device,
              flat_group=None) -> None:
        from tick_lightning.select import clean_name

        names = {id(p): clean_name(n) for n, p in module.named_parameters()}
        self.layout = StepLayout.build(optimizers, names, device, flat_group)
        self.open_step, self._plans, self._copied = None, {}, []
        for opt in optimizers:  # every gradient present, the usual case: its index tensors made now, not in a step
            cols = self.layout.optimizer_columns[id(opt)]
            if len(cols):
                index = torch.arange(cols.start, cols.stop, device=self.layout.placement_index.device)
                self._plans[(id(opt), None)] = _Plan(list(cols), index, self.layout.placement_index[index])
        self._before = {}
        if any(c.wants_updates for c in self.collectors):
            self._before = {id(p): torch.empty_like(dist.local_view(p).detach()) for p in self.layout.params}
        for c in self.collectors:
            c.setup(self.layout, device)

    def teardown(self) -> None:
        for c in self.collectors:
            c.teardown()
        if self.guard is not None:
            self.guard.teardown()
        self._judged = {}
        self.layout, self._before, self._copied, self._plans, self.open_step = None, {}, [], {}, None

    @property
    def nbytes(self) -> int:
        """Device memory the phase holds: the collectors' buffers and the update copy."""
        return sum(c.nbytes for c in self.collectors) + sum(t.numel() * t.element_size() for t in self._before.values())

    # -- routing (the callback calls these from its hooks) --------------------------------
    def batch_start(self, step: int, epoch: int, global_step: int) -> None:
        if self.open_step == step:
            return  # a further accumulation micro-batch
        self.end()
        self.open_step, self._global_step, self._stepped = step, global_step, False
        for c in self.collectors:
            c.begin(step, epoch)
        if self.guard is not None:
            self.guard.begin(step, epoch)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.open_step is None:
            return
        self._stepped = True
        if self.dense is not None:
            self.dense.add_lr(_learning_rates(optimizer, list(self.layout.optimizer_columns)))
        plan = self._plan(optimizer)
        if plan is None:
            return
        params = self.layout.params
        grads = [dist.local_view(params[c].grad) for c in plan.columns]
        norms = StepNorms(sumsq_partials(grads), plan.columns, plan.index, plan.placement_index)
        for c in self.collectors:
            c.add_grads(norms)
        if self.guard is not None:
            self.guard.judge(optimizer, norms)
            self._judged[id(optimizer)] = plan
        if self._before and (id(optimizer), None) in self._plans:
            cols = self._plans[(id(optimizer), None)].columns
            torch._foreach_copy_([self._before[id(params[c])] for c in cols],
                                 [dist.local_view(params[c]).detach() for c in cols])
            self._copied.append(id(optimizer))

    def apply_guard(self, optimizer: torch.optim.Optimizer) -> None:
        """The guard's decision for this optimizer lands: its gradients scaled, its skip armed. Called after every
        reader of the step's gradients (the tick's collectors), just before ``optimizer.step``."""
        plan = self._judged.pop(id(optimizer), None)
        if plan is None:
            return
        params = self.layout.params
        self.guard.apply(optimizer, [dist.local_view(params[c].grad) for c in plan.columns])

    def batch_end(self, loss: Tensor | None, global_step: int, manual: bool) -> None:
        """A training batch ended: its loss; the step is complete once its optimizer stepped (automatic
        optimization: ``global_step`` moved; manual: the batch is the step)."""
        if self.open_step is None:
            return
        if isinstance(loss, Tensor):
            for c in self.collectors:
                c.add_loss(loss)
        if manual or global_step > self._global_step:
            if self._stepped or not manual:
                self._after_step()
            self.end()

    def end(self) -> None:
        """Close the open step (also when it ended without an optimizer step)."""
        if self.open_step is not None:
            for c in self.collectors:
                c.end()
            if self.guard is not None:
                self.guard.end()
            self._judged = {}
            self.open_step, self._copied = None, []

    # -- the shared maths ------------------------------------------------------------------
    def _plan(self, optimizer: torch.optim.Optimizer) -> _Plan | None:
        """The present gradients' columns of ``optimizer``: Python work done once per set of present grads."""
        cols = self.layout.optimizer_columns.get(id(optimizer))
        if not cols:
            return None
        params = self.layout.params
        present = tuple(c for c in cols if params[c].grad is not None)
        if not present:
            return None
        key = (id(optimizer), present if len(present) != len(cols) else None)
        plan = self._plans.get(key)
        if plan is None:
            device = self.layout.placement_index.device
            index = torch.tensor(present, dtype=torch.long, device=device)
            plan = _Plan(list(present), index, self.layout.placement_index[index])
            self._plans[key] = plan
        return plan

    def _after_step(self) -> None:
        """The step's optimizer steps ran: per-parameter update partials, if a collector wants them."""
        copied, self._copied = self._copied, []
        params = self.layout.params
        for opt in copied:
            plan = self._plans[(opt, None)]
            after = [dist.local_view(params[c]).detach() for c in plan.columns]
            before = [self._before[id(params[c])] for c in plan.columns]
            wide = [a.dtype in _HALF for a in after]  # bf16 weights would round a small update away
            after = [a.to(acc_dtype(a)) if w else a for a, w in zip(after, wide)]
            before = [b.to(acc_dtype(b)) if w else b for b, w in zip(before, wide)]
            norms = StepNorms(sumsq_partials(torch._foreach_sub(after, before)), plan.columns, plan.index,
                              plan.placement_index)
            for c in self.collectors:
                if c.wants_updates:
                    c.add_updates(norms)
