"""fp64 reference formulas for every normalization variant the patcher knows.

These are the ground truth for the numerical probe (detect.py) and for the tests: they compute in
float64, so they say what the layer *should* return; the fp32/bf16 implementations are then judged by
how far they are from it.

Example:
    >>> import torch
    >>> x = torch.randn(2, 5, 8)
    >>> y = reference_norm(x, "layer", weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5)
    >>> torch.allclose(y, torch.nn.functional.layer_norm(x.double(), (8,), eps=1e-5))
    True
"""

from __future__ import annotations

import torch

__all__ = ["KINDS", "WEIGHT_MODES", "reference_norm"]

KINDS = ("layer", "rms")  # LayerNorm (subtract mean, divide by std) or RMSNorm (divide by root mean square)
WEIGHT_MODES = ("none", "w", "one_plus_w")  # no scale, ``x * w``, Gemma-style ``x * (1 + w)``


def reference_norm(x: torch.Tensor, kind: str, *, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float | None = 1e-6, weight_mode: str = "w",
                   normalized_ndim: int = 1, channels_first: bool = False) -> torch.Tensor:
    """Normalize ``x`` in float64 over its last ``normalized_ndim`` dims (dim 1 when ``channels_first``).

    Example:
        >>> x = torch.randn(3, 4)
        >>> reference_norm(x, "rms", weight=torch.full((4,), 2.0), eps=0.0).pow(2).mean(-1)  # doctest: +SKIP
        tensor([4., 4., 4.], dtype=torch.float64)
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown norm kind {kind!r}; valid kinds: {KINDS}.")
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"Unknown weight mode {weight_mode!r}; valid modes: {WEIGHT_MODES}.")
    h = x.double()
    if channels_first:
        h = h.movedim(1, -1)
    dims = tuple(range(-normalized_ndim, 0))
    if eps is None:  # torch.nn.RMSNorm's default: machine epsilon of the input dtype
        eps = torch.finfo(x.dtype).eps
    if kind == "layer":
        h = h - h.mean(dims, keepdim=True)
    h = h / torch.sqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None and weight_mode != "none":
        w = weight.double()
        h = h * (1.0 + w if weight_mode == "one_plus_w" else w)
    if bias is not None:
        h = h + bias.double()
    if channels_first:
        h = h.movedim(-1, 1)
    return h
