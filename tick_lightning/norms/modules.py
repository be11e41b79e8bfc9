"""What a patched normalization layer does: the replacement ``forward``, and the patched classes.

Patching swaps ``module.__class__`` to a subclass of the original class whose only change is
``forward`` (the :class:`PatchedNorm` mixin). The module object, its ``Parameter`` objects, buffers,
hooks and ``state_dict`` keys stay the same, ``isinstance(module, OriginalClass)`` stays true, and
unpatching is ``module.__class__ = original`` plus removing the two attributes the patch added
(``_tick_norm`` and ``tick_observer``).

The subclasses are created on demand, one per original class, and live in this module's namespace under
a name that encodes the original class's import path, so ``pickle`` finds them, also in a fresh process
(the module-level ``__getattr__`` rebuilds them), and ``copy.deepcopy`` keeps them (classes are atomic).

Example:
    >>> import torch
    >>> cls = patched_class(torch.nn.LayerNorm)
    >>> issubclass(cls, torch.nn.LayerNorm), cls.__name__, cls._tick_original_class is torch.nn.LayerNorm
    (True, 'LayerNorm', True)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tick_lightning.dist import is_sharded
from tick_lightning.norms.ops import NormVariant, norm_forward

__all__ = ["NormPatchSpec", "PatchedNorm", "is_patched", "patched_class"]

_PREFIX = "TickPatched_"
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class NormPatchSpec:
    """Per-layer settings stored on a patched module as ``module._tick_norm``."""

    variant: NormVariant
    eps: float | None
    shape: tuple[int, ...] | None
    stats: bool = True
    low_precision_output: bool = False
    kernel: str = "torch"
    fallbacks: int = 0  # calls that went to the original forward (DTensor, unexpected shape, extra args)


class PatchedNorm:
    """Mixin placed in front of the original class. Only ``forward`` changes."""

    _tick_original_class: type = nn.Module

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        spec: NormPatchSpec = self._tick_norm
        # One attribute check on ordinary steps; the tick callback sets the observer for tick batches only.
        if spec.stats and self.tick_observer is not None:
            self.tick_observer(x)
        shape = spec.shape
        ok = not args and not kwargs and isinstance(x, torch.Tensor) and not is_sharded(x)  # sharded: original forward
        if ok:
            if shape is None:  # no-affine layer without a stored shape: normalize the last dim, like the original
                shape = (x.shape[1],) if spec.variant.channels_first else tuple(x.shape[-1:])
            if spec.variant.channels_first:
                ok = x.dim() >= 2 and x.shape[1] == shape[0]
            else:
                ok = x.dim() >= len(shape) and tuple(x.shape[x.dim() - len(shape):]) == shape
        if not ok:
            spec.fallbacks += 1
            return self._tick_original_class.forward(self, x, *args, **kwargs)
        v = spec.variant
        weight = self.weight if v.weight_mode != "none" else None
        bias = self.bias if v.bias else None
        out = norm_forward(x, v, weight, bias, spec.eps, shape)
        if spec.low_precision_output and x.dtype in _HALF and out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out


def _encode(cls: type) -> str:
    path = f"{cls.__module__}:{cls.__qualname__}"
    return _PREFIX + path.replace("_", "_u").replace(".", "_d").replace(":", "_c").replace("<", "_l").replace(">", "_g")


def _decode(name: str) -> type:
    body, out, i = name[len(_PREFIX):], [], 0
    table = {"u": "_", "d": ".", "c": ":", "l": "<", "g": ">"}
    while i < len(body):
        if body[i] == "_":
            out.append(table[body[i + 1]])
            i += 2
        else:
            out.append(body[i])
            i += 1
    module_name, qualname = "".join(out).split(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_CLASSES: dict[type, type] = {}


def patched_class(original: type) -> type:
    """The patched subclass of ``original`` (created once, then cached).

    Example:
        >>> patched_class(torch.nn.RMSNorm) is patched_class(torch.nn.RMSNorm)
        True
    """
    cls = _CLASSES.get(original)
    if cls is None:
        name = _encode(original)
        cls = type(original.__name__, (PatchedNorm, original),
                   {"__module__": __name__, "__qualname__": name, "_tick_original_class": original,
                    "__doc__": f"{original.__name__} with a fused, observable forward (tick_lightning.norms)."})
        _CLASSES[original] = cls
        globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """Unpickling in a fresh process: rebuild ``TickPatched_<encoded path>`` from the original class."""
    if name.startswith(_PREFIX):
        return patched_class(_decode(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_patched(module: nn.Module) -> bool:
    """True when ``module`` currently runs the patched forward.

    Example:
        >>> is_patched(torch.nn.LayerNorm(4))
        False
    """
    return isinstance(module, PatchedNorm)
