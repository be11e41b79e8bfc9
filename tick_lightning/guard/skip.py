"""How a skip lands: the optimizer step leaves the parameters *and* the optimizer state as they were, decided by
a device flag, with no host read. A zero gradient is not a skip: AdamW would still decay the weights, move them
by its momentum and update both moments.

Three ways, chosen per optimizer at fit start (``skip_path``):

* ``fused``: the optimizer's own on-device skip. ``torch.optim`` Adam / AdamW / SGD / Adagrad built with
  ``fused=True`` read ``optimizer.found_inf`` inside ``step()`` (what ``GradScaler`` sets) and leave parameters,
  moments and step counts untouched when it is 1. Cost: nothing.
* ``scaler``: under fp16 AMP, ``GradScaler.step`` already reads its ``found_inf`` on the host (its own sync, every
  step, by design) and does not call ``optimizer.step()`` when it is set; the guard's flag is maxed into it. Cost:
  nothing more; the scaler then backs its loss scale off once, as after an overflow.
* ``copy``: any other optimizer. Before the step, the parameters' local views and every optimizer-state tensor
  are copied into buffers kept for the fit; after the step (``Optimizer.register_step_post_hook``), each is
  restored with ``torch.where(skip, before, after)``. Cost: one copy of the parameters plus the optimizer state
  in device memory (AdamW: 3x the trainable parameters' bytes), two passes over them per step. A state tensor
  the step created (the optimizer's first step) goes back to zeros, which is exact for Adam's moments and step
  counts; an optimizer whose state lives on the host while its parameters are on an accelerator (Adam's step
  counts without ``fused`` or ``capturable``) cannot be restored without a sync and is refused at fit start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tick_lightning import dist
from tick_lightning.collect.params import optimizer_params

__all__ = ["SkipPath", "skip_path"]


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Fused and exact on a skipped first step: fused SGD with momentum creates its buffer with ``empty_like``
    and a skipped kernel leaves it uninitialised (the ``copy`` path handles it)."""
    fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.param_groups) and \
        all(g.get("fused") for g in optimizer.param_groups)
    if fused and isinstance(optimizer, torch.optim.SGD) and any(g.get("momentum") for g in optimizer.param_groups):
        return False
    return fused


#: Optimizers whose state, when a step creates it, starts at zeros: a skipped first step put back to zeros is exact.
#: Others (NAdam's mu_product starts at 1, Rprop's step sizes at lr, ASGD's eta, SGD with dampening) are not.
_ZERO_START = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad)


def _zero_start(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, _ZERO_START):
        return True
    return isinstance(optimizer, torch.optim.SGD) and not any(g.get("dampening") for g in optimizer.param_groups)


class SkipPath:
    """One optimizer's skip: ``arm(skip)`` between the gradients being ready and ``step()``; the post-step hook
    (``copy``) or ``step()`` itself (``fused``, ``scaler``) carries it out; ``disarm()`` after the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, scaler=None) -> None:
        self.optimizer, self.kind, self.scaler = optimizer, kind, scaler
        self._skip: Tensor | None = None
        self._hook = None
        self._before: dict[tuple, Tensor] = {}  # (parameter position, state name or None) -> its copy
        self._held: set[tuple] = set()
        self._warned = False
        if kind == "copy":
            self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._restore())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._before.values())

    def arm(self, skip: Tensor) -> None:
        """Make the next ``step()`` of this optimizer a no-op where ``skip`` (a 0-d bool device tensor) is set."""
        if self.kind == "fused":
            self.optimizer.found_inf = skip.to(torch.float32)
            self._skip = skip
        elif self.kind == "scaler":
            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            for found in state["found_inf_per_device"].values():  # values 0 or 1: GradScaler's fused path needs 1
                torch.maximum(found, skip.to(found), out=found)
        else:
            self._skip = skip
            self._snapshot()

    def overflow(self) -> Tensor | None:
        """``scaler`` path: the scaler's own non-finite flag for this step (a device bool, before the guard's is
        maxed in), else ``None``."""
        if self.kind != "scaler":
            return None
        found = list(self.scaler._per_optimizer_states[id(self.optimizer)].get("found_inf_per_device", {}).values())
        if not found:
            return None
        return torch.stack([f.reshape(()).to(found[0].device) for f in found]).sum() > 0

    def disarm(self) -> None:
        if self.kind == "fused" and self._skip is not None and getattr(self.optimizer, "found_inf", None) is not None:
            del self.optimizer.found_inf
        self._skip = None

    def remove(self) -> None:
        self.disarm()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._before = {}

    # -- copy ------------------------------------------------------------------------------------
    def _tensors(self) -> list[tuple[tuple, Tensor]]:
        """``(key, local view)`` of every parameter and optimizer-state tensor; keys are positions and state
        names (the views are new objects at every call)."""
        params = optimizer_params(self.optimizer, trainable=True)
        out = [((i, None), dist.local_view(p).detach()) for i, p in enumerate(params)]
        for i, p in enumerate(params):
            for name, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    out.append(((i, name), dist.local_view(value).detach()))
        return out

    def _snapshot(self) -> None:
        tensors = self._tensors()
        if not self._warned:
            self._warn_inexact()
        for key, t in tensors:
            kept = self._before.get(key)
            if kept is None or kept.shape != t.shape or kept.dtype != t.dtype or kept.device != t.device:
                self._before[key] = torch.empty_like(t)
        torch._foreach_copy_([self._before[key] for key, _ in tensors], [t for _, t in tensors])
        self._held = {key for key, _ in tensors}

    def _warn_inexact(self) -> None:
        """Once: what a skip cannot put back exactly (state the first step creates, not at zeros; state kept as
        Python numbers)."""
        import warnings

        self._warned = True
        name = type(self.optimizer).__name__
        numbers = sorted({k for st in self.optimizer.state.values() for k, v in st.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if numbers:
            warnings.warn(f"Guard: {name} keeps state as Python numbers ({', '.join(numbers)}): a skipped step "
                          "cannot put it back (it is not on the device); the parameters and tensor state are.",
                          stacklevel=4)
        elif not self.optimizer.state and not _zero_start(self.optimizer):
            warnings.warn(f"Guard: a skip of {name}'s first step puts the state that step creates back to zeros, "
                          f"which is not how {name} starts it; later skips are exact.", stacklevel=4)

    def _restore(self) -> None:
        skip = self._skip
        if skip is None:
            return
        for key, t in self._tensors():
            if key in self._held:
                torch.where(skip.to(t.device), self._before[key], t, out=t)
            else:  # created by this step (the optimizer's first): back to the zeros it started from
                t.masked_fill_(skip.to(t.device), 0)
        self._skip = None


def skip_path(optimizer: torch.optim.Optimizer, scaler, device: torch.device) -> SkipPath:
    """The way this optimizer skips on the device (module docstring); raises ``ValueError`` (one line) when it
    cannot without a host sync."""
    if scaler is not None:
        if _is_fused(optimizer):
            raise ValueError(f"Guard: {type(optimizer).__name__}(fused=True) under fp16 AMP unscales its gradients "
                             "inside step(), after the guard has judged them; use precision='bf16-mixed', or the "
                             "optimizer without fused=True.")
        return SkipPath(optimizer, "scaler", scaler)
    if _is_fused(optimizer):
        return SkipPath(optimizer, "fused")
    accelerator = torch.device(device).type != "cpu"
    if accelerator:
        host = _host_state(optimizer)
        if host:
            raise ValueError(f"Guard: {type(optimizer).__name__} keeps {host} on the host, which a skip decided on the "
                             "device cannot restore without a sync; build it with fused=True (free skips) or "
                             "capturable=True.")
    return SkipPath(optimizer, "copy")


def _host_state(optimizer: torch.optim.Optimizer) -> str | None:
    """The name of an optimizer-state entry that lives on the host while parameters do not (``None``: none)."""
    groups = optimizer.param_groups
    # torch.optim keeps step counts on the host unless capturable (or fused): every optimizer with the option
    if any("capturable" in g and not g.get("capturable") and not g.get("fused") for g in groups) or \
            type(optimizer).__name__ == "Adafactor":
        return "its step counts"
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.device.type == "cpu" and p.device.type != "cpu":
                return f"state {key!r}"
    return None


def total_nbytes(paths: Sequence[SkipPath]) -> int:
    return sum(p.nbytes for p in paths)
