"""Dense series: the loss, global gradient norm and (opt-in) global update norm of *every* optimizer step.

The one exception to "nothing runs between ticks": ``DenseSeries`` runs on every step, so it does
device work only -- a few ``add_`` into one preallocated device buffer (``[capacity + 1, columns]``,
fp64), no host read, no host-to-device copy, no tensor made from host data. The step of each row is kept
on the host as a plain int. The buffer reaches the host with the next tick's one copy (``take`` adds its
partials to the tick's ``Gather`` and its block to the tick's ``records.to_host``), or on its own when it
is full (every ``capacity`` steps), at the end of fit and before a checkpoint.

Columns: ``0`` the loss (local, per rank, like the tick ``loss``); then one column per *placement* (set
of shard groups, ``stats.placement_key``) of the squared gradient norm's local partial sum, and the same
for the update norm. Under sharding the partial columns are summed over their ranks once per flush (one
collective per process group, in the tick's ``Gather``), so every step costs no collective.

``update_norm`` keeps a persistent copy of every trainable parameter's local view (one model's worth of
memory) and costs a copy, a subtraction and a norm per step: opt-in (``TickCallback(dense=[..., "update_norm"])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from tick_lightning import dist
from tick_lightning.records import ROW_SCHEMA, Block
from tick_lightning.spikes import Spike, detect_spikes
from tick_lightning.stats import _acc_dtype, _foreach_norm, _partial_dtype, placement_key

__all__ = ["DENSE_DEFAULT", "DENSE_SERIES", "DenseFlush", "DenseSeries", "SpikeWatch", "dense_table"]

DENSE_SERIES = ("loss", "grad_norm", "update_norm")
#: what ``TickCallback(dense=True)`` records: the two series that cost a few kernels per step
DENSE_DEFAULT = ("loss", "grad_norm")
#: the series ``spike:K`` and the report watch
SPIKE_SERIES = ("loss", "grad_norm")
_HALF = (torch.float16, torch.bfloat16)


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@dataclass
class DenseFlush:
    """The rows taken from the buffer at one flush; ``block()`` after the ``Gather`` ran."""

    steps: list[int]
    epochs: list[int]
    series: tuple[str, ...]
    values: Tensor  # [rows, columns]: the buffer's rows (a clone)
    grad: list  # Pending partial columns
    update: list
    loss_seen: np.ndarray
    grad_seen: np.ndarray
    update_seen: np.ndarray

    def block(self) -> Block:
        """A device block ``[rows, len(series)]`` for the tick's one copy (names: the steps, as strings)."""
        loss = self.values[:, 0]
        cols = {"loss": loss,
                "grad_norm": _total(self.grad, loss),
                "update_norm": _total(self.update, loss)}
        values = torch.stack([cols[s] for s in self.series], 1)
        return Block("dense", tuple(map(str, self.steps)), self.series, values)

    def host_values(self, block: Block) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{series: (values, present)}`` of the host block; ``present`` is False where the step had no such
        value (no loss returned, no optimizer step): such rows are not written and are no verdict."""
        present = {"loss": self.loss_seen, "grad_norm": self.grad_seen, "update_norm": self.update_seen}
        return {name: (np.asarray(block.values[:, j], dtype=np.float64), present[name])
                for j, name in enumerate(self.series)}


def _total(pending: list, like: Tensor) -> Tensor:
    if not pending:
        return torch.zeros_like(like)
    return sum(p.value.sum(0).reshape(-1).to(like.device) for p in pending).sqrt()


def dense_table(flush: DenseFlush, values: dict[str, tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """``records.ROW_SCHEMA`` rows ``state="dense"``, one per (step, series) present, ``stat="value"``."""
    steps, epochs, names, out = [], [], [], []
    for name, (v, present) in values.items():
        steps.append(np.asarray(flush.steps, dtype=np.int64)[present])
        epochs.append(np.asarray(flush.epochs, dtype=np.int32)[present])
        names += [name] * int(present.sum())
        out.append(v[present])
    order = np.argsort(np.concatenate(steps), kind="stable")  # step-major, series in their order
    return pa.table({
        "step": pa.array(np.concatenate(steps)[order]),
        "epoch": pa.array(np.concatenate(epochs)[order]),
        "state": pa.array(["dense"] * len(order), type=pa.string()),
        "name": pa.array(np.asarray(names, dtype=object)[order].tolist(), type=pa.string()),
        "stat": pa.array(["value"] * len(order), type=pa.string()),
        "value": pa.array(np.concatenate(out)[order]),
    }, schema=ROW_SCHEMA)


class DenseSeries:
    """Every optimizer step's scalars in one device buffer (see the module docstring).

    Per step: ``begin(step, epoch)`` at its first batch, ``add_loss`` per micro-batch, ``before_step`` per
    optimizer (gradients unscaled, not clipped), ``after_step`` once its optimizer steps ran, ``end()``.
    """

    def __init__(self, series: Sequence[str], capacity: int) -> None:
        self.series = tuple(series)
        self.capacity = capacity
        self.steps: list[int] = []  # closed rows, in order: row i is step steps[i]
        self.epochs: list[int] = []
        self.open_step: int | None = None
        self._buf: Tensor | None = None
        self._grad_cols: dict[tuple, int] = {}
        self._update_cols: dict[tuple, int] = {}
        self._groups: dict[tuple, tuple] = {}
        self._loss_seen: list[bool] = []
        self._grad_seen: list[bool] = []
        self._update_seen: list[bool] = []
        self._epoch = 0
        self._plans: dict[int, list] = {}
        self._before: dict[int, Tensor] = {}  # id(param) -> persistent copy of its local view
        self._copied: list[Tensor] = []  # parameters copied at this step's before_step

    @property
    def ready(self) -> bool:
        return self._buf is not None

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.capacity

    def setup(self, optimizers: Sequence[torch.optim.Optimizer], device: torch.device) -> None:
        """At fit start: the buffer's columns from the optimizers' parameters' placements, allocated once."""
        params = [p for o in optimizers for p in _params(o) if p.requires_grad]
        keys = list(dict.fromkeys(placement_key(p) for p in params))
        self._groups = {placement_key(p): (dist.shard_groups(p), dist.mesh_device(p)) for p in params}
        self._grad_cols = {k: 1 + i for i, k in enumerate(keys)} if "grad_norm" in self.series else {}
        start = 1 + len(self._grad_cols)
        self._update_cols = {k: start + i for i, k in enumerate(keys)} if "update_norm" in self.series else {}
        width = start + len(self._update_cols)
        self._buf = torch.zeros(self.capacity + 1, width, dtype=_partial_dtype(torch.device(device)), device=device)
        self.steps, self.epochs, self.open_step = [], [], None
        self._loss_seen, self._grad_seen, self._update_seen = [], [], []
        self._before, self._plans = {}, {}
        if self._update_cols:
            self._before = {id(p): torch.empty_like(dist.local_view(p).detach()) for p in params}

    def teardown(self) -> None:
        self._buf, self._before, self._copied = None, {}, []
        self.steps, self.epochs, self.open_step = [], [], None
        self._loss_seen, self._grad_seen, self._update_seen = [], [], []

    # -- per step: device ops only --------------------------------------------------
    @property
    def _row(self) -> int:
        return len(self.steps)

    def begin(self, step: int, epoch: int) -> None:
        """The first batch of ``step``: closes the previous step's row if it was still open."""
        if self.open_step is not None and self.open_step != step:
            self.end()
        if self.open_step is None:
            self.open_step, self._epoch = step, epoch
            self._loss_seen.append(False)
            self._grad_seen.append(False)
            self._update_seen.append(False)

    def add_loss(self, loss: Tensor) -> None:
        if self.open_step is not None and isinstance(loss, Tensor):
            self._buf[self._row, 0].add_(dist.local_view(loss.detach()).reshape(()).to(self._buf.dtype))
            self._loss_seen[self._row] = True

    def _plan_for(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, list[Tensor], bool]]:
        """``(grad column, parameters, sharded)`` per placement of ``optimizer``'s parameters, cached: the
        placement lookups are Python work that need not repeat every step."""
        plan = self._plans.get(id(optimizer))
        if plan is None:
            by_key: dict[tuple, list[Tensor]] = {}
            for p in _params(optimizer):
                if placement_key(p) in self._grad_cols:
                    by_key.setdefault(placement_key(p), []).append(p)
            plan = [(self._grad_cols[k], ps, any(dist.is_sharded(p) for p in ps)) for k, ps in by_key.items()]
            self._plans[id(optimizer)] = plan
        return plan

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.open_step is None:
            return
        if self._grad_cols:
            row, seen = self._buf[self._row], False
            for col, params, sharded in self._plan_for(optimizer):
                grads = [p.grad for p in params if p.grad is not None]
                if not grads:
                    continue
                seen = True
                if sharded:
                    grads = [dist.local_view(g) for g in grads]
                norms = torch._foreach_norm(grads, 2) if len({g.dtype for g in grads}) == 1 \
                    else _foreach_norm(grads, 2)  # mixed dtypes: one launch per dtype
                row[col].add_(torch.stack(norms).to(self._buf.dtype).square().sum().to(self._buf.device))
            self._grad_seen[self._row] = self._grad_seen[self._row] or seen
        params = _params(optimizer) if self._update_cols else ()
        if self._update_cols:
            chosen = [p for p in params if id(p) in self._before]
            if chosen:
                torch._foreach_copy_([self._before[id(p)] for p in chosen], [dist.local_view(p).detach() for p in chosen])
                self._copied.extend(chosen)

    def after_step(self) -> None:
        """The step's optimizer steps ran: the update norm of what they applied."""
        if self.open_step is None or not self._copied:
            return
        chosen, self._copied = self._copied, []
        by_key: dict[tuple, list[int]] = {}
        for i, p in enumerate(chosen):
            by_key.setdefault(placement_key(p), []).append(i)
        for key, idx in by_key.items():
            col = self._update_cols.get(key)
            if col is None:
                continue
            after = [dist.local_view(chosen[i]).detach() for i in idx]
            before = [self._before[id(chosen[i])] for i in idx]
            wide = [a.dtype in _HALF for a in after]  # bf16 weights would round a small update away
            after = [a.to(_acc_dtype(a)) if w else a for a, w in zip(after, wide)]
            before = [b.to(_acc_dtype(b)) if w else b for b, w in zip(before, wide)]
            norms = torch._foreach_norm(torch._foreach_sub(after, before), 2)
            sumsq = torch.stack(norms).to(self._buf.dtype).square().sum()
            self._buf[self._row, col].add_(sumsq.to(self._buf.device))
        self._update_seen[self._row] = True

    def end(self) -> None:
        """The open step is complete: its row joins the rows the next flush takes."""
        if self.open_step is not None:
            self.steps.append(self.open_step)
            self.epochs.append(self._epoch)
            self.open_step, self._copied = None, []

    # -- flush ------------------------------------------------------------------------
    def take(self, gather: dist.Gather) -> DenseFlush | None:
        """The closed rows (partials added to ``gather``); the buffer is free for the next steps at once.

        Every rank calls it at the same step (ticks, a full buffer, end of fit, a checkpoint): its
        collectives are in ``gather``. An open row (a checkpoint between accumulation micro-batches) moves
        to row 0 and stays open.
        """
        n = len(self.steps)
        if self._buf is None or n == 0:
            return None
        values = self._buf[:n].clone()
        grad = [gather.add(values[:, col:col + 1], *self._groups[key]) for key, col in self._grad_cols.items()]
        update = [gather.add(values[:, col:col + 1], *self._groups[key]) for key, col in self._update_cols.items()]
        flush = DenseFlush(self.steps, self.epochs, self.series, values, grad, update,
                           *(np.asarray(seen[:n], dtype=bool)
                             for seen in (self._loss_seen, self._grad_seen, self._update_seen)))
        if self.open_step is not None:
            self._buf[0].copy_(self._buf[n])
        self._buf[1 if self.open_step is not None else 0:].zero_()
        self.steps, self.epochs = [], []
        self._loss_seen, self._grad_seen = self._loss_seen[n:], self._grad_seen[n:]
        self._update_seen = self._update_seen[n:]
        return flush


class SpikeWatch:
    """Online ``spikes.detect_spikes`` on the dense series as they reach the host, trailing window kept.

    ``observe`` returns the spikes among the new values only: each verdict depends on its own trailing
    ``window`` values, so this equals running ``detect_spikes`` over the whole series.
    """

    def __init__(self, series: Sequence[str] = SPIKE_SERIES, window: int = 128, **rule) -> None:
        self.series, self.window, self.rule = tuple(series), window, rule
        self._steps: dict[str, np.ndarray] = {s: np.empty(0, dtype=np.int64) for s in self.series}
        self._values: dict[str, np.ndarray] = {s: np.empty(0) for s in self.series}

    def observe(self, steps: Sequence[int], values: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, Spike]]:
        """The spikes among the new ``(values, present)`` of each watched series (``DenseFlush.host_values``)."""
        found = []
        for name in self.series:
            if name not in values:
                continue
            v_new, present = values[name]
            new_steps = np.asarray(steps, dtype=np.int64)[present]
            if not len(new_steps):
                continue
            s = np.concatenate([self._steps[name], new_steps])
            v = np.concatenate([self._values[name], v_new[present]])
            new = set(new_steps.tolist())
            found += [(name, sp) for sp in detect_spikes(s, v, window=self.window, **self.rule) if sp.step in new]
            finite = np.isfinite(v)  # non-finite values never enter a history
            self._steps[name], self._values[name] = s[finite][-self.window:], v[finite][-self.window:]
        return found

    def state_dict(self) -> dict[str, list]:
        """The trailing windows (at most ``window`` steps and values per series): a resumed fit's verdicts are
        then those of the uninterrupted one, instead of none until ``min_history`` new steps."""
        return {name: [self._steps[name].tolist(), self._values[name].tolist()] for name in self.series}

    def load_state_dict(self, state: dict[str, list]) -> None:
        for name, (steps, values) in state.items():
            if name in self._steps:
                self._steps[name] = np.asarray(steps, dtype=np.int64)[-self.window:]
                self._values[name] = np.asarray(values, dtype=np.float64)[-self.window:]
