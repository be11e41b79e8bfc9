"""``GuardEngine``: the guard at work in a fit -- judged on the device every optimizer step, acted on before the
update lands, written down at the next flush.

Lifecycle (the callback routes its hooks here through ``collect.stepwise.StepPhase``):

1. ``setup(layout, ...)`` at fit start, once the strategy has set the model up: one rule per optimizer
   (``rules``), one skip path per optimizer (``skip``), the ``select`` of ``clip`` resolved against the live
   parameters, a device buffer for the decisions (``capacity`` steps), the statistics of a resumed fit loaded.
   Every check that needs the model or the trainer raises ``GuardError`` here, before the first step.
2. Per step: ``begin(step, epoch)``; ``observe_loss(loss)`` per backward (unscaled; summed over accumulation
   micro-batches); ``judge(optimizer, norms)`` once the gradients are ready: the step's per-tensor squared norms
   (``stats.sumsq_partials``, computed once for the dense series, the flight recorder and the guard) summed over
   the shards (one all-reduce per process group when parameters are sharded) and the loss averaged over the
   ranks (one all-reduce of one value, when ``skip`` judges the loss on several ranks): every rank holds the
   same numbers, so every rank takes the same decision; ``apply(optimizer)`` scales the gradients and arms the
   skip (after the tick's collectors have read the gradients: records are pre-guard, like Lightning's clipping);
   ``end()`` when the step is complete.
3. ``take()`` at every flush: the decision rows since the last one, in the flush's one host copy; ``table`` keeps
   the steps with an intervention (``state="guard"``), ``events`` makes each one a flight-recorder event.
4. ``state_dict()`` / ``load_state_dict()``: the rules' statistics (a checkpoint reads them to the host, the only
   host read the guard makes); a resumed fit then takes the decisions the uninterrupted one would have.

Nothing between flushes reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from tick_lightning import dist
from tick_lightning.guard.rules import Decision, LogZRule, SkipRule, stat_dtype
from tick_lightning.guard.skip import SkipPath, skip_path
from tick_lightning.guard.spec import GUARD_STATS, Guard, GuardError
from tick_lightning.records import ROW_SCHEMA, Block

__all__ = ["GUARD_STATS", "GuardEngine", "GuardFlush"]

#: per tensor (``clip``): its factor and its norm before the guard
TENSOR_STATS = ("factor", "grad_norm")


@dataclass
class GuardFlush:
    """The decision rows taken at one flush (device blocks until the host copy)."""

    steps: list[int]
    epochs: list[int]
    rows: Tensor  # [n, len(GUARD_STATS)]
    tensors: Tensor | None  # [n, width, 2] (clip)
    names: tuple[str, ...]

    def blocks(self) -> list[Block]:
        out = [Block("guard", tuple(map(str, self.steps)), GUARD_STATS, self.rows)]
        if self.tensors is not None:
            n, width = self.tensors.shape[:2]
            flat = self.tensors.reshape(n * width, 2)
            out.append(Block("guard_tensor", tuple(f"{s}|{name}" for s in self.steps for name in self.names),
                             TENSOR_STATS, flat))
        return out


class GuardEngine:
    """Runs one ``Guard`` in a fit (module docstring).

    Args:
        spec: the ``Guard``.
        capacity: decision rows held on the device between flushes (the dense buffer's).
        record: whether this rank keeps rows (ranks that write nothing still judge and act).
    """

    def __init__(self, spec: Guard, capacity: int = 256, record: bool = True) -> None:
        self.spec, self.capacity, self.record = spec, capacity, record
        self.layout = None
        self._rules: dict[int, object] = {}
        self._paths: dict[int, SkipPath] = {}
        self._judged: Tensor | None = None
        self._loss: Tensor | None = None
        self._loss_seen = False
        self._pending: dict[int, Decision] = {}
        self._loaded: dict | None = None
        self._final: dict | None = None  # the statistics at the end of the last fit (teardown)
        self._rows: Tensor | None = None
        self._tensors: Tensor | None = None
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.open_step: int | None = None
        self._epoch = 0
        self.last_skip: Tensor | None = None  # the last decision applied (a device flag)
        self.skipped = 0  # interventions written so far (host counts, from the flushes: the loggers' counters)
        self.clipped = 0

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self, layout, device: torch.device, optimizers: Sequence[torch.optim.Optimizer], module: nn.Module,
              scaler=None, total_steps: int | None = None, flat: bool = False, deepspeed: bool = False) -> None:
        """At fit start (see the module docstring); raises ``GuardError`` naming what cannot be guarded."""
        spec = self.spec
        if deepspeed:
            raise GuardError("Guard under DeepSpeed: its ZeRO optimizer keeps the gradients in partitioned buffers "
                             "(no .grad to judge) and steps outside torch.optim; use ModelParallelStrategy (FSDP2), "
                             "FSDP or DDP.")
        if total_steps is not None and spec.warmup >= total_steps:
            raise GuardError(f"Guard warmup={spec.warmup} is not shorter than the run ({total_steps} optimizer "
                             f"steps): it would never act; pass a warmup below {total_steps}.")
        if spec.mode == "clip" and flat:
            raise GuardError("Guard('clip') judges each parameter's gradient, but this strategy holds slices of "
                             "flattened parameters (FSDP1 / DeepSpeed); use ModelParallelStrategy (FSDP2), or "
                             "Guard('zclip') / Guard('skip'), which judge the global norm.")
        self.layout, self._final = layout, None
        self._judged = torch.ones(layout.width, dtype=torch.bool, device=device)
        if spec.mode == "clip" and spec.select is not None:
            from tick_lightning.select import SelectionError, select_parameters

            try:
                chosen = {name for name, _ in select_parameters(module, spec.select)}
            except (SelectionError, ValueError) as err:
                raise GuardError(f"Guard select: {err}") from None
            mask = [name in chosen for name in layout.names]
            if not any(mask):
                raise GuardError(f"Guard select={spec.select!r} matches parameters, but none the optimizer trains; "
                                 "select trainable ones.")
            self._judged = torch.tensor(mask, dtype=torch.bool, device=device)
        self._rules, self._paths = {}, {}
        for opt in optimizers:
            cols = layout.optimizer_columns.get(id(opt))
            if not cols:
                continue
            try:
                self._paths[id(opt)] = skip_path(opt, scaler, device)
            except ValueError as err:
                raise GuardError(str(err)) from None
            self._rules[id(opt)] = self._rule(device)
        if self._loaded is not None:
            self._load(self._loaded)
            self._loaded = None
        else:  # a fresh fit: its own counters
            self.skipped = self.clipped = 0
        self._loss = torch.zeros((), dtype=stat_dtype(device), device=device)
        if self.record:
            self._rows = torch.zeros(self.capacity + 1, len(GUARD_STATS), dtype=stat_dtype(device), device=device)
            if spec.mode == "clip":
                self._tensors = torch.zeros(self.capacity + 1, layout.width, 2, dtype=stat_dtype(device),
                                            device=device)
        self.steps, self.epochs, self.open_step = [], [], None

    def _rule(self, device: torch.device):
        spec = self.spec
        if spec.mode == "skip":
            return SkipRule(spec.z, spec.window, spec.on, spec.warmup, device)
        width = 1 if spec.mode == "zclip" else self.layout.width  # the global norm, or each tensor's
        return LogZRule(spec.z, spec.alpha, spec.warmup, width, device)

    def teardown(self) -> None:
        """Fit end: the statistics stay readable (a checkpoint saved after the fit), the live state goes, so the
        next fit's ``load_state_dict`` (a resume with this same object) is applied at its ``setup``."""
        if self._rules:
            self._final = self.state_dict()
        for path in self._paths.values():
            path.remove()
        self._paths, self._pending, self._rows, self._tensors, self._rules = {}, {}, None, None, {}
        self.layout, self.last_skip = None, None
        self.steps, self.epochs, self.open_step = [], [], None

    @property
    def ready(self) -> bool:
        return self.layout is not None and bool(self._rules)

    @property
    def full(self) -> bool:
        return self.record and len(self.steps) >= self.capacity

    @property
    def nbytes(self) -> int:
        """Device memory the guard holds: statistics, decision rows, the skip copies (``copy`` path)."""
        stats = sum(t.numel() * t.element_size() for r in self._rules.values() for t in r.state.values())
        rows = sum(t.numel() * t.element_size() for t in (self._rows, self._tensors) if t is not None)
        return stats + rows + sum(p.nbytes for p in self._paths.values())

    # ---------------------------------------------------------------------------------------------- per step
    def begin(self, step: int, epoch: int) -> None:
        self.open_step, self._epoch = step, epoch
        self.last_skip = None
        if self._loss is not None:
            self._loss.zero_()
        self._loss_seen = False
        if self._rows is not None:
            row = len(self.steps)
            self._rows[row].zero_()
            self._rows[row, GUARD_STATS.index("factor")] = 1.0
            if self._tensors is not None:
                self._tensors[row].zero_()
                self._tensors[row, :, 0] = 1.0

    def observe_loss(self, loss: Tensor, scale: Tensor | None = None) -> None:
        """A backward's loss (``scale``: the fp16 loss scale it was multiplied by, a device tensor)."""
        if self._loss is None or self.open_step is None:
            return
        value = dist.local_view(loss.detach()).reshape(()).to(self._loss.dtype)
        self._loss.add_(value / scale.to(value) if scale is not None else value)
        self._loss_seen = True

    def judge(self, optimizer: torch.optim.Optimizer, norms) -> None:
        """The decision for this optimizer's step from its gradients' squared norms (``stepwise.StepNorms``)."""
        rule = self._rules.get(id(optimizer))
        if rule is None or self.open_step is None:
            return
        sumsq = self._reduce(norms)
        total = sumsq.sum()
        norm = total.sqrt()
        loss = None
        if isinstance(rule, SkipRule) and "loss" in rule.on and self._loss_seen:
            loss = dist.mean_over_ranks(self._loss)
        nonfinite = ~torch.isfinite(total)
        if loss is not None:
            nonfinite = nonfinite | ~torch.isfinite(loss)
        elif self._loss_seen and not _distributed():  # one process: its loss is the run's (else it is judged above)
            nonfinite = nonfinite | ~torch.isfinite(self._loss)
        if isinstance(rule, SkipRule):  # the norm by its log (it moves by factors), the loss as it is (any sign)
            values = {"grad_norm": norm.clamp(min=1e-30).log(), **({"loss": loss} if loss is not None else {})}
            decision = rule.decide(values, nonfinite, missing={"grad_norm": total == 0})
        elif self.spec.mode == "zclip":
            decision = rule.decide(norm.reshape(1), nonfinite)
            decision.factor, decision.factors = decision.factors[0], None
        else:
            decision = rule.decide(sumsq.sqrt(), nonfinite, norms.index, self._judged.index_select(0, norms.index))
        if not self.spec.nonfinite:  # kept out of the statistics all the same, but not skipped for it
            decision.skip = decision.skip & ~nonfinite
        self._pending[id(optimizer)] = decision
        if self._rows is not None:
            # an fp16 overflow is the scaler's own skip (it would skip the step anyway): not an intervention
            overflow = self._paths[id(optimizer)].overflow()
            self._write(decision, nonfinite if overflow is None else nonfinite & ~overflow, norm, loss, norms, sumsq,
                        skipped=decision.skip if overflow is None else decision.skip & ~overflow)

    def apply(self, optimizer: torch.optim.Optimizer, grads: Sequence[Tensor]) -> None:
        """Scale this optimizer's present gradients (their local views, in ``judge``'s column order) and arm its
        skip."""
        decision = self._pending.pop(id(optimizer), None)
        if decision is None:
            return
        self.last_skip = decision.skip
        if self.spec.mode == "zclip":
            _scale(grads, decision.factor)
        elif self.spec.mode == "clip":
            _scale(grads, decision.factors)
        self._paths[id(optimizer)].arm(decision.skip)

    def stepped(self) -> None:
        """The step's optimizer steps ran (or were skipped by the scaler): the skip flags are spent."""
        for path in self._paths.values():
            path.disarm()

    def end(self) -> None:
        if self.open_step is not None:
            self.stepped()
            if self.record:
                self.steps.append(self.open_step)
                self.epochs.append(self._epoch)
            self.open_step = None

    # ---------------------------------------------------------------------------------------------- device maths
    def _reduce(self, norms) -> Tensor:
        """The present columns' squared norms summed over the ranks that hold pieces of them: one all-reduce per
        process group, only when parameters are sharded."""
        sumsq = norms.sumsq
        groups = self.layout.groups
        sharded = sorted({self.layout.placement[c] for c in norms.columns if groups[self.layout.placement[c]][0]})
        if not sharded:
            return sumsq
        total = torch.where(_in(norms.placement_index, [g for g in range(len(groups)) if g not in sharded]),
                            sumsq, 0)
        for g in sharded:
            part = torch.where(norms.placement_index == g, sumsq, 0)
            process_groups, device = groups[g]
            part = part.to(device)
            for group in process_groups:
                tdist.all_reduce(part, group=group)
            total = total + part.to(sumsq.device)
        return total

    def _write(self, decision: Decision, nonfinite: Tensor, norm: Tensor, loss: Tensor | None, norms,
               sumsq: Tensor, skipped: Tensor) -> None:
        row = self._rows[len(self.steps)]
        nan = torch.full((), float("nan"), dtype=row.dtype, device=row.device)
        clipped = (decision.factors < 1).sum() if decision.factors is not None else \
            (decision.factor < 1).to(row.dtype) * len(norms.columns)
        values = {"skipped": skipped, "nonfinite": nonfinite, "factor": decision.factor, "clipped": clipped,
                  "loss": loss if loss is not None else nan, "grad_norm": norm,
                  "z_loss": decision.z.get("loss", nan), "z_grad_norm": decision.z.get("grad_norm", nan),
                  "threshold": decision.threshold}
        new = torch.stack([values[k].to(row.dtype).reshape(()) for k in GUARD_STATS])
        # several optimizers in one step: skipped / non-finite / clipped add up, factor is the smallest
        merged = torch.stack([new[0] + row[0], new[1] + row[1], torch.minimum(new[2], row[2]), new[3] + row[3],
                              *new[4:]])
        row.copy_(merged)
        if self._tensors is not None and decision.factors is not None:
            block = self._tensors[len(self.steps)]
            block[:, 0].index_copy_(0, norms.index, decision.factors.to(block.dtype))
            block[:, 1].index_copy_(0, norms.index, sumsq.to(block.dtype).sqrt())  # reduced over the shards

    # ---------------------------------------------------------------------------------------------- flush
    def take(self) -> GuardFlush | None:
        """The closed decision rows (a clone); the buffer is free for the next steps at once. An open row (a
        checkpoint between accumulation micro-batches) moves to row 0 and stays open."""
        n = len(self.steps)
        if self._rows is None or n == 0:
            return None
        flush = GuardFlush(self.steps, self.epochs, self._rows[:n].clone(),
                           self._tensors[:n].clone() if self._tensors is not None else None, self.layout.names)
        if self.open_step is not None:
            self._rows[0].copy_(self._rows[n])
            if self._tensors is not None:
                self._tensors[0].copy_(self._tensors[n])
        self.steps, self.epochs = [], []
        return flush

    def table(self, flush: GuardFlush, host: Sequence[Block]) -> pa.Table:
        """``records.ROW_SCHEMA`` rows ``state="guard"`` of the steps with an intervention: the step row (name
        ``""``, ``GUARD_STATS``) and, for ``clip``, a row per scaled tensor (``factor``, ``grad_norm``)."""
        rows = np.asarray(host[0].values, dtype=np.float64)
        acted = (rows[:, 0] > 0) | (rows[:, 3] > 0)
        self.skipped += int((rows[:, 0] > 0).sum())
        self.clipped += int(((rows[:, 0] == 0) & (rows[:, 3] > 0)).sum())
        steps, epochs, names, stats, values = [], [], [], [], []
        tensors = np.asarray(host[1].values).reshape(len(flush.steps), len(flush.names), 2) if len(host) > 1 else None
        for i in np.flatnonzero(acted):
            step, epoch = flush.steps[i], flush.epochs[i]
            for j, stat in enumerate(GUARD_STATS):
                steps.append(step), epochs.append(epoch), names.append(""), stats.append(stat)
                values.append(rows[i, j])
            if tensors is not None:
                for c in np.flatnonzero(tensors[i, :, 0] < 1):
                    for j, stat in enumerate(TENSOR_STATS):
                        steps.append(step), epochs.append(epoch), names.append(flush.names[c]), stats.append(stat)
                        values.append(tensors[i, c, j])
        return pa.table({"step": pa.array(steps, type=pa.int64()), "epoch": pa.array(epochs, type=pa.int32()),
                         "state": pa.array(["guard"] * len(steps), type=pa.string()),
                         "name": pa.array(names, type=pa.string()), "stat": pa.array(stats, type=pa.string()),
                         "value": pa.array(values, type=pa.float64())}, schema=ROW_SCHEMA)

    @staticmethod
    def events(table: pa.Table) -> list:
        """A flight-recorder event (trigger ``"guard"``) per step with an intervention; ``z`` the largest judged
        z-score (NaN for a non-finite step or a per-tensor clip)."""
        from tick_lightning.triggers import Event

        if not table.num_rows:
            return []
        frame = table.to_pandas()
        step_rows = frame[frame.name == ""].pivot(index="step", columns="stat", values="value")
        out = []
        for step, r in step_rows.iterrows():
            z = np.nanmax([r.get("z_loss", np.nan), r.get("z_grad_norm", np.nan)]) \
                if np.isfinite([r.get("z_loss", np.nan), r.get("z_grad_norm", np.nan)]).any() else float("nan")
            out.append(Event(int(step), "guard", float(z)))
        return out

    # ---------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The rules' statistics, per optimizer in setup order, as host tensors (read at a checkpoint)."""
        if not self._rules and getattr(self, "_final", None) is not None:
            return self._final  # after the fit: what its last step left
        return {"mode": self.spec.mode,
                "rules": [{k: v.detach().cpu().clone() for k, v in rule.state.items()} for rule in self._rules.values()],
                "skipped": self.skipped, "clipped": self.clipped}

    def load_state_dict(self, state: dict) -> None:
        """Statistics of a checkpoint; applied at ``setup`` (now, if the fit is already set up)."""
        if state.get("mode") != self.spec.mode:
            raise GuardError(f"the checkpoint's guard statistics are of mode {state.get('mode')!r}, this fit's Guard is "
                             f"{self.spec.mode!r}; resume with the same Guard.")
        self.skipped, self.clipped = int(state.get("skipped", 0)), int(state.get("clipped", 0))
        if self.ready:
            self._load(state)
        else:  # applied by the next setup
            self._loaded = state

    @property
    def skip_paths(self) -> list[str]:
        """How each optimizer skips (``fused``, ``scaler`` or ``copy``; ``guard.skip``), in setup order."""
        return [p.kind for p in self._paths.values()]

    def _load(self, state: dict) -> None:
        rules = list(self._rules.values())
        if not state.get("rules"):  # saved before the guard had judged a step: nothing to continue
            return
        if len(state["rules"]) != len(rules):
            raise GuardError(f"the checkpoint's guard has statistics for {len(state['rules'])} optimizer(s), this fit "
                             f"has {len(rules)}; resume with the same optimizers.")
        for rule, saved in zip(rules, state["rules"]):
            for k, v in saved.items():
                if k not in rule.state or rule.state[k].shape != v.shape:
                    raise GuardError(f"the checkpoint's guard statistic {k!r} does not fit this fit's Guard "
                                     f"({tuple(v.shape)}); resume with the same Guard and model.")
                rule.state[k].copy_(v)


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _in(index: Tensor, values: list[int]) -> Tensor:
    out = torch.zeros_like(index, dtype=torch.bool)
    for v in values:
        out |= index == v
    return out


def _scale(grads: Sequence[Tensor], factors: Tensor) -> None:
    """``grads[i] *= factors`` (0-d: one factor for all) or ``factors[i]`` (``[len(grads)]``): one foreach launch
    (per device), no host read."""
    if not grads:
        return
    devices = {g.device for g in grads}
    for device in devices:
        idx = [i for i, g in enumerate(grads) if g.device == device] if len(devices) > 1 else range(len(grads))
        f = factors.to(device=device, dtype=torch.float32)
        if f.dim() == 0:
            torch._foreach_mul_([grads[i] for i in idx], f)
        else:
            torch._foreach_mul_([grads[i] for i in idx], list(f[list(idx)].unbind() if len(devices) > 1 else f.unbind()))
