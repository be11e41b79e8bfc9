"""Patch every normalization layer of a model in place, report what was done, and undo it exactly.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    >>> report = patch_norms(model)
    >>> [(e.name, e.variant, e.patched) for e in report.layers]
    [('1', 'layer*w+b/native', True)]
    >>> [name for name, _ in iter_patched_norms(model)]
    ['1']
    >>> unpatch_norms(model)
    ['1']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tick_lightning.norms.detect import ProbeResult, is_norm_candidate, original_class, probe_norm
from tick_lightning.norms.modules import NormPatchSpec, is_patched, patched_class
from tick_lightning.norms.ops import NormVariant
from tick_lightning.select import select_modules

__all__ = [
    "KERNELS",
    "NormLayerInfo",
    "NormPatchReport",
    "find_norms",
    "iter_patched_norms",
    "patch_norms",
    "patched_norms",
    "unpatch_norms",
]

# tick_lightning.select imports detect.py for its "norm" kind, so it is imported lazily here.
Selector = str | Sequence[str] | None
KERNELS = ("auto", "torch")  # "auto": the torch fused ops (F.layer_norm / F.rms_norm); no Triton kernel yet


@dataclass
class NormLayerInfo:
    """One normalization layer: where it is, what the probe found, and whether it is patched."""

    name: str
    class_name: str
    variant: str | None
    eps: float | None
    hidden_size: int | tuple[int, ...] | None
    patched: bool
    reason: str
    spec: NormVariant | None = field(default=None, repr=False)
    patch_spec: NormPatchSpec | None = field(default=None, repr=False)

    @property
    def fallbacks(self) -> int:
        """Calls since patching that went to the original forward (DTensor input, unexpected shape)."""
        return 0 if self.patch_spec is None else self.patch_spec.fallbacks


@dataclass
class NormPatchReport:
    """Every norm layer found, patched or skipped with the reason. ``str(report)`` is a table.

    Example:
        >>> import torch
        >>> print(NormPatchReport(find_norms(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)))))  # doctest: +ELLIPSIS
        name  class      variant  eps    hidden  patched  fallbacks  reason
        0     GroupNorm  -        1e-05  4       no       0          probe matched no reference formula ...
    """

    layers: list[NormLayerInfo]

    @property
    def patched(self) -> list[NormLayerInfo]:
        return [e for e in self.layers if e.patched]

    @property
    def skipped(self) -> list[NormLayerInfo]:
        return [e for e in self.layers if not e.patched]

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        head = ("name", "class", "variant", "eps", "hidden", "patched", "fallbacks", "reason")
        rows = [head] + [(e.name, e.class_name, e.variant or "-", "-" if e.eps is None else f"{e.eps:g}",
                          "-" if e.hidden_size is None else str(e.hidden_size), "yes" if e.patched else "no",
                          str(e.fallbacks), e.reason) for e in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _probe_key(module: nn.Module) -> tuple:
    """Layers of one class with the same shape and settings compute the same thing: probe once."""
    simple = tuple(sorted((k, v) for k, v in vars(module).items()
                          if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool, tuple))))
    params = tuple((n, tuple(p.shape), p.dtype, p.device.type) for n, p in module.named_parameters(recurse=False))
    return original_class(module), params, simple


def _hidden(res: ProbeResult) -> int | tuple[int, ...] | None:
    if res.shape is None:
        return None
    return res.shape[0] if len(res.shape) == 1 else res.shape


def _scan(model: nn.Module, select: Selector) -> list[tuple[str, nn.Module, ProbeResult]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    chosen = None if select is None else {name for name, _ in select_modules(model, select, what="module")}
    cache: dict[tuple, ProbeResult] = {}
    out = []
    for name, module in model.named_modules():
        if not is_norm_candidate(module) or (chosen is not None and name not in chosen):
            continue
        key = _probe_key(module)
        if key not in cache:
            cache[key] = probe_norm(module)
        out.append((name, module, cache[key]))
    return out


def find_norms(model: nn.Module, select: Selector = None) -> list[NormLayerInfo]:
    """Detect (and probe) every normalization layer of ``model`` without patching anything.

    ``patched`` in the result says whether the layer is *currently* patched.

    Example:
        >>> import torch
        >>> [e.variant for e in find_norms(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.RMSNorm(4)))]
        ['layer*w+b/native', 'rms*w/native']
    """
    return [NormLayerInfo(name, original_class(m).__name__, r.variant.name if r.variant else None, r.eps,
                          _hidden(r), is_patched(m), r.reason or ("patched" if is_patched(m) else "detected"),
                          r.variant)
            for name, m, r in _scan(model, select)]


def patch_norms(model: nn.Module, *, select: Selector = None, kernel: str = "auto", stats: bool = True,
                low_precision_output: bool = False) -> NormPatchReport:
    """Patch every confirmed normalization layer of ``model`` in place. Idempotent.

    Args:
        select: module selector (globs over module names or kinds, see :mod:`tick_lightning.select`);
            ``None`` means every norm layer.
        kernel: ``"auto"`` or ``"torch"`` (fused ``F.layer_norm`` / ``F.rms_norm``).
        stats: give each patched layer a ``tick_observer`` attribute (None); when set, the forward calls
            ``tick_observer(x)`` with its input. With ``False`` the forward never looks.
        low_precision_output: return half-precision inputs' outputs in the input dtype even where the
            original returns fp32 (e.g. Llama's RMSNorm with fp32 weights, LayerNorm under CUDA autocast).

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> layer = LlamaRMSNorm(16)
        >>> report = patch_norms(layer)  # a bare layer is its own root: its name is ""
        >>> [(e.name, e.variant) for e in report.patched]
        [('', 'rms*w/llama')]
    """
    if kernel not in KERNELS:
        extra = " (no Triton kernel is shipped yet)" if kernel == "triton" else ""
        raise ValueError(f"Unknown kernel {kernel!r}{extra}; valid choices: {', '.join(KERNELS)}.")
    for arg, value in (("stats", stats), ("low_precision_output", low_precision_output)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be True or False, got {value!r}.")
    layers = []
    for name, module, res in _scan(model, select):
        info = NormLayerInfo(name, original_class(module).__name__, res.variant.name if res.variant else None,
                             res.eps, _hidden(res), False, res.reason, res.variant)
        if res.variant is not None:
            spec = NormPatchSpec(res.variant, res.eps, res.shape, stats, low_precision_output, "torch")
            observer = getattr(module, "tick_observer", None)  # keep an observer across a re-patch
            if not is_patched(module):
                module.__class__ = patched_class(type(module))
            module._tick_norm = spec
            info.patch_spec = spec
            if stats:
                module.tick_observer = observer
            elif "tick_observer" in vars(module):
                del module.tick_observer
            info.patched, info.reason = True, "patched" + (f"; {res.reason}" if res.reason else "")
        layers.append(info)
    return NormPatchReport(layers)


def _unpatch_one(module: nn.Module) -> None:
    module.__class__ = original_class(module)
    for attr in ("_tick_norm", "tick_observer"):
        module.__dict__.pop(attr, None)


def unpatch_norms(model: nn.Module) -> list[str]:
    """Restore every patched layer of ``model`` to its original class; returns the names restored.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.LayerNorm(4))
        >>> _ = patch_norms(model); unpatch_norms(model), type(model[0]) is torch.nn.LayerNorm
        (['0'], True)
    """
    names = []
    for name, module in model.named_modules():
        if is_patched(module):
            _unpatch_one(module)
            names.append(name)
    return names


@contextlib.contextmanager
def patched_norms(model: nn.Module, **kwargs: Any) -> Iterator[NormPatchReport]:
    """Context-manager form of :func:`patch_norms`: layers patched on entry are restored on exit.

    Layers that were already patched before entering stay patched.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.LayerNorm(4))
        >>> with patched_norms(model) as report:
        ...     print(len(report.patched), type(model[0]).__module__)
        1 tick_lightning.norms.modules
        >>> type(model[0]) is torch.nn.LayerNorm
        True
    """
    before = {id(m) for _, m in iter_patched_norms(model)}
    report = patch_norms(model, **kwargs)
    try:
        yield report
    finally:
        for _, module in list(model.named_modules()):
            if is_patched(module) and id(module) not in before:
                _unpatch_one(module)


def iter_patched_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every patched layer, names as in ``model.named_modules()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> _ = patch_norms(model)
        >>> [(name, type(m).__name__, m.tick_observer) for name, m in iter_patched_norms(model)]
        [('1', 'LayerNorm', None)]
    """
    for name, module in model.named_modules():
        if is_patched(module):
            yield name, module
