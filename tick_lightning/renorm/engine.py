"""``RenormEngine``: resolve ``Renorm`` specs against a model once, decide from integers when they are due,
apply them right after a real optimizer step. Shared by ``TickCallback(renorm=...)`` and ``RenormCallback``.

Every check that needs the model runs in ``setup`` -- before the first training step -- so a bad target
fails in seconds, not after an hour of training.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tick_lightning.renorm.fold import FoldPlan, pair_norms
from tick_lightning.renorm.ops import STATS, RenormPlan
from tick_lightning.renorm.spec import Renorm, RenormError
from tick_lightning.schedule import ScheduleError, TickSchedule
from tick_lightning.select import SelectionError, select_modules, select_parameters

__all__ = ["RenormEngine"]

_QUANTIZED_TYPES = ("Params4bit", "Int8Params", "QTensor", "Float8Tensor", "AffineQuantizedTensor")


def _is_quantized(p: Tensor) -> bool:
    return (not p.dtype.is_floating_point) or type(p).__name__ in _QUANTIZED_TYPES or hasattr(p, "quant_state")


class RenormEngine:
    """Applies a list of ``Renorm`` specs.

    Args:
        specs: the ``Renorm`` specs; a parameter may be targeted by at most one of them.
        default_schedule: the schedule that ``at="ticks"`` follows (the owning callback's ticks); ``None``
            makes ``at="ticks"`` an error.

    Example:
        >>> import torch
        >>> from tick_lightning.schedule import TickSchedule
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> engine = RenormEngine([Renorm("0.weight", method="unit", at="step")], TickSchedule.parse("every:10"))
        >>> engine.setup(model, total_steps=100)
        >>> engine.due(step=3, is_tick=False)
        True
        >>> states, names, stats, values = engine.apply(3, is_tick=True, found_inf=None, record=True)
        >>> names[:2], stats[:2], tuple(values.shape)
        (['0.weight', '0.weight'], ['norm_before', 'norm_after'], (6,))
        >>> torch.allclose(model[0].weight.norm(dim=-1), torch.ones(8))
        True
    """

    def __init__(self, specs: Sequence[Renorm], default_schedule: TickSchedule | None = None) -> None:
        if isinstance(specs, Renorm):
            specs = [specs]
        specs = list(specs)
        for i, spec in enumerate(specs):
            if not isinstance(spec, Renorm):
                raise RenormError(f"renorm[{i}] is {spec!r}; pass Renorm(...) objects, e.g. Renorm('linear', method='unit').")
        if default_schedule is not None and not isinstance(default_schedule, TickSchedule):
            default_schedule = TickSchedule.parse(default_schedule)
        self.specs = specs
        self.default_schedule = default_schedule
        self.applications = [0] * len(specs)
        self._loaded: dict | None = None
        self._plans: list = []
        self._keys: list[tuple[list[str], list[str], list[str]]] = []
        self._schedules: list[TickSchedule | None] = []
        self._ready = False

    # ------------------------------------------------------------------ setup
    def setup(self, pl_module: nn.Module, total_steps: int | None = None) -> None:
        """Resolve targets, validate them and bind schedules. Raises ``RenormError`` naming the problem."""
        self._plans, self._keys, self._schedules = [], [], []
        owner: dict[int, tuple[int, str]] = {}
        for i, spec in enumerate(self.specs):
            label = f"Renorm #{i} (target={spec.target!r})"
            self._schedules.append(self._bind(spec, label, total_steps))
            try:
                chosen = select_parameters(pl_module, spec.target)
            except SelectionError as err:
                raise RenormError(f"{label}: {err}") from None
            for name, p in chosen:
                self._check_param(spec, label, name, p)
                if id(p) in owner:
                    j, _ = owner[id(p)]
                    raise RenormError(
                        f"{label} and Renorm #{j} both target parameter {name!r}; a parameter may have one "
                        "re-normalization. Exclude it from one of them with '!pattern'."
                    )
                owner[id(p)] = (i, name)
            if spec.fold is not None:
                plan = self._fold_plan(pl_module, spec, label, chosen)
                names = plan.names
            else:
                plan = RenormPlan([p for _, p in chosen], spec.dim)
                names = [chosen[k][0] for k in plan.order]
            self._plans.append(plan)
            self._keys.append((["renorm"] * (len(names) * len(STATS)),
                               [n for n in names for _ in STATS],
                               [s for _ in names for s in STATS]))
        if self._loaded is not None:
            self._check_loaded(self._loaded)
        self._ready = True

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
            raise RenormError(
                f"{label} selects 1-D parameter {name!r} of shape {shape}; method {spec.method!r} works on rows of "
                f"matrices (a row of a 1-D tensor is the whole vector). Exclude it: target={targets + [exclude]!r}."
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
    def apply(self, step: int, is_tick: bool, found_inf: Tensor | None = None, record: bool = False):
        """Apply every due spec; call right after a real optimizer step.

        ``found_inf > 0`` (a device tensor from ``tick_lightning.amp.found_inf``) means the fp16 scaler skipped
        the step: every parameter is then written back bit-identical, decided on the device (no ``.item()``).
        Returns ``(states, names, stats, values)`` with ``values`` a 1-D fp32 device tensor when ``record``, else
        ``None``. With ``record``, rows come from every applied spec except ``at="step"`` specs on a non-tick
        step; pass ``record = is_tick or engine.due_scheduled(step, is_tick)`` to record every application of
        scheduled specs while keeping per-step specs to ticks. ``None`` too when nothing was recorded.
        """
        if not self._ready:
            raise RuntimeError("RenormEngine.apply called before setup(pl_module, total_steps).")
        skip = None if found_inf is None else found_inf > 0
        states: list[str] = []
        names: list[str] = []
        stats: list[str] = []
        values = []
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
                keys = self._keys[i]
                states += keys[0]
                names += keys[1]
                stats += keys[2]
                values.append(result.reshape(-1))
        if not record or not values:
            return None
        return states, names, stats, torch.cat(values)

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
