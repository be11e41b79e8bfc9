"""Per-parameter states: ``weight``, ``grad``, ``update`` (and ``snapshot`` copies).

Every statistic is exact under sharding: local partials go to ``tick.gather`` (one collective per
process group per tick) and are combined in ``blocks``. Memory on a tick, beyond the statistics'
temporaries (at most the fp32 size of the largest local parameter piece, or ~64M elements for ``update``):
``update`` holds one copy of the selected trainable parameters' *local* shards from the optimizer step
until its end (on the device, or in pinned host memory with ``update_on_host=True``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tick_lightning import dist
from tick_lightning.collect.base import Collector, Tick
from tick_lightning.records import Block
from tick_lightning.stats import (
    TENSOR_STATS,
    grad_norm_partials,
    nonfinite_partials,
    tensor_stats_deferred,
    update_partials,
)

__all__ = ["GradCollector", "HistogramCollector", "ParamSet", "SnapshotCollector", "UpdateCollector",
           "WeightCollector"]

UPDATE_STATS = ("norm", "ratio")

# The optimizer stepping parameters that have no gradients trains nothing, silently. The usual cause under
# FSDP2: a forward output FSDP2 cannot traverse, so it never hooks its post-backward reshard; gradients then
# land on the unsharded parameters the module holds, not on the sharded ones the optimizer holds.
_NO_GRADS = ("TickCallback: at step {step} none of optimizer {index}'s trainable parameters has a gradient, so "
             "its step changes nothing and no 'grad' is recorded. Under FSDP2 (fully_shard) the model's forward "
             "must return tensors FSDP2 can traverse (a tensor, tuple, dict, dataclass or transformers "
             "ModelOutput); otherwise it never reshards after backward and the gradients stay on unsharded "
             "parameters the optimizer does not hold.")


@dataclass
class ParamSet:
    """The parameters per-parameter states record (``select=``), by the names the user's model has."""

    selected: list[tuple[str, Tensor]] = field(default_factory=list)

    @property
    def trainable(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self.selected if p.requires_grad]


def optimizer_params(optimizer: torch.optim.Optimizer, trainable: bool = False) -> list[Tensor]:
    """The parameters an optimizer steps, in its groups' order (``trainable``: only those requiring a gradient)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad or not trainable]


class WeightCollector(Collector):
    """Weights *before* the tick's update, read at the first optimizer's ``before_step``."""

    states = ("weight",)

    def __init__(self, params: ParamSet) -> None:
        self.params = params
        self._stats = None

    def open(self, tick: Tick) -> None:
        self._stats = None

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        if self._stats is None and self.params.selected:  # other optimizers' weights have not moved yet
            self._stats = tensor_stats_deferred([p.detach() for _, p in self.params.selected], tick.gather)

    def blocks(self, tick: Tick) -> list[Block]:
        if self._stats is None:
            return []
        return [Block("weight", tuple(n for n, _ in self.params.selected), TENSOR_STATS, self._stats.result())]

    def close(self, tick: Tick) -> None:
        self._stats = None


class GradCollector(Collector):
    """Gradients at each optimizer's own step; the global norm over *every* parameter it steps.

    The global ``grad//norm`` is what ``clip_grad_norm_`` over the optimizer's parameters sees (all trainable
    parameters, whatever ``select`` narrows); with several optimizers, the norm of all their gradients,
    each taken at its own step. ``grad//nonfinite`` counts non-finite elements over the same parameters.
    """

    states = ("grad",)

    def __init__(self, params: ParamSet) -> None:
        self.params = params
        self._parts: list = []
        self._warned_no_grads = False
        self.warn_without_grads = True  # off under DeepSpeed, whose gradients never reach .grad

    def open(self, tick: Tick) -> None:
        self._parts, self._norms, self._nonfinite = [], [], []

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        stepped = {id(p) for p in optimizer_params(optimizer)}
        chosen = [(n, p) for n, p in self.params.trainable if id(p) in stepped and p.grad is not None]
        if chosen:
            self._parts.append(([n for n, _ in chosen], tensor_stats_deferred([p.grad for _, p in chosen], tick.gather)))
        grads = [p.grad for p in optimizer_params(optimizer) if p.grad is not None]
        if not grads and self.warn_without_grads and not self._warned_no_grads and any(p.requires_grad for p in optimizer_params(optimizer)):
            self._warned_no_grads = True
            warnings.warn(_NO_GRADS.format(step=tick.step, index=index), stacklevel=2)
        if grads:
            self._norms.append(grad_norm_partials(grads, tick.gather))
            chosen_ids = {id(p) for _, p in chosen}
            others = [p.grad for p in optimizer_params(optimizer) if p.grad is not None and id(p) not in chosen_ids]
            if others:  # the selected ones' counts come with their rows
                self._nonfinite.append(nonfinite_partials(others, tick.gather))

    def blocks(self, tick: Tick) -> list[Block]:
        names = [n for n, _ in self.params.trainable]
        if not self._norms:
            return []
        rows: dict[str, Tensor] = {}
        for part_names, stats in self._parts:
            rows.update(zip(part_names, stats.result().unbind(0)))
        device = self._norms[0].result().device
        nan = torch.full((len(TENSOR_STATS),), float("nan"), device=device)
        values = torch.stack([rows[n].to(device) if n in rows else nan for n in names]) if names else None
        sumsq = sum(norm.result().to(device) for norm in self._norms)
        nonfinite = sum((c.result().to(device) for c in self._nonfinite), torch.zeros(1, 1, device=device,
                                                                                       dtype=sumsq.dtype))
        if values is not None:
            nonfinite = nonfinite + values[:, 4].nansum().to(sumsq.dtype)
        out = [Block("grad", ("",), ("norm", "nonfinite"), torch.cat([sumsq.sqrt(), nonfinite.reshape(1, 1)], 1))]
        if values is not None:
            out.insert(0, Block("grad", tuple(names), TENSOR_STATS, values))
        return out

    def close(self, tick: Tick) -> None:
        self._parts, self._norms, self._nonfinite = [], [], []


class UpdateCollector(Collector):
    """The change each optimizer step applied: ``norm`` and ``ratio`` (to the weight norm before it).

    A copy of each selected trainable parameter's local view is taken at its optimizer's ``before_step``
    (in pinned host memory with ``on_host=True``: a non-blocking device-to-host copy per parameter, which
    frees the device of the copy at the cost of two transfers) and compared after the step.
    A step the fp16 scaler skipped applied nothing: its rows are NaN.
    """

    states = ("update",)

    def __init__(self, params: ParamSet, on_host: bool = False) -> None:
        self.params = params
        self.on_host = on_host
        self._before: dict[str, tuple[Tensor, Tensor]] = {}
        self._host_buffers: dict[str, Tensor] = {}  # pinned, reused across ticks
        self._stats = None
        self._names: list[str] = []

    def open(self, tick: Tick) -> None:
        self._before, self._stats, self._names = {}, None, []

    def _copy(self, name: str, view: Tensor) -> Tensor:
        if not self.on_host or view.device.type == "cpu":
            return view.detach().clone()
        buffer = self._host_buffers.get(name)
        if buffer is None or buffer.shape != view.shape or buffer.dtype != view.dtype:
            buffer = torch.empty(view.shape, dtype=view.dtype, device="cpu", pin_memory=True)
            self._host_buffers[name] = buffer
        return buffer.copy_(view.detach(), non_blocking=True)

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        stepped = {id(p) for p in optimizer_params(optimizer)}
        for name, p in self.params.trainable:
            if id(p) in stepped and name not in self._before:
                self._before[name] = (p, self._copy(name, dist.local_view(p)))

    def after_step(self, tick: Tick) -> None:
        if not self._before:
            return
        self._names = list(self._before)
        params = [p for p, _ in self._before.values()]
        copies = [c for _, c in self._before.values()]
        self._stats = update_partials([p.detach() for p in params], copies, tick.gather)
        self._before = {}  # partials are computed: the copies can go

    def blocks(self, tick: Tick) -> list[Block]:
        if self._stats is None:
            return []
        values = self._stats.result()
        if tick.found_inf is not None:  # a skipped fp16 step applied no update: not counted as one
            values = torch.where(tick.found_inf.reshape(1, 1).to(values.device) > 0,
                                 torch.full_like(values, float("nan")), values)
        return [Block("update", tuple(self._names), UPDATE_STATS, values)]

    def close(self, tick: Tick) -> None:
        self._before, self._stats = {}, None


class HistogramCollector(Collector):
    """``weight_hist`` / ``grad_hist``: per-parameter histograms (``tick_lightning.histograms``, fixed log2 bins
    of |x| plus zero, sign and non-finite counts) of the selected parameters' weights before the update, or
    of their gradients at each optimizer's step; device values in the tick's one copy, sharded counts in
    the tick's ``Gather``."""

    def __init__(self, params: ParamSet, state: str) -> None:
        if state not in ("weight_hist", "grad_hist"):
            raise ValueError(f"HistogramCollector(state={state!r}): valid: 'weight_hist', 'grad_hist'.")
        self.params, self.states = params, (state,)
        self._parts: list = []

    def open(self, tick: Tick) -> None:
        self._parts = []

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        from tick_lightning.histograms import histogram_partials

        if self.states[0] == "weight_hist":
            if not self._parts and self.params.selected:  # other optimizers' weights have not moved yet
                self._parts.append(([n for n, _ in self.params.selected], histogram_partials(
                    [p.detach() for _, p in self.params.selected], tick.gather)))
            return
        stepped = {id(p) for p in optimizer_params(optimizer)}
        chosen = [(n, p) for n, p in self.params.trainable if id(p) in stepped and p.grad is not None]
        if chosen:
            self._parts.append(([n for n, _ in chosen], histogram_partials([p.grad for _, p in chosen], tick.gather)))

    def blocks(self, tick: Tick) -> list[Block]:
        from tick_lightning.histograms import COLUMNS

        return [Block(self.states[0], tuple(names), COLUMNS, part.result()) for names, part in self._parts]

    def close(self, tick: Tick) -> None:
        self._parts = []


class SnapshotCollector(Collector):
    """Full host copies of the selected parameters before the update (``full_tensor`` when sharded)."""

    states = ("snapshot",)

    def __init__(self, params: ParamSet) -> None:
        self.params = params
        self.tensors: dict[str, Tensor] | None = None

    def open(self, tick: Tick) -> None:
        self.tensors = None

    def before_step(self, tick: Tick, optimizer, index: int) -> None:
        if self.tensors is None:
            self.tensors = {n: (p.full_tensor() if dist.is_sharded(p) else p).detach().cpu().clone()
                            for n, p in self.params.selected}

    def close(self, tick: Tick) -> None:
        self.tensors = None
