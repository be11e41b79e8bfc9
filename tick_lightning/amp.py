"""AMP facts read from Lightning's precision plugin without a host synchronisation."""

from __future__ import annotations

import torch


def grad_scaler(trainer) -> torch.amp.GradScaler | None:
    """The active ``GradScaler`` of a ``16-mixed`` run, else ``None`` (bf16 and fp32 have no scaler)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


def found_inf(scaler, optimizer) -> torch.Tensor | None:
    """A device tensor > 0 when ``scaler`` found non-finite gradients for ``optimizer`` this step.

    Valid between ``scaler.unscale_(optimizer)`` (Lightning calls it before ``on_before_optimizer_step``)
    and ``scaler.update()``. It is exactly what makes ``scaler.step`` skip ``optimizer.step()``.
    Stays on the device: comparing it costs no sync, so callers can mask work with ``torch.where``.
    """
    if scaler is None:
        return None
    state = scaler._per_optimizer_states.get(id(optimizer))
    if not state or not state.get("found_inf_per_device"):
        return None
    values = list(state["found_inf_per_device"].values())
    total = values[0].clone()
    for value in values[1:]:
        total += value.to(total.device)
    return total


def loss_scale(scaler) -> torch.Tensor | None:
    """The current loss scale as a device tensor (no sync), or ``None``."""
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)
    return None if scale is None else scale.detach().clone()
