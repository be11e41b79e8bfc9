"""Distributed helpers shared by the callback, the statistics and re-normalization."""

from __future__ import annotations

from torch import Tensor

__all__ = ["is_sharded"]

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    _DTensor = None


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2 / tensor-parallel parameters): its values live on several ranks.

    Example:
        >>> import torch
        >>> is_sharded(torch.ones(2))
        False
    """
    return _DTensor is not None and isinstance(t, _DTensor)
