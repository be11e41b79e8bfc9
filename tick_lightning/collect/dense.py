"""Dense series: the loss, global gradient norm and (opt-in) global update norm of *every* optimizer step.

With the flight recorder, the exception to "nothing runs between ticks": ``DenseCollector`` is a step
collector (``base.StepCollector``) run on every step by ``stepwise.StepPhase``, which hands it the step's
per-parameter squared gradient norms (shared with the flight recorder). It does device work only -- one
``index_add_`` per optimizer and a loss ``add_`` into one preallocated device buffer (``[capacity + 1, columns]``,
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
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from tick_lightning import dist
from tick_lightning.collect.base import StepCollector
from tick_lightning.collect.stepwise import StepLayout, StepNorms
from tick_lightning.records import ROW_SCHEMA, Block
from tick_lightning.stats import partial_dtype

__all__ = ["DENSE_DEFAULT", "DENSE_SERIES", "DenseCollector", "DenseFlush", "dense_table"]

DENSE_SERIES = ("loss", "grad_norm", "update_norm")
#: what ``TickCallback(dense=True)`` records: the two series that cost a few kernels per step
DENSE_DEFAULT = ("loss", "grad_norm")


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
    lr: list = field(default_factory=list)  # per row: {param group name: learning rate} (host floats)

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
    groups = sorted({g for row in flush.lr for g in row})
    for group in groups:  # the learning rate of every step: a host float, no device work
        present = np.asarray([group in row for row in flush.lr] + [False] * (len(flush.steps) - len(flush.lr)))
        steps.append(np.asarray(flush.steps, dtype=np.int64)[present])
        epochs.append(np.asarray(flush.epochs, dtype=np.int32)[present])
        names += [f"lr/{group}"] * int(present.sum())
        out.append(np.asarray([row[group] for row in flush.lr if group in row], dtype=np.float64))
    order = np.argsort(np.concatenate(steps), kind="stable")  # step-major, series in their order
    return pa.table({
        "step": pa.array(np.concatenate(steps)[order]),
        "epoch": pa.array(np.concatenate(epochs)[order]),
        "state": pa.array(["dense"] * len(order), type=pa.string()),
        "name": pa.array(np.asarray(names, dtype=object)[order].tolist(), type=pa.string()),
        "stat": pa.array(["value"] * len(order), type=pa.string()),
        "value": pa.array(np.concatenate(out)[order]),
    }, schema=ROW_SCHEMA)


class DenseCollector(StepCollector):
    """Every optimizer step's scalars in one device buffer (see the module docstring); a step collector
    (``stepwise.StepCollector``) fed the step's shared per-parameter partials by ``stepwise.StepPhase``."""

    def __init__(self, series: Sequence[str], capacity: int) -> None:
        self.series = tuple(series)
        self.capacity = capacity
        self.wants_updates = "update_norm" in self.series
        self.steps: list[int] = []  # closed rows, in order: row i is step steps[i]
        self.epochs: list[int] = []
        self.open_step: int | None = None
        self._buf: Tensor | None = None
        self._groups: list[tuple[tuple, torch.device]] = []
        self._loss_seen: list[bool] = []
        self._lr: list[dict] = []  # per row: {param group name: lr}
        self._grad_seen: list[bool] = []
        self._update_seen: list[bool] = []
        self._epoch = 0

    @property
    def ready(self) -> bool:
        return self._buf is not None

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.capacity

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    @property
    def _grad_start(self) -> int:
        return 1

    @property
    def _update_start(self) -> int:
        return 1 + (len(self._groups) if "grad_norm" in self.series else 0)

    def setup(self, layout: StepLayout, device: torch.device) -> None:
        """At fit start: one column per placement of the layout's parameters, allocated once."""
        self._groups = list(layout.groups)
        width = self._update_start + (len(self._groups) if self.wants_updates else 0)
        self._buf = torch.zeros(self.capacity + 1, width, dtype=partial_dtype(torch.device(device)), device=device)
        self.steps, self.epochs, self.open_step = [], [], None
        self._loss_seen, self._grad_seen, self._update_seen, self._lr = [], [], [], []

    def teardown(self) -> None:
        self._buf = None
        self.steps, self.epochs, self.open_step = [], [], None
        self._loss_seen, self._grad_seen, self._update_seen, self._lr = [], [], [], []

    # -- per step: device ops only --------------------------------------------------
    @property
    def _row(self) -> int:
        return len(self.steps)

    def begin(self, step: int, epoch: int) -> None:
        self.open_step, self._epoch = step, epoch
        self._lr.append({})
        self._loss_seen.append(False)
        self._grad_seen.append(False)
        self._update_seen.append(False)

    def add_loss(self, loss: Tensor) -> None:
        if self.open_step is not None:
            self._buf[self._row, 0].add_(dist.local_view(loss.detach()).reshape(()).to(self._buf.dtype))
            self._loss_seen[self._row] = True

    def _add(self, start: int, norms: StepNorms) -> None:
        row = self._buf[self._row, start:start + len(self._groups)]
        row.index_add_(0, norms.placement_index, norms.sumsq.to(self._buf.dtype))

    def add_lr(self, values: dict[str, float]) -> None:
        """The step's learning rates (host floats of the param groups; a tensor learning rate is left out: reading
        it would be a host sync)."""
        if self.open_step is not None and self._lr:
            self._lr[-1].update(values)

    def add_grads(self, norms: StepNorms) -> None:
        if self.open_step is not None and "grad_norm" in self.series:
            self._add(self._grad_start, norms)
            self._grad_seen[self._row] = True

    def add_updates(self, norms: StepNorms) -> None:
        if self.open_step is not None:
            self._add(self._update_start, norms)
            self._update_seen[self._row] = True

    def end(self) -> None:
        """The open step is complete: its row joins the rows the next flush takes."""
        if self.open_step is not None:
            self.steps.append(self.open_step)
            self.epochs.append(self._epoch)
            self.open_step = None

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
        g = len(self._groups)
        grad = [gather.add(values[:, self._grad_start + i:self._grad_start + i + 1], *self._groups[i])
                for i in range(g)] if "grad_norm" in self.series else []
        update = [gather.add(values[:, self._update_start + i:self._update_start + i + 1], *self._groups[i])
                  for i in range(g)] if self.wants_updates else []
        flush = DenseFlush(self.steps, self.epochs, self.series, values, grad, update,
                           *(np.asarray(seen[:n], dtype=bool)
                             for seen in (self._loss_seen, self._grad_seen, self._update_seen)), lr=self._lr[:n])
        self._lr = self._lr[n:]
        if self.open_step is not None:
            self._buf[0].copy_(self._buf[n])
        self._buf[1 if self.open_step is not None else 0:].zero_()
        self.steps, self.epochs = [], []
        self._loss_seen, self._grad_seen = self._loss_seen[n:], self._grad_seen[n:]
        self._update_seen = self._update_seen[n:]
        return flush
