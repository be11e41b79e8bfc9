"""The contract every state's collector keeps, and the ``Tick`` it works on.

A tick is one optimizer step being recorded (``Tick.step``, see ``steps.tick_step``). The callback
decides *when* (pure integers) and routes Lightning's hooks; a collector decides *what*, in five calls:

``open(tick)``
    the tick's first training batch starts (before its forward): attach observers, start timers.
``micro_batch(tick, loss)``
    a training batch of the tick ended; ``loss`` is what Lightning back-propagated (or ``None``).
``before_step(tick, optimizer, index)``
    ``on_before_optimizer_step`` of optimizer ``index`` (gradients unscaled, not yet clipped or applied).
    Under manual optimization each optimizer calls it at its own step.
``after_step(tick)``
    the tick's optimizer step(s) ended (``tick.stepped``; not called when the tick ended without a step).
``blocks(tick) -> list[Block]``
    the records, as ``records.Block`` with *device* values; the callback copies all blocks of all
    collectors to the host in one copy. Sharded partials are added to ``tick.gather`` in ``before_step``
    / ``after_step`` and read in ``blocks``, after the callback's one ``tick.gather.run()``.
``host_blocks(tick) -> list[Block]``
    host values known only after that copy (the step time, whose end event is recorded before it).
``close(tick)``
    always, also after an exception: undo every hook, drop every reference to tensors.

**The every-step phase** (``StepCollector``): the two collectors that run on *every* optimizer step, the
dense series (``dense.DenseCollector``) and the flight recorder (``flight.FlightRecorder``), keep a second,
smaller contract, fed by ``stepwise.StepPhase`` with the step's per-parameter partial sums (computed once
for both): ``setup`` / ``begin`` / ``add_loss`` / ``add_grads`` / ``add_updates`` / ``end`` / ``teardown``,
device work only; their rows reach the host when a flush takes them (``take(gather)``).

Budget every collector states and keeps: between ticks nothing runs; on a tick no host read and no
host-to-device copy (Python numbers enter device math as kernel arguments, never via ``torch.tensor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tick_lightning.dist import Gather
from tick_lightning.records import Block

__all__ = ["Collector", "StepCollector", "Tick"]


@dataclass
class Tick:
    """One recorded step: what is due, and the facts collectors share."""

    step: int
    due: frozenset
    device: torch.device
    trainer: Any = None
    optimizers: int = 1  # how many optimizers the trainer has (lr names, manual optimization)
    gather: Gather = field(default_factory=Gather)
    found_inf: Tensor | None = None  # > 0 when an fp16 GradScaler skipped (one of) the step's optimizer(s)
    stepped: bool = False  # an optimizer step happened (set before after_step)
    stepped_optimizers: int = 0  # how many optimizers' before_step ran
    guard_skip: Tensor | None = None  # > 0 when the guard skipped the step's update (TickCallback(guard=...))

    def add_guard_skip(self, value: Tensor | None) -> None:
        if value is not None:
            value = value.float()
            self.guard_skip = value if self.guard_skip is None else torch.maximum(self.guard_skip, value)

    def add_found_inf(self, value: Tensor | None) -> None:
        if value is not None:
            self.found_inf = value if self.found_inf is None else self.found_inf + value.to(self.found_inf.device)


class Collector:
    """One state (or a few that share work). Subclasses override what they need; see the module docstring."""

    #: the states this collector records; it is only called on ticks where one of them is due
    states: tuple[str, ...] = ()

    def wants(self, tick: Tick) -> bool:
        return any(s in tick.due for s in self.states)

    def open(self, tick: Tick) -> None:
        pass

    def micro_batch(self, tick: Tick, loss: Tensor | None) -> None:
        pass

    def before_step(self, tick: Tick, optimizer: torch.optim.Optimizer, index: int) -> None:
        pass

    def after_step(self, tick: Tick) -> None:
        pass

    def blocks(self, tick: Tick) -> list[Block]:
        return []

    def host_blocks(self, tick: Tick) -> list[Block]:
        return []

    def close(self, tick: Tick) -> None:
        pass

    def pause(self) -> None:
        """Validation / test / predict run inside the tick's window: observe nothing until ``resume``."""

    def resume(self) -> None:
        pass


class StepCollector:
    """The every-step phase's contract (see ``base.py`` for the tick phase's). Device work only.

    ``setup(layout, device)`` at fit start (allocate once); per step ``begin(step, epoch)``, ``add_loss(loss)``
    per training batch, ``add_grads(norms)`` per optimizer (gradients unscaled, not clipped),
    ``add_updates(norms)`` once the step's optimizer steps ran (only when ``wants_updates``), ``end()``;
    ``teardown()`` at fit end. ``nbytes``: the device memory it holds.
    """

    wants_updates = False

    def setup(self, layout, device: torch.device) -> None:  # layout: stepwise.StepLayout
        pass

    def begin(self, step: int, epoch: int) -> None:
        pass

    def add_loss(self, loss: Tensor) -> None:
        pass

    def add_grads(self, norms) -> None:  # norms: stepwise.StepNorms
        pass

    def add_updates(self, norms) -> None:
        pass

    def end(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return 0
