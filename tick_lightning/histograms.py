"""Per-tensor histograms on the device: fixed log2-spaced bins of |x|, plus zero, sign and non-finite counts.

One ``[N, columns]`` float tensor for a list of N tensors, computed where the tensors live with no host
sync (``index_add_`` into a preallocated tensor; no ``bincount``, whose output size needs the input's
max on the host), so a tick adds it to its one device-to-host copy (``records.Block``).

Binning (fixed, the same for every tensor and every run, so histograms compare across layers and time),
with ``lo = LOW_EXP`` and ``hi = HIGH_EXP`` (``K = hi - lo`` magnitude bins, ``columns = K + 5``):

===========  ==================================================================
column       counts elements with
===========  ==================================================================
0 ``zero``       ``x == 0``
1 ``negative``   ``x < 0`` (finite): the sign count, *not* part of the magnitude partition
2 ``nonfinite``  NaN or +-inf
3 ``under``      ``0 < |x| < 2**lo``
4 + k            ``2**(lo + k) <= |x| < 2**(lo + k + 1)``, k = 0 .. K-1
4 + K ``over``   ``|x| >= 2**hi`` (finite)
===========  ==================================================================

Columns 0 and 2..4+K partition the tensor: they sum to its ``numel``. Powers of two make the bin of an
element exact: it is the binary exponent of |x| (``torch.frexp``), no rounding at an edge. Defaults
``lo = -32``, ``hi = 16`` (48 octaves, 2.3e-10 .. 65536) cover weights, gradients and updates of fp32
and bf16 training; fp16's smallest subnormal 2^-24 and largest value 65504 are inside. Half-precision
inputs are widened to fp32 (exact); fp64 inputs are binned in fp64.

Sharded ``DTensor``s are exact: each rank bins its local shard and the counts are gathered over the mesh
dimensions the tensor is sharded on and summed (replicated dimensions are not: every rank holds the same
values), through ``tick_lightning.dist.Gather`` as ``tick_lightning.stats`` does for its partials: one
``all_gather`` per process group for all rows (at a tick, together with the tick's other statistics).
Plain and replicated tensors' rows are the rank's own counts, no communication.

Example:
    >>> import torch
    >>> h = tensor_histograms([torch.tensor([0.0, -1.0, 1.5, 3.0, float("nan")])])
    >>> h.shape, int(h[0, COLUMNS.index("zero")]), int(h[0, COLUMNS.index("negative")])
    (torch.Size([1, 53]), 1, 1)
    >>> [COLUMNS[j] for j in torch.nonzero(h[0]).flatten().tolist()]
    ['zero', 'negative', 'nonfinite', '2^0', '2^1']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tick_lightning import dist
from tick_lightning.stats import Deferred, defer

__all__ = ["COLUMNS", "HIGH_EXP", "LOW_EXP", "bin_edges", "columns", "histogram_partials", "tensor_histograms"]

LOW_EXP = -32
HIGH_EXP = 16
_CHUNK = 1 << 24  # elements binned at once: bounds the int64 index temporaries (128 MiB) for a huge tensor



def columns(lo: int = LOW_EXP, hi: int = HIGH_EXP) -> tuple[str, ...]:
    """Column names: ``zero, negative, nonfinite, under, 2^lo, ..., 2^(hi-1), over`` (bin ``2^e`` holds
    ``2**e <= |x| < 2**(e+1)``)."""
    return ("zero", "negative", "nonfinite", "under", *(f"2^{e}" for e in range(lo, hi)), "over")


COLUMNS = columns()


def bin_edges(lo: int = LOW_EXP, hi: int = HIGH_EXP) -> list[float]:
    """The ``K + 1`` magnitude edges ``2**lo .. 2**hi`` (as floats, for plotting or ``numpy.histogram``)."""
    return [2.0**e for e in range(lo, hi + 1)]


def _check(lo: int, hi: int) -> None:
    for name, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, int) or not -1000 <= v <= 1000:
            raise ValueError(f"tensor_histograms({name}={v!r}): must be an integer exponent in [-1000, 1000].")
    if lo >= hi:
        raise ValueError(f"tensor_histograms(lo={lo}, hi={hi}): lo must be below hi.")


def _bin_into(row: Tensor, x: Tensor, lo: int, hi: int) -> None:
    """Add the counts of ``x`` (any shape, on ``row``'s device) into ``row`` (``[K + 5]``), chunk by chunk."""
    k = hi - lo
    flat = x.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        v = flat[start:start + _CHUNK]
        v = v if v.dtype == torch.float64 else v.float()
        finite = torch.isfinite(v)
        a = v.abs()
        _, exponent = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): a in [2**(e-1), 2**e)
        b = (exponent.long() - 1 - lo).clamp_(-1, k)  # -1: under, k: over
        col = torch.where(a == 0, 0, torch.where(~finite, 2, b + 4))
        row.index_add_(0, col, torch.ones_like(col, dtype=row.dtype))
        row[1] += ((v < 0) & finite).sum().to(row.dtype)


def histogram_partials(tensors: Sequence[Tensor], gather: dist.Gather, *, lo: int = LOW_EXP, hi: int = HIGH_EXP,
                       device: torch.device | str | None = None) -> Deferred:
    """``tensor_histograms`` as pieces of a tick's ``dist.Gather``: each rank bins its local views, rows of
    sharded tensors are gathered over their shard groups (with the tick's other partials: one collective
    per process group) and summed; plain and replicated rows are this rank's own counts."""
    _check(lo, hi)
    views = [dist.local_view(t).detach() for t in tensors]
    target = torch.device(device) if device is not None else (views[0].device if views else None)

    def partials(idx: list[int]) -> Tensor:
        # float64 counts: exact up to 2**53 elements per bin (an int64 collective is not on every backend)
        out = torch.zeros(len(idx), hi - lo + 5, dtype=torch.float64, device=target)
        for k, i in enumerate(idx):
            _bin_into(out[k], views[i].to(target), lo, hi)
        return out

    return defer(tensors, partials, lambda parts: parts.sum(0), hi - lo + 5, gather)


def tensor_histograms(tensors: Sequence[Tensor], *, lo: int = LOW_EXP, hi: int = HIGH_EXP,
                      device: torch.device | str | None = None) -> Tensor:
    """Histograms of every tensor of ``tensors`` as one ``[len(tensors), hi - lo + 5]`` float64 tensor
    (columns ``columns(lo, hi)``, see the module docstring), on ``device`` (default: the first tensor's).

    No host sync on any device; a ``DTensor`` (``dist.is_sharded``) is binned from its local shard and
    its counts gathered over its shard groups now (``dist.Gather``: every rank must call; exact global
    counts). A ``Partial`` placement is refused (its local values are not the tensor's values).

    Example:
        >>> h = tensor_histograms([torch.ones(3), torch.zeros(2)], lo=-1, hi=1)
        >>> h.tolist()
        [[0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    _check(lo, hi)
    if not tensors:
        return torch.zeros(0, hi - lo + 5, dtype=torch.float64, device=device)
    gather = dist.Gather()
    deferred = histogram_partials(tensors, gather, lo=lo, hi=hi, device=device)
    gather.run()
    out = deferred.result()
    return out.to(device) if device is not None else out
