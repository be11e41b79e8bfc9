"""``TickLoop``: the records of ``TickCallback`` from a plain PyTorch training loop (a custom loop, Fabric, accelerate
without a Trainer), read by the same ``load_ticks`` and ``tick-lightning report``.

Four calls mark the loop's moments; each is what the Lightning hook of the same meaning is to ``TickCallback``::

    tick = TickLoop(model, optimizer, dirpath="runs/x/ticks", ticks="every:50", total_steps=1000)
    for batch in loader:
        tick.batch_begin()                      # a (micro-)batch begins
        loss = model(**batch).loss
        loss.backward()
        tick.gradients_ready()                  # once per optimizer step: accumulated, unscaled, before clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        tick.batch_end(loss)                    # the batch's back-propagated loss; after the step on its last batch
    tick.close()

With gradient accumulation, call ``batch_begin`` / ``batch_end`` around every micro-batch and ``gradients_ready`` only
before the optimizer steps (``batch_end``'s loss: the one back-propagated, already divided by the accumulation
steps, as Lightning's). A step is ``tick.step`` (optimizer steps done, from 0). ``with TickLoop(...) as tick:``
closes it and, on an exception, dumps the flight recorder with an ``"exception"`` event first. Checkpoints:
``tick.state_dict()`` (flushes the records up to now) beside the model's; ``TickLoop(..., state=saved)`` resumes with
every tick exactly once. Under ``torch.distributed`` (DDP) every rank makes one (``ranks=`` as in ``TickCallback``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from tick_lightning.core import TickCore, TrainerView

__all__ = ["TickLoop"]

class _LoopView(TrainerView):
    """``TickCore``'s trainer view of a plain loop: the step counter is ``TickLoop``'s."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None, accumulate: int,
                 scaler: torch.amp.GradScaler | None) -> None:
        fp16 = scaler is not None and scaler.is_enabled()
        super().__init__(optimizer, ".", accumulate=accumulate, scaler=scaler if fp16 else None,
                         precision="16-mixed" if fp16 else "32-true")
        self.global_step = 0
        self.max_steps = total_steps if total_steps is not None else -1
        self.estimated_stepping_batches = total_steps if total_steps is not None else math.inf


class TickLoop:
    """``TickCallback``'s records from a plain loop (module docstring): ``model`` and its ``optimizer``; ``total_steps``
    the run's optimizer steps when known (its last step is always recorded, as under Lightning); ``accumulate`` the
    micro-batches per optimizer step; ``scaler`` a ``torch.amp.GradScaler`` whose ``unscale_`` ran before
    ``gradients_ready`` (fp16: its skipped steps are recorded); ``state`` a ``state_dict()`` to resume from; the rest
    are ``TickCallback``'s arguments (``dirpath`` default ``ticks``).

    Example:
        >>> import tempfile, torch
        >>> from tick_lightning import load_ticks
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with TickLoop(model, opt, dirpath=tempfile.mkdtemp(), ticks="every:2", total_steps=4) as tick:
        ...     for _ in range(4):
        ...         tick.batch_begin()
        ...         loss = model(torch.randn(8, 4)).pow(2).mean()
        ...         loss.backward()
        ...         tick.gradients_ready()
        ...         opt.step(); opt.zero_grad()
        ...         tick.batch_end(loss)                   # doctest: +ELLIPSIS
        tick-lightning: records in ...; see them with: tick-lightning report ...
        >>> sorted(load_ticks(tick.dirpath).step.unique().tolist())
        [0, 2, 3]
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int | None = None,
                 accumulate: int = 1, scaler: torch.amp.GradScaler | None = None, state: dict | None = None,
                 dirpath: str | None = None, **tick: Any) -> None:
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"TickLoop(accumulate={accumulate!r}): must be an integer >= 1 (micro-batches per "
                             f"optimizer step).")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"TickLoop(total_steps={total_steps!r}): must be an integer >= 1, or None if unknown.")
        self.core = TickCore(dirpath=dirpath if dirpath is not None else "ticks", **tick)
        self.model = model
        self._view = _LoopView(optimizer, total_steps, accumulate, scaler)
        self._batch = 0  # micro-batches begun (Lightning's batch_idx)
        self._stepped = False
        self._closed = False
        if state is not None:
            self._view.global_step, self._batch = int(state["step"]), int(state["batch"])
        self.core.fit_begin(self._view, model, state["tick"] if state is not None else None)

    @property
    def step(self) -> int:
        """Optimizer steps done (the step the next ``batch_begin`` belongs to)."""
        return self._view.global_step

    @property
    def dirpath(self) -> str:
        return self.core.dirpath

    def batch_begin(self) -> None:
        """A (micro-)batch begins: a tick's collectors open on its step's first one."""
        self.core.batch_begin(self._view, self.model, self._batch)
        self._batch += 1

    def gradients_ready(self) -> None:
        """The optimizer steps next: its gradients are complete (accumulated, all-reduced, unscaled) and not clipped."""
        self._stepped = True
        self.core.gradients_ready(self._view, self.model, self._view.optimizers[0])

    def batch_end(self, loss: Tensor | None = None) -> None:
        """The (micro-)batch ended with ``loss`` (the one back-propagated; no host read); the step ends with its last
        one, after the optimizer stepped."""
        if self._stepped:
            self._stepped = False
            self._view.global_step += 1
        self.core.batch_end(self._view, loss, self._batch - 1)

    def state_dict(self) -> dict:
        """The loop's recording state for a checkpoint: every record up to now is flushed to disk first."""
        return {"tick": self.core.state_dict(), "step": self._view.global_step, "batch": self._batch}

    def close(self) -> None:
        """The end of training: the last records, the flight ring, the manifest's completion."""
        if not self._closed:
            self._closed = True
            self.core.fit_end(self._view, self.model)

    def __enter__(self) -> TickLoop:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and not self._closed:
            self._closed = True
            self.core.fit_failed(self._view, self.model, error)
            return
        self.close()
