"""Functional normalization kernels, one entry point per detected variant.

A *variant* is the math (LayerNorm or RMSNorm, scale ``w`` or ``1 + w``, bias or not, channels-first or
last) plus the *cast order* of the original Python code, because that order decides the output dtype
and where rounding happens:

=========  =====================================================  ================================
cast       original code (x in dtype D, weight in dtype W)        output dtype
=========  =====================================================  ================================
native     ``F.layer_norm(x, w, b)`` / ``F.rms_norm(x, w)``         what torch returns (autocast!)
llama      ``w * normalize(x.float()).to(D)``                     promote(W, D)
after      ``(w.float() * normalize(x.float())).to(D)`` (Gemma)   D
t5         ``h = x * rsqrt(...)``; ``h.to(W)`` if W is half; w*h  W if half else float32
fp32       ``w.float() * normalize(x.float())``                   float32
=========  =====================================================  ================================

Every variant computes its statistics in fp32 (``F.layer_norm``/``F.rms_norm`` accumulate in fp32 for
half inputs), in one fused kernel where the cast order allows it instead of the 6-10 eager kernels of
the Python original. The eager originals are not touched by autocast (their ops are not on the autocast
lists, or already receive fp32), so the non-native variants run with autocast off to keep that.

Example:
    >>> import torch
    >>> v = NormVariant("rms", "w", bias=False, cast="llama")
    >>> x = torch.randn(2, 8, dtype=torch.bfloat16)
    >>> norm_forward(x, v, torch.ones(8), None, 1e-6, (8,)).dtype   # Llama: fp32 weight * bf16 -> fp32
    torch.float32
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["CASTS", "NormVariant", "norm_forward"]

CASTS = ("native", "llama", "after", "t5", "fp32")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NormVariant:
    """What a normalization layer computes. ``kind``: "layer"/"rms"; ``weight_mode``: "none"/"w"/"one_plus_w"."""

    kind: str
    weight_mode: str
    bias: bool
    cast: str = "native"
    channels_first: bool = False

    @property
    def name(self) -> str:
        """Short label, e.g. ``rms*(1+w)/after`` or ``layer*w+b/native/channels_first``."""
        scale = {"none": "", "w": "*w", "one_plus_w": "*(1+w)"}[self.weight_mode]
        label = f"{self.kind}{scale}{'+b' if self.bias else ''}/{self.cast}"
        return label + ("/channels_first" if self.channels_first else "")


def _normalize(x: torch.Tensor, kind: str, shape: Sequence[int], weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    if kind == "layer":
        return F.layer_norm(x, shape, weight, bias, 1e-5 if eps is None else eps)
    out = F.rms_norm(x, shape, weight, eps)
    return out if bias is None else out + bias


def _scale(v: NormVariant, weight: torch.Tensor | None, fp32: bool) -> torch.Tensor | None:
    if weight is None or v.weight_mode == "none":
        return None
    if v.weight_mode == "one_plus_w":  # Gemma adds 1 in fp32: ``1.0 + self.weight.float()``
        return 1.0 + weight.float()
    return weight.float() if fp32 else weight


def _eager_variant(x: torch.Tensor, v: NormVariant, weight, bias, eps, shape) -> torch.Tensor:
    in_dtype = x.dtype
    if v.cast in ("after", "fp32"):
        w = _scale(v, weight, fp32=True)
        b = None if bias is None else bias.float()
        out = _normalize(x.float(), v.kind, shape, w, b, eps)
        return out.to(in_dtype) if v.cast == "after" else out
    w = _scale(v, weight, fp32=False)
    # dtype the normalized value is rounded to before the weight multiplies it
    if v.cast == "t5":  # ``x * rsqrt(fp32)`` is fp32; cast to the weight's dtype only when that is half
        xn_dtype = w.dtype if w is not None and w.dtype in _HALF else torch.promote_types(in_dtype, torch.float32)
    else:  # llama: ``normalize(x.float()).to(input dtype)``
        xn_dtype = in_dtype
    if x.dtype == xn_dtype or xn_dtype == torch.float32:
        xin = x.to(xn_dtype)
        if (w is None or w.dtype == xn_dtype) and (bias is None or bias.dtype == xn_dtype):
            # One fused kernel; with a half weight it rounds once instead of twice (<= 1 ulp, never worse).
            return _normalize(xin, v.kind, shape, w, bias, eps)
        xn = _normalize(xin, v.kind, shape, None, None, eps)
    else:
        xn = _normalize(x.float(), v.kind, shape, None, None, eps).to(xn_dtype)
    out = xn if w is None else w * xn
    return out if bias is None else out + bias


def norm_forward(x: torch.Tensor, v: NormVariant, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 eps: float | None, shape: Sequence[int]) -> torch.Tensor:
    """Apply variant ``v`` to ``x`` over its trailing ``shape`` (dim 1 when ``v.channels_first``).

    Example:
        >>> v = NormVariant("layer", "w", bias=True)
        >>> x = torch.randn(4, 16)
        >>> torch.allclose(norm_forward(x, v, torch.ones(16), torch.zeros(16), 1e-5, (16,)),
        ...                torch.nn.functional.layer_norm(x, (16,)))
        True
    """
    if v.channels_first:
        out = norm_forward(x.movedim(1, -1), replace(v, channels_first=False), weight, bias, eps, shape)
        return out.movedim(-1, 1)
    if v.cast == "native":
        return _normalize(x, v.kind, shape, _scale(v, weight, False), bias, eps)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _eager_variant(x, v, weight, bias, eps, shape)
    return _eager_variant(x, v, weight, bias, eps, shape)
