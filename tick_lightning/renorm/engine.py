"""``RenormEngine``: resolve ``Renorm`` specs against a model once, decide from integers when they are due,
apply them right after a real optimizer step. Shared by ``TickCallback(renorm=...)`` and ``RenormCallback``.

``resolve(pl_module, total_steps)`` is called once the strategy has set the model up -- in Lightning's
``on_fit_start``, after ``configure_model`` and the strategy's ``setup`` (FSDP2's ``fully_shard`` swaps in
new ``nn.Parameter(DTensor)`` objects, so plans made earlier would edit replaced tensors) -- and before the
first training step, so a bad target fails in seconds, not after an hour of training. Every check that
needs the model runs there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor, nn

from tick_lightning.records import Block
from tick_lightning.renorm.fold import FoldPlan, pair_norms
from tick_lightning.renorm.ops import MAX_BATCH_BYTES, STATS, RenormPlan
from tick_lightning.renorm.spec import Renorm, RenormError
from tick_lightning.schedule import ScheduleError, TickSchedule
from tick_lightning.select import SelectionError, select_modules, select_parameters

__all__ = ["RenormEngine"]

_QUANTIZED_TYPES = ("Params4bit", "Int8Params", "QTensor", "Float8Tensor", "AffineQuantizedTensor")


def _label(i: int, spec: Renorm) -> str:
    return f"Renorm #{i} (target={spec.target!r})"


def _is_flattened(p: Tensor) -> bool:
    """An FSDP1 original parameter (``use_orig_params=True``): its data is a 1-D view into a flat shard."""
    return bool(getattr(p, "_fsdp_flattened", False))


def _is_quantized(p: Tensor) -> bool:
    return (not p.dtype.is_floating_point) or type(p).__name__ in _QUANTIZED_TYPES or hasattr(p, "quant_state")


class RenormEngine:
    """Applies a list of ``Renorm`` specs.

    Args:
        specs: the ``Renorm`` specs; a parameter may be targeted by at most one of them.
        default_schedule: the schedule that ``at="ticks"`` follows (the owning callback's ticks); ``None``
            makes ``at="ticks"`` an error.
        max_batch_bytes: the most fp32 bytes one stacked batch of same-shape weights holds (accelerators
            stack each group; larger groups are applied in chunks), see ``ops.MAX_BATCH_BYTES``.

    Example:
        >>> import torch
        >>> from tick_lightning.schedule import TickSchedule
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> engine = RenormEngine([Renorm("0.weight", method="unit", at="step")], TickSchedule.parse("every:10"))
        >>> engine.resolve(model, total_steps=100)
        >>> engine.due(step=3, is_tick=False)
        True
        >>> [block] = engine.apply(3, is_tick=True, found_inf=None, record=True)
        >>> block.state, block.names, block.stats[:2], tuple(block.values.shape)
        ('renorm', ('0.weight',), ('norm_before', 'norm_after'), (1, 6))
        >>> torch.allclose(model[0].weight.norm(dim=-1), torch.ones(8))
        True
    """

    def __init__(self, specs: Sequence[Renorm], default_schedule: TickSchedule | None = None,
                 max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        if isinstance(specs, Renorm):
            specs = [specs]
        specs = list(specs)
        for i, spec in enumerate(specs):
            if not isinstance(spec, Renorm):
                raise RenormError(f"renorm[{i}] is {spec!r}; pass Renorm(...) objects, e.g. Renorm('linear', method='unit').")
        if default_schedule is not None and not isinstance(default_schedule, TickSchedule):
            default_schedule = TickSchedule.parse(default_schedule)
        if isinstance(max_batch_bytes, bool) or not isinstance(max_batch_bytes, int) or max_batch_bytes <= 0:
            raise RenormError(f"max_batch_bytes={max_batch_bytes!r} must be a positive number of bytes, e.g. {MAX_BATCH_BYTES}.")
        self.specs = specs
        self.default_schedule = default_schedule
        self.max_batch_bytes = max_batch_bytes
        self.applications = [0] * len(specs)
        self._loaded: dict | None = None
        self._plans: list = []
        self._names: list[tuple[str, ...]] = []
        self._schedules: list[TickSchedule | None] = []
        self._ready = False

    # ------------------------------------------------------------------ setup
    def resolve(self, pl_module: nn.Module, total_steps: int | None = None) -> None:
        """Resolve targets against the live parameters, validate them and bind schedules.

        Call once the strategy has set the model up (``on_fit_start``) and before the first step; calling it
        again re-plans against the parameters as they are then. Raises ``RenormError`` naming the problem.
        """
        self._plans, self._names, self._schedules = [], [], []
        for i, (spec, chosen) in enumerate(zip(self.specs, self.targets(pl_module))):
            label = _label(i, spec)
            self._schedules.append(self._bind(spec, label, total_steps))
            if spec.fold is not None:
                plan = self._fold_plan(pl_module, spec, label, chosen)
                names = plan.names
            else:
                plan = RenormPlan([p for _, p in chosen], spec.dim, max_batch_bytes=self.max_batch_bytes,
                                  names=[f"parameter {n!r}" for n, _ in chosen])
                names = [chosen[k][0] for k in plan.order]
            self._plans.append(plan)
            self._names.append(tuple(names))
        if self._loaded is not None:
            self._check_loaded(self._loaded)
        self._ready = True

    def targets(self, pl_module: nn.Module) -> list[list[tuple[str, Tensor]]]:
        """Each spec's parameters in ``pl_module``, checked, changing nothing: raises ``RenormError`` for a target
        that matches nothing, a parameter that cannot be re-normalized, or one parameter in two specs. Before
        training, a launcher can refuse such specs against the model it built (the recipes do)."""
        targets, owner = [], {}
        for i, spec in enumerate(self.specs):
            label = _label(i, spec)
            try:
                chosen = select_parameters(pl_module, spec.target)
            except SelectionError as err:
                raise RenormError(f"{label}: {err}") from None
            for name, p in chosen:
                self._check_param(spec, label, name, p)
                if id(p) in owner:
                    raise RenormError(
                        f"{label} and Renorm #{owner[id(p)]} both target parameter {name!r}; a parameter may have "
                        "one re-normalization. Exclude it from one of them with '!pattern'."
                    )
                owner[id(p)] = i
            targets.append(chosen)
        return targets

    def setup(self, pl_module: nn.Module, total_steps: int | None = None) -> None:
        """Alias of ``resolve`` (kept for callers written before it was named)."""
        self.resolve(pl_module, total_steps)

    def planned(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of every tensor the plans edit, in record order (to check they are the live ones)."""
        out = []
        for plan, names in zip(self._plans, self._names):
            tensors = plan.tensors if isinstance(plan, FoldPlan) else [plan.tensors[k] for k in plan.order]
            out.extend(zip(names, tensors))
        return out

    def _bind(self, spec: Renorm, label: str, total_steps: int | None) -> TickSchedule | None:
        if spec.at == "step":
            return None
        if spec.schedule is None:  # at="ticks"
            if self.default_schedule is None:
                raise RenormError(
                    f"{label} has at='ticks' but no tick schedule is set; pass ticks=... to the callback or give "
                    "the Renorm its own schedule, e.g. at='every:100'."
                )
            return None
        try:
            return spec.schedule.bind(total_steps)
        except ScheduleError as err:
            raise RenormError(f"{label} at={spec.at!r}: {err}") from None

    @staticmethod
    def _check_param(spec: Renorm, label: str, name: str, p: Tensor) -> None:
        shape = list(p.shape)
        if _is_flattened(p):
            raise RenormError(
                f"{label} selects {name!r}, a flattened FSDP1 parameter (Lightning strategy='fsdp': its data is a "
                f"1-D slice {shape} of this rank's flat shard, not the weight's rows); re-normalizing it would mix "
                "rows. Use ModelParallelStrategy with fully_shard (FSDP2) or DDP for Renorm."
            )
        if _is_quantized(p):
            raise RenormError(
                f"{label} selects quantized parameter {name!r} ({type(p).__name__}, dtype {p.dtype}); re-normalizing "
                "it would destroy the quantization. Target the trainable adapters (e.g. 'lora') or exclude it."
            )
        if not p.requires_grad:
            raise RenormError(
                f"{label} selects frozen parameter {name!r} (requires_grad=False); the optimizer never moves it, so "
                "re-normalizing it after optimizer steps is a one-off edit of pretrained weights. Narrow the target "
                "(e.g. add '!pattern') to trainable parameters."
            )
        if p.dim() < 2:
            exclude = "!*.bias" if name.endswith(".bias") else "!norm" if "norm" in name.lower() else f"!{name}"
            targets = list(spec.target) if isinstance(spec.target, tuple) else [spec.target]
            # excluding what the target itself names would leave nothing: then say what to target instead
            fix = (f"Exclude it: target={targets + [exclude]!r}." if exclude[1:] not in targets else
                   "Target weight matrices instead, e.g. target='linear' or 'attention'.")
            raise RenormError(
                f"{label} selects 1-D parameter {name!r} of shape {shape}; method {spec.method!r} works on rows of "
                f"matrices (a row of a 1-D tensor is the whole vector). {fix}"
            )
        if spec.fold is None and not (-p.dim() <= spec.dim < p.dim()):
            raise RenormError(f"{label}: dim={spec.dim} is out of range for {name!r} of shape {shape}; valid: "
                              f"{-p.dim()}..{p.dim() - 1}.")

    @staticmethod
    def _fold_plan(pl_module: nn.Module, spec: Renorm, label: str, chosen) -> FoldPlan:
        linears = []
        for name, _ in chosen:
            mname, _, pname = name.rpartition(".")
            module = pl_module.get_submodule(mname) if mname else pl_module
            if pname != "weight" or not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                raise RenormError(f"{label} fold={spec.fold!r}: {name!r} is not the weight of a Linear layer; fold "
                                  "mode re-normalizes Linear weights fed by a LayerNorm.")
            linears.append((mname, module))
        try:
            norms = select_modules(pl_module, spec.fold, what="module")
        except SelectionError as err:
            raise RenormError(f"{label} fold={spec.fold!r}: {err}") from None
        try:
            pairing = pair_norms([n for n, _ in linears], [n for n, _ in norms])
        except ValueError as err:
            raise RenormError(f"{label}: {err}") from None
        by_norm: dict[str, list] = {}
        for lin_name, lin in linears:
            by_norm.setdefault(pairing[lin_name], []).append((lin_name, lin))
        modules = dict(norms)
        try:
            return FoldPlan([(n, modules[n], lins) for n, lins in by_norm.items()], eps=spec.eps)
        except ValueError as err:
            raise RenormError(f"{label}: {err}") from None

    # -------------------------------------------------------------- decisions
    def _is_due(self, i: int, step: int, is_tick: bool) -> bool:
        spec = self.specs[i]
        if spec.at == "step":
            return True
        schedule = self._schedules[i]
        return schedule.is_step_tick(step) if schedule is not None else is_tick

    def due(self, step: int, is_tick: bool) -> bool:
        """Whether any spec applies after the optimizer step of ``step`` (integers only, no device work).

        ``step`` is ``trainer.global_step`` *before* that optimizer step, the step the tick schedule names.
        """
        return any(self._is_due(i, step, is_tick) for i in range(len(self.specs)))

    def due_scheduled(self, step: int, is_tick: bool) -> bool:
        """Whether a spec other than ``at="step"`` applies (those are recorded at every application)."""
        return any(spec.at != "step" and self._is_due(i, step, is_tick) for i, spec in enumerate(self.specs))

    # ------------------------------------------------------------------ apply
    def apply(self, step: int, is_tick: bool, found_inf: Tensor | None = None, record: bool = False) -> list[Block]:
        """Apply every due spec; call right after a real optimizer step.

        ``found_inf > 0`` (a device tensor from ``tick_lightning.amp.found_inf``) means the fp16 scaler skipped
        the step: every parameter is then written back bit-identical, decided on the device (no ``.item()``).
        Returns one ``Block("renorm", names, STATS, values)`` per recorded spec, ``values`` a ``[len(names), 6]``
        fp32 device tensor (``records.to_host`` copies all of a tick's blocks in one go); ``[]`` when nothing
        was recorded. With ``record``, blocks come from every applied spec except ``at="step"`` specs on a
        non-tick step; pass ``record = is_tick or engine.due_scheduled(step, is_tick)`` to record every
        application of scheduled specs while keeping per-step specs to ticks.
        """
        if not self._ready:
            raise RuntimeError("RenormEngine.apply called before resolve(pl_module, total_steps).")
        skip = None if found_inf is None else found_inf > 0
        blocks: list[Block] = []
        for i, spec in enumerate(self.specs):
            if not self._is_due(i, step, is_tick):
                continue
            plan = self._plans[i]
            # at="step" runs every step; its rows are kept to tick steps so records stay small
            keep = record and (spec.at != "step" or is_tick)
            if isinstance(plan, FoldPlan):
                result = plan.run(skip=skip, stats=keep)
            else:
                result = plan.run(spec.method, keep_norm=spec.keep_norm, eps=spec.eps, skip=skip, stats=keep)
            self.applications[i] += 1
            if keep:
                blocks.append(Block("renorm", self._names[i], STATS, result))
        return blocks

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Specs and application counts, so a resume can check it re-normalizes the same way."""
        return {"version": 1, "specs": [s.describe() for s in self.specs], "applications": list(self.applications)}

    def load_state_dict(self, state: dict) -> None:
        """Restore counts; warns (at ``setup`` if not yet set up) when the specs differ from the checkpoint's."""
        self._loaded = dict(state)
        if len(state.get("applications", [])) == len(self.specs):
            self.applications = list(state["applications"])
        if self._ready:
            self._check_loaded(self._loaded)

    def _check_loaded(self, state: dict) -> None:
        saved = state.get("specs")
        now = [s.describe() for s in self.specs]
        if saved is not None and saved != now:
            warnings.warn(
                f"Resuming with different re-normalization specs than the checkpoint: saved {saved}, now {now}. "
                "Continuing with the new specs.", stacklevel=3
            )
        self._loaded = None
