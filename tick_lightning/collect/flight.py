"""The flight recorder: every parameter's gradient norm at *every* step, kept on the device for the last
``window`` steps and written only around what matters.

A fault in one layer between ticks shows up in the dense series as a global spike; which layer went first
needs each layer's own series at the steps before it. ``FlightRecorder`` keeps them in a preallocated
device ring buffer of ``window`` rows (one per step) and one column per trainable parameter:

- ``grad_norm``: the parameter's gradient L2 norm (after unscaling, before clipping), from the squared
  norms ``stepwise.StepPhase`` computes once per step for the dense global norm too (``stats.sumsq_partials``);
- ``nonfinite``: whether that gradient had a NaN or inf element -- derived on the host from the same
  partial (a non-finite element makes its squared norm non-finite), so it costs nothing on the device;
- ``update_norm`` (opt-in): the L2 norm of the update the optimizer applied (shares the dense update copy);
- ``input_absmax`` (on by default where the model has normalization layers): each normalization layer's max
  |input| over the step's training batches (forward pre-hooks on those layers for the whole fit);
- ``attn_logit`` (on by default where the model has attention blocks): each attention block's logit scale
  ``rms(q) rms(k) sqrt(head_dim)`` over the step's training batches (their max; forward hooks on its query and key
  projections for the whole fit: ``collect.attention``), the early warning of attention-logit growth, and in one
  more column the output head's logit rms (``collect.attention.output_head``).

``FLIGHT_DEFAULT`` (``flight=True``) is the two hooked series: per step a few small device ops per hooked module,
no host read (their cost: docs/benchmarks.md, "Attention-logit early warning"); ``flight=[]`` keeps the gradient
ring alone, with no hook between ticks.

The two hooked extras write one fixed buffer each (no Python state that changes by step), copied into the ring's
row when the step ends: under ``torch.compile`` the hooks are traced once into the graph.

Per step: one ``index_copy_`` per optimizer into the ring's row (two with ``update_norm``), no host read, no
host-to-device copy, no collective. Under sharding the ring holds each rank's *local* partials; a dump adds
them to the flush's ``dist.Gather`` (one collective per process group) and takes square roots after.

**Memory** (stated, bounded, independent of the run's length): ``window x parameters x 8`` bytes for
``grad_norm`` (fp64 partials), the same again for ``update_norm``, ``window x norm layers x 4`` for
``input_absmax``, ``window x attention blocks x 4`` for ``attn_logit``. A 7B Llama (291 parameter tensors) at
``window=128``: 298 KB.

**Dumps**: ``take(gather)`` returns the ring's complete steps not yet written (each step is written at most
once per attempt: a watermark), oldest first. The callback dumps around every event (a spike or non-finite
value the spike trigger found at a flush, a layer's gradient or norm-input jump its layer watch found, an
exception), at a checkpoint and at the end of fit, and
``after`` steps after an event once they have passed (``post_due``), so an event's window holds the steps
on both sides. Rows ``state="flight"`` (``flight_table``) and ``state="flight_event"`` (``event_table``);
their schema is in docs/records.md.

**Watch**: ``take(gather, watch=True)`` at every dense flush returns the steps the layer watch
(``triggers.LayerWatch``) has not seen, gradient norms and, where recorded, update norms (both reduced over the
shards), ``input_absmax`` and ``attn_logit`` (each rank's own, never gathered) in the same host copy (and
``Gather``); a layer whose gradient norm or norm input jumps (or falls, or climbs and stays), whose update jumps,
or an attention block whose logit scale jumps or climbs, is an event like a spike of the dense series. Those rows
are not written unless a dump takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from tick_lightning import dist
from tick_lightning.collect.base import StepCollector
from tick_lightning.collect.stepwise import StepLayout, StepNorms
from tick_lightning.records import ROW_SCHEMA, Block
from tick_lightning.stats import partial_dtype

__all__ = ["FLIGHT_DEFAULT", "FLIGHT_EXTRAS", "FLIGHT_STATS", "FlightDump", "FlightRecorder", "event_table"]

#: every stat a flight row can have; ``grad_norm`` and ``nonfinite`` are always recorded
FLIGHT_STATS = ("grad_norm", "nonfinite", "update_norm", "input_absmax", "attn_logit")
#: the opt-in ones (``TickCallback(flight=[...])``)
FLIGHT_EXTRAS = ("update_norm", "input_absmax", "attn_logit")
#: ``flight=True``: the hooked series (``update_norm`` keeps a copy of the weights: opt-in)
FLIGHT_DEFAULT = ("input_absmax", "attn_logit")


def _mean_square(t: Tensor) -> Tensor:
    """mean(t**2) accumulated in fp32 without an fp32 copy of ``t`` (a bf16 projection output stays as it is)."""
    return torch.linalg.vector_norm(t, dtype=torch.float32).square() / t.numel()


@dataclass
class FlightDump:
    """The ring rows taken at one dump: ``blocks()`` after the ``Gather`` ran, ``table(host)`` after the copy."""

    steps: list[int]
    epochs: list[int]
    names: tuple[str, ...]
    present: np.ndarray  # [rows, parameters]: the parameter had a gradient at that step
    grad: list  # (device column index, Pending) per placement
    update: list
    absmax: Tensor | None
    norm_names: tuple[str, ...]
    width: int
    like: Tensor
    attn: Tensor | None = None
    attn_names: tuple[str, ...] = ()

    def _combine(self, pending: list) -> Tensor:
        if len(pending) == 1 and pending[0][0] is None:  # one placement holding every column, in order
            return pending[0][1].value.sum(0)
        out = torch.zeros(len(self.steps), self.width, dtype=self.like.dtype, device=self.like.device)
        for index, p in pending:
            out.index_copy_(1, index.to(out.device), p.value.sum(0).to(out.device))
        return out

    def blocks(self) -> list[Block]:
        """Device blocks for the flush's one copy: squared norms ``[rows, parameters]`` (names: steps)."""
        steps = tuple(map(str, self.steps))
        out = [Block("flight", steps, self.names, self._combine(self.grad))]
        if self.update:
            out.append(Block("flight_update", steps, self.names, self._combine(self.update)))
        if self.absmax is not None:
            out.append(Block("flight_absmax", steps, self.norm_names, self.absmax))
        if self.attn is not None:
            out.append(Block("flight_attn", steps, self.attn_names, self.attn))
        return out

    def table(self, host: Sequence[Block]) -> pa.Table:
        """``records.ROW_SCHEMA`` rows ``state="flight"``: per step, per parameter that had a gradient."""
        by_state = {b.state: np.asarray(b.values, dtype=np.float64) for b in host}
        rows, cols = np.nonzero(self.present)
        parts = []
        grad = by_state["flight"][rows, cols]
        parts.append(("grad_norm", rows, cols, self.names, np.sqrt(grad)))
        parts.append(("nonfinite", rows, cols, self.names, (~np.isfinite(grad)).astype(np.float64)))
        if "flight_update" in by_state:
            parts.append(("update_norm", rows, cols, self.names, np.sqrt(by_state["flight_update"][rows, cols])))
        if "flight_absmax" in by_state:
            values = by_state["flight_absmax"]
            r, c = np.nonzero(np.ones_like(values, dtype=bool))
            parts.append(("input_absmax", r, c, self.norm_names, values[r, c]))
        if "flight_attn" in by_state:
            values = by_state["flight_attn"]
            r, c = np.nonzero(values > 0)  # 0: no training forward reached the block that step
            parts.append(("attn_logit", r, c, self.attn_names, values[r, c]))
        steps = np.asarray(self.steps, dtype=np.int64)
        epochs = np.asarray(self.epochs, dtype=np.int32)
        names = [np.asarray(n, dtype=object)[c] for _, _, c, n, _ in parts] if parts else []
        return pa.table({
            "step": pa.array(np.concatenate([steps[r] for _, r, _, _, _ in parts])),
            "epoch": pa.array(np.concatenate([epochs[r] for _, r, _, _, _ in parts])),
            "state": pa.array(["flight"] * sum(len(r) for _, r, _, _, _ in parts), type=pa.string()),
            "name": pa.array(np.concatenate(names).tolist(), type=pa.string()),
            "stat": pa.array(np.concatenate([np.full(len(r), s, dtype=object) for s, r, _, _, _ in parts]).tolist(),
                             type=pa.string()),
            "value": pa.array(np.concatenate([v for *_, v in parts])),
        }, schema=ROW_SCHEMA)


def event_table(events: Sequence, epoch: int = 0) -> pa.Table:
    """Rows ``state="flight_event"``: one per event (``triggers.Event``), ``stat="z"``; ``name`` its trigger, and
    for an event of one column (a layer's jump, fall, zero or trend) ``<trigger>@<column>``: its column in the
    manifest's ``flight.parameters`` (``flight.norm_layers`` for ``input*`` triggers)."""
    rows = [(e.step, e.trigger if getattr(e, "column", -1) < 0 else f"{e.trigger}@{e.column}", "z", float(e.z))
            for e in events]
    return pa.table({
        "step": pa.array([r[0] for r in rows], type=pa.int64()),
        "epoch": pa.array([epoch] * len(rows), type=pa.int32()),
        "state": pa.array(["flight_event"] * len(rows), type=pa.string()),
        "name": pa.array([r[1] for r in rows], type=pa.string()),
        "stat": pa.array([r[2] for r in rows], type=pa.string()),
        "value": pa.array([r[3] for r in rows], type=pa.float64()),
    }, schema=ROW_SCHEMA)


class FlightRecorder(StepCollector):
    """Per-parameter series of the last ``window`` steps in a device ring (module docstring).

    Args:
        window: steps held (the ring's rows).
        extras: opt-in stats, a subset of ``FLIGHT_EXTRAS``.
        after: steps after an event that its dump waits for (default ``window // 4``).
        norm_modules: ``(name, module)`` of the normalization layers ``input_absmax`` observes.
        attention: the ``collect.attention.AttentionBlock`` s ``attn_logit`` observes.
    """

    def __init__(self, window: int = 128, extras: Sequence[str] = (), after: int | None = None,
                 norm_modules: Sequence[tuple[str, nn.Module]] = (), attention: Sequence = ()) -> None:
        self.window = window
        self.extras = tuple(e for e in FLIGHT_EXTRAS if e in extras)
        self.after = window // 4 if after is None else after
        self.wants_updates = "update_norm" in self.extras
        self.norm_modules = list(norm_modules)
        self.attention = list(attention)
        self._grad: Tensor | None = None
        self._update: Tensor | None = None
        self._absmax: Tensor | None = None
        self._hooks: list = []
        self.teardown()

    # -- fit start / end ----------------------------------------------------------------
    def setup(self, layout: StepLayout, device: torch.device) -> None:
        """Allocate the ring once; place each column's partials with its placement's shard groups."""
        self.teardown()
        self.layout = layout
        dtype = partial_dtype(torch.device(device))
        self._grad = torch.zeros(self.window, layout.width, dtype=dtype, device=device)
        if self.wants_updates:
            self._update = torch.zeros_like(self._grad)
        by_placement: dict[int, list[int]] = {}
        for c, g in enumerate(layout.placement):
            by_placement.setdefault(g, []).append(c)
        self._placements = [(torch.tensor(cols, dtype=torch.long, device=device), layout.groups[g])
                            for g, cols in by_placement.items()]
        if "input_absmax" in self.extras and self.norm_modules:
            self._absmax = torch.zeros(self.window, len(self.norm_modules), dtype=torch.float32, device=device)
            self._absmax_now = torch.zeros(len(self.norm_modules), dtype=torch.float32, device=device)  # the hooks'
            self._hooks = [m.register_forward_pre_hook(self._observer(j)) for j, (_, m) in enumerate(self.norm_modules)]
        if "attn_logit" in self.extras and self.attention:
            n = len(self.attention)
            self._attn = torch.zeros(self.window, n, dtype=torch.float32, device=device)
            # [0:n] this step's max over micro-batches of mean(q^2) * mean(k^2) per block; [n:2n] the last micro-batch's
            # mean(q^2) (the query projection runs before the key's): one fixed buffer the hooks write, copied into
            # the ring's row when the step ends
            self._attn_now = torch.zeros(2 * n, dtype=torch.float32, device=device)
            self._attn_scale = torch.tensor([b.scale for b in self.attention], dtype=torch.float32, device=device)
            for j, block in enumerate(self.attention):
                if block.output:
                    self._hooks.append(block.query.register_forward_hook(self._qk_observer(j, n, "out")))
                elif block.fused:
                    self._hooks.append(block.query.register_forward_hook(self._qk_observer(j, n, "qk")))
                else:
                    self._hooks.append(block.query.register_forward_hook(self._qk_observer(j, n, "q")))
                    self._hooks.append(block.key.register_forward_hook(self._qk_observer(j, n, "k")))

    def teardown(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.layout: StepLayout | None = None
        self._grad = self._update = self._absmax = self._absmax_now = self._attn = self._attn_now = None
        self._placements: list = []
        self._slot_step = [-1] * self.window  # host: the step each row holds (-1: none)
        self._slot_epoch = [0] * self.window
        self._slot_present: list[list] = [[] for _ in range(self.window)]  # host: columns with a gradient
        self._count = 0  # steps begun this fit
        self._slot: int | None = None  # the open step's row
        self.written = -1  # the last step written: nothing at or before it is written again
        self.watched = -1  # the last step the layer watch has seen (take(watch=True))
        self.post_until: int | None = None

    @property
    def ready(self) -> bool:
        return self._grad is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._grad, self._update, self._absmax, self._attn)
                   if t is not None)

    def manifest(self) -> dict:
        """What the records need to be read (docs/records.md): parameters in registration order, layers."""
        return {"window": self.window, "after": self.after, "stats": ["grad_norm", "nonfinite", *self.extras],
                "parameters": list(self.layout.names) if self.layout else [],
                "norm_layers": [n for n, _ in self.norm_modules] if self._absmax is not None else [],
                "attention_blocks": [b.name for b in self.attention] if self._attn is not None else [],
                "output_logits": [b.name for b in self.attention if b.output] if self._attn is not None else []}

    # -- per step: device ops only ---------------------------------------------------------
    def begin(self, step: int, epoch: int) -> None:
        slot = self._count % self.window
        self._count += 1
        self._slot = slot
        self._slot_step[slot], self._slot_epoch[slot], self._slot_present[slot] = -1, epoch, []
        self._open_step = step
        if self._absmax_now is not None:
            self._absmax_now.zero_()
        if self._attn_now is not None:
            self._attn_now.zero_()

    def add_grads(self, norms: StepNorms) -> None:
        if self._slot is not None:
            self._grad[self._slot].index_copy_(0, norms.index, norms.sumsq.to(self._grad.dtype))
            self._slot_present[self._slot].append(norms.columns)

    def add_updates(self, norms: StepNorms) -> None:
        if self._slot is not None and self._update is not None:
            self._update[self._slot].index_copy_(0, norms.index, norms.sumsq.to(self._update.dtype))

    def end(self) -> None:
        if self._slot is not None:
            if self._absmax is not None:
                self._absmax[self._slot].copy_(self._absmax_now)
            if self._attn is not None:  # rms(q) rms(k) sqrt(head_dim) of the step's largest micro-batch
                row = self._attn[self._slot]
                torch.sqrt(self._attn_now[:len(self.attention)], out=row)
                row.mul_(self._attn_scale)
            self._slot_step[self._slot] = self._open_step  # complete: a dump may take it
            self._slot = None

    def _observer(self, j: int):
        now = self._absmax_now  # one fixed tensor (see _qk_observer): traced once under torch.compile

        def hook(module: nn.Module, args: tuple) -> None:
            if not module.training or not args or not isinstance(args[0], Tensor):
                return  # validation / predict forwards are not training steps
            amax = dist.local_view(args[0]).detach().abs().amax().float()
            torch.maximum(now[j], amax.to(now.device), out=now[j])

        return hook

    def _qk_observer(self, j: int, n: int, part: str):
        """A forward hook on block ``j``'s query (``part="q"``: keeps its mean square), key (``"k"``: the product
        with the query's, into this step's max) or fused q | k | v projection (``"qk"``: both at once)."""
        now = self._attn_now  # one fixed tensor, no Python state that changes by step: under torch.compile the
        # hook is traced once (reading the ring's slot here recompiled every step, and past dynamo's limit the model
        # ran eagerly); forwards outside a step write into it too, and begin() zeroes it

        def hook(module: nn.Module, args: tuple, output) -> None:
            if not module.training or not isinstance(output, Tensor):
                return  # validation / predict forwards are not training steps
            out = dist.local_view(output).detach()
            if part == "q":
                now[n + j].copy_(_mean_square(out))
                return
            if part == "out":  # the output head: its logits' mean square (scale 1)
                product = _mean_square(out)
            elif part == "qk":
                q, k, _ = out.chunk(3, dim=-1)
                product = _mean_square(q) * _mean_square(k)
            else:
                product = now[n + j] * _mean_square(out).to(now.device)
            torch.maximum(now[j], product.to(now.device), out=now[j])

        return hook

    # -- dumps ------------------------------------------------------------------------------
    def arm(self, step: int) -> None:
        """An event was found at a flush ending at ``step`` (rank-identical): dump again ``after`` steps on."""
        self.post_until = max(self.post_until if self.post_until is not None else -1, step + self.after)

    def post_due(self, step: int) -> bool:
        """Whether the post-event dump is due at the start of ``step`` (integers only)."""
        return self.post_until is not None and step > self.post_until

    def take(self, gather: dist.Gather, watch: bool = False) -> FlightDump | None:
        """The complete steps not yet written, oldest first (partials added to ``gather``); every rank calls it
        at the same step. ``None`` when there is nothing new.

        ``watch=True``: instead the steps not yet *watched*, gradient norms (and ``input_absmax`` where recorded),
        for the layer watch (``triggers.LayerWatch``) at every dense flush; they are not written (a dump writes
        them, if one comes).
        """
        if self._grad is None:
            return None
        if not watch and self.post_until is not None and max(self._slot_step) >= self.post_until:
            self.post_until = None  # this dump reaches the last step the event's window waits for
        order = [(self._count - k) % self.window for k in range(min(self._count, self.window), 0, -1)]
        slots = [s for s in order if self._slot_step[s] > (self.watched if watch else self.written)]
        if not slots:
            return None
        # the taken rows are one or two contiguous runs of the ring: slices, no index tensor from the host
        runs, start = [], slots[0]
        for a, b in zip(slots, slots[1:] + [None]):
            if b != a + 1:
                runs.append((start, a + 1))
                start = b

        def rows(ring: Tensor) -> Tensor:
            return torch.cat([ring[a:b] for a, b in runs]) if len(runs) > 1 else ring[runs[0][0]:runs[0][1]].clone()

        present = np.zeros((len(slots), self.layout.width), dtype=bool)
        for i, s in enumerate(slots):
            for cols in self._slot_present[s]:
                present[i, list(cols)] = True
        def pending(values: Tensor) -> list:
            if len(self._placements) == 1:  # the usual case: no per-placement copy of the rows
                return [(None, gather.add(values, *self._placements[0][1]))]
            return [(idx, gather.add(values.index_select(1, idx), *groups)) for idx, groups in self._placements]

        grad = rows(self._grad)
        pend_grad = pending(grad)
        steps = [self._slot_step[s] for s in slots]
        epochs = [self._slot_epoch[s] for s in slots]
        absmax = rows(self._absmax) if self._absmax is not None else None  # this rank's own: never gathered
        attn = rows(self._attn) if self._attn is not None else None  # this rank's own batches, like absmax
        attn_names = tuple(b.name for b in self.attention)
        norm_names = tuple(n for n, _ in self.norm_modules)
        pend_update = pending(rows(self._update)) if self._update is not None else []
        if watch:
            self.watched = max(steps)
            return FlightDump(steps, epochs, self.layout.names, present, pend_grad, pend_update, absmax, norm_names,
                              self.layout.width, grad, attn, attn_names)
        self.written = max(steps)
        return FlightDump(steps, epochs, self.layout.names, present, pend_grad, pend_update, absmax, norm_names,
                          self.layout.width, grad, attn, attn_names)
