"""Device-side statistics for ticks. Nothing here syncs an accelerator or copies its values to the host.

``tensor_stats`` returns one ``[N, 5]`` tensor (norm, mean, std, absmax, nonfinite) for a list of tensors:
the moments in two chunked passes (exact, bounded temporaries), norms and absmax with the kernels that are
fast on the tensor's device. Every statistic is first a *partial* of the local view (``PARTIALS``: count,
mean, centred sum of squares, sum of squares, absmax, non-finite count) and then combined over the ranks
that hold pieces of the tensor (Chan's parallel formula, in fp64): for a plain tensor there is one piece;
for a sharded one (``tick_lightning.dist.is_sharded``) the partials of a whole tick are gathered with one
collective per process group (``dist.Gather``), so every rank must call the same statistics in the same
order, which is why the callback never runs them inside rank-zero-only code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tick_lightning import dist

__all__ = ["NORM_INPUT_STATS", "PARTIALS", "TENSOR_STATS", "Deferred", "NormInputAccumulator", "global_norm",
           "grad_norm_partials", "placement_key", "stats_partials", "sumsq_by_placement", "sumsq_partials", "tensor_stats", "update_norms", "update_partials"]

TENSOR_STATS = ("norm", "mean", "std", "absmax", "nonfinite")
PARTIALS = ("count", "mean", "m2", "sumsq", "absmax", "nonfinite")
#: Elements per chunk of the moment and non-finite passes: bounds their temporaries (64 MiB in fp32).
_CHUNK = 1 << 24
NORM_INPUT_STATS = ("mean", "rms", "absmax", "kurtosis")


def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate in fp32, or fp64 for fp64 tensors (foreach norms refuse to narrow)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _foreach_norm(tensors: Sequence[Tensor], ord: float) -> list[Tensor]:
    """Per-tensor norms in the accumulation dtype, one foreach launch per dtype group, as fp32."""
    out: list = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(acc_dtype(t), []).append(i)
    for dtype, idx in groups.items():
        for i, norm in zip(idx, torch._foreach_norm([tensors[i] for i in idx], ord, dtype=dtype)):
            out[i] = norm.float()
    return out


def _local_stats(tensors: Sequence[Tensor]) -> Tensor:
    """``[N, 5]`` statistics of plain (unsharded) tensors, computed in fp32 (fp64 for fp64) on their device.

    The strategy depends on the device because the fast kernels differ (same results to fp32 rounding):
    ``_host_rows`` on CPU, ``_device_rows`` elsewhere; both compute the moments in two chunked passes.
    Empty tensors (an FSDP rank's empty shard) give NaN rows.
    """
    rows: list = [torch.full((5,), float("nan"), device=t.device) if not t.numel() else None for t in tensors]
    cpu = [i for i, t in enumerate(tensors) if t.numel() and t.device.type == "cpu"]
    accel = [i for i, t in enumerate(tensors) if t.numel() and t.device.type != "cpu"]
    for idx, strategy in ((cpu, _host_rows), (accel, _device_rows)):
        if idx:
            for i, row in zip(idx, strategy([tensors[i] for i in idx])):
                rows[i] = row
    return torch.stack(rows) if rows else torch.empty(0, 5)


def _chunks(t: Tensor) -> tuple[Tensor, ...]:
    """``t`` flattened in pieces of at most ``_CHUNK`` elements: bounds every per-element temporary."""
    return t.reshape(-1).split(_CHUNK)


def _mean_and_centred(t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and centred sum of squares of ``t`` in its accumulation dtype, two passes, chunked.

    Centred, because sum-of-squares minus mean^2 cancels badly for LayerNorm gains (mean ~1, std ~1e-3);
    chunked, because ``t.to(float32)`` of a 500M-element bf16 embedding would be a 2 GB temporary.
    """
    dtype = acc_dtype(t)
    mean = t.sum(dtype=dtype) / t.numel()
    return mean, sum((c.to(dtype) - mean).pow_(2).sum() for c in _chunks(t))


def _count_nonfinite(t: Tensor) -> Tensor:
    """Non-finite elements of ``t`` (fp32 scalar): ``x * 0`` is 0 for finite ``x``, NaN for inf and NaN.

    On CPU this is ~2x faster than counting ``~torch.isfinite(x)`` (a slow kernel there); chunked so the
    temporary stays bounded.
    """
    return sum(torch.count_nonzero(c.mul(0).ne_(0)) for c in _chunks(t)).float()


def _device_rows(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Accelerator rows, no host sync: foreach norms and absmax for all, chunked moments and non-finite count."""
    rows = []
    for t, norm, amax in zip(tensors, _foreach_norm(tensors, 2), _foreach_norm(tensors, float("inf"))):
        t = t.detach()
        mean, centred = _mean_and_centred(t)
        nonfinite = sum((~torch.isfinite(c)).sum() for c in _chunks(t))
        rows.append(torch.stack([norm, mean.float(), (centred / t.numel()).sqrt().float(), amax, nonfinite.float()]))
    return rows


def _host_rows(tensors: Sequence[Tensor]) -> list[Tensor]:
    """CPU rows: faster than ``_device_rows`` there, and accurate on large tensors.

    On CPU the foreach inf-norm runs far below memory speed, and fp32 foreach / ``vector_norm`` norms
    accumulate with a relative error of ~3e-4 on an 8M-element embedding. So the norm comes from the
    moments (norm^2 = centred + n mean^2, no cancellation) and the absmax from ``aminmax``. No value is
    read on the host (a sync-counting instrument sees none): where the moments are not finite the norm is
    the absmax, which is NaN if an element is NaN and inf if one is inf -- what the true norm is then.
    """
    rows = []
    for t in tensors:
        t = t.detach()
        n = t.numel()
        mean, centred = _mean_and_centred(t)
        norm = (centred + n * mean.square()).sqrt().float()
        lo, hi = torch.aminmax(t)
        amax = torch.maximum(lo.abs(), hi.abs()).float()  # NaN if an element is NaN, as the inf-norm gives
        norm = torch.where(torch.isfinite(norm) | torch.isfinite(amax), norm, amax)
        nonfinite = _count_nonfinite(t)
        rows.append(torch.stack([norm, mean.float(), (centred / n).sqrt().float(), amax, nonfinite]))
    return rows


def partial_dtype(device: torch.device) -> torch.dtype:
    """Partials are combined in fp64 (exact counts, no cancellation), except where fp64 does not exist."""
    return torch.float32 if device.type == "mps" else torch.float64


def stats_partials(tensors: Sequence[Tensor]) -> Tensor:
    """``[N, len(PARTIALS)]`` partials of plain (local) tensors on their device; see ``combine_stats``."""
    if not tensors:
        return torch.empty(0, len(PARTIALS))
    rows = _local_stats(tensors)
    dtype = partial_dtype(rows.device)
    rows = rows.to(dtype)
    counts = torch.stack([torch.full((), t.numel(), dtype=dtype, device=rows.device) for t in tensors])
    norm, mean, std, amax, nonfinite = rows.unbind(1)
    empty = counts == 0
    zero = torch.zeros_like(norm)
    return torch.stack([counts, torch.where(empty, zero, mean), torch.where(empty, zero, counts * std.square()),
                        torch.where(empty, zero, norm.square()), torch.where(empty, torch.full_like(amax, -torch.inf), amax),
                        torch.where(empty, zero, nonfinite)], 1)


def combine_stats(parts: Tensor) -> Tensor:
    """``[R, N, len(PARTIALS)]`` partials of ``N`` tensors held in ``R`` pieces -> ``[N, 5]`` ``TENSOR_STATS``.

    Chan's parallel formula: mean = sum n_i m_i / n, m2 = sum m2_i + sum n_i (m_i - mean)^2 (no
    cancellation), norm^2 = sum of the pieces' squares. A tensor of no elements gives NaN.
    """
    n_i, m_i, m2_i, sq_i, amax_i, nf_i = parts.unbind(2)
    n = n_i.sum(0)
    mean = (n_i * m_i).sum(0) / n
    held = n_i > 0
    between = torch.where(held, n_i * (m_i - mean).square(), torch.zeros_like(m_i)).sum(0)
    std = ((m2_i.sum(0) + between) / n).sqrt()
    amax = amax_i.amax(0)
    out = torch.stack([sq_i.sum(0).sqrt(), mean, std, amax, nf_i.sum(0)], 1)
    return torch.where((n > 0).unsqueeze(1), out, torch.full_like(out, float("nan")))


class Deferred:
    """A tick statistic whose pieces are being gathered (``dist.Gather``); ``result()`` after ``Gather.run``."""

    def __init__(self, parts: list, combine: Callable[[Tensor], Tensor], count: int, width: int) -> None:
        self._parts, self._combine, self._count, self._width = parts, combine, count, width

    def result(self) -> Tensor:
        blocks = [(idx, self._combine(p.value)) for idx, p in self._parts]
        if not blocks:
            return torch.empty(self._count, self._width)
        if len(blocks) == 1:
            return blocks[0][1]
        device = blocks[0][1].device
        rows: dict[int, Tensor] = {}
        for idx, block in blocks:
            rows.update(zip(idx, block.to(device).unbind(0)))
        return torch.stack([rows[i] for i in range(self._count)])


def _by_placement(tensors: Sequence[Tensor]) -> dict:
    """Indices of ``tensors`` grouped by (shard groups, collective device): each group gathers together."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        g = dist.shard_groups(t)
        key = placement_key(t)
        groups.setdefault(key, (g, dist.mesh_device(t), []))[2].append(i)
    return groups


def defer(tensors: Sequence[Tensor], partials: Callable[[list[int]], Tensor], combine, width: int,
           gather: dist.Gather) -> Deferred:
    parts = [(idx, gather.add(partials(idx), g, device)) for g, device, idx in _by_placement(tensors).values()]
    return Deferred(parts, combine, len(tensors), width)


def _now(deferred_fn, *args) -> Tensor:
    gather = dist.Gather()
    deferred = deferred_fn(*args, gather=gather)
    gather.run()
    return deferred.result()


def tensor_stats_deferred(tensors: Sequence[Tensor], gather: dist.Gather) -> Deferred:
    """``tensor_stats`` of (possibly sharded) tensors, their partials added to ``gather``."""
    views = [dist.local_view(t).detach() for t in tensors]
    return defer(tensors, lambda idx: stats_partials([views[i] for i in idx]), combine_stats,
                  len(TENSOR_STATS), gather)


def tensor_stats(tensors: Sequence[Tensor]) -> Tensor:
    """Statistics ``TENSOR_STATS`` of each tensor as a ``[len(tensors), 5]`` tensor on their device.

    Sharded tensors give the exact global values (their partials are gathered now: every rank must call).

    Example:
        >>> w = torch.tensor([[3.0, -4.0]])
        >>> tensor_stats([w]).tolist()
        [[5.0, -0.5, 3.5, 4.0, 0.0]]
    """
    if len(tensors) == 0:
        return torch.empty(0, len(TENSOR_STATS))
    return _now(tensor_stats_deferred, tensors)


def placement_key(t: Tensor) -> tuple:
    """What ``t``'s partials are gathered with: its shard groups (by identity) and collective device."""
    return tuple(id(x) for x in dist.shard_groups(t)), str(dist.mesh_device(t))


def sumsq_partials(tensors: Sequence[Tensor]) -> Tensor:
    """``[N]``: each tensor's *local* squared L2 norm (fp64, fp32 on MPS), one foreach launch per dtype.

    The partial sum every norm here is built from: summed over the ranks of a tensor's shard groups it is
    the squared norm of the whole tensor; summed over tensors, the squared norm of all of them. A NaN or
    inf element makes its entry non-finite, so the flag "this gradient had a non-finite value" costs
    nothing more. Device kernels only; the inputs are local views (``dist.local_view``) already.
    """
    norms = torch.stack(_foreach_norm(tensors, 2))
    return norms.to(partial_dtype(norms.device)).square()


def sumsq_by_placement(tensors: Sequence[Tensor]) -> dict:
    """``{placement_key: (groups, device, sumsq)}``: the local squared L2 norm of all ``tensors`` of each
    placement, a 0-d tensor (fp64, fp32 on MPS) on the tensors' device. Summed over each key's groups'
    ranks (and over keys) it is the global squared norm. Device kernels only (foreach norms)."""
    views = [dist.local_view(t).detach() for t in tensors]
    return {key: (groups, device, sumsq_partials([views[i] for i in idx]).sum())
            for key, (groups, device, idx) in _by_placement(tensors).items()}


def grad_norm_partials(tensors: Sequence[Tensor], gather: dist.Gather) -> Deferred:
    """The squared L2 norm of all ``tensors`` together (``[1, 1]`` after ``result()``), as pieces to gather."""
    return _Total([gather.add(total.reshape(1, 1), g, device)
                   for g, device, total in sumsq_by_placement(tensors).values()])


class _Total(Deferred):
    """A sum over every placement group and rank of ``[1, 1]`` pieces."""

    def __init__(self, pending: list) -> None:
        super().__init__([], lambda v: v, 1, 1)
        self._pending = pending

    def result(self) -> Tensor:
        if not self._pending:
            return torch.zeros(1, 1)
        device = self._pending[0].value.device
        return sum(p.value.sum(0).to(device) for p in self._pending).reshape(1, 1)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` together, as ``clip_grad_norm_`` computes it (no host sync)."""
    if not tensors:
        return torch.tensor(0.0)
    return _now(grad_norm_partials, tensors).reshape(()).sqrt().float()


def update_partials(after: Sequence[Tensor], before: Sequence[Tensor], gather: dist.Gather,
                    group_elements: int = 0) -> Deferred:
    """``update_norms`` of (possibly sharded) ``after`` against local copies ``before``, as pieces to gather.

    ``before[i]`` is the local view of ``after[i]`` copied before the optimizer step (device or host). The
    default ``group_elements=0`` takes one parameter at a time: the temporaries (the difference, and a
    host copy moved back to the device) are bounded by the largest parameter, not by the model.
    """
    views = [dist.local_view(t).detach() for t in after]

    def partials(idx: list[int]) -> Tensor:
        out, start = [], 0
        while start < len(idx):  # groups of ~group_elements: bounded fp32 temporaries on a large bf16 model
            stop, size = start, 0
            while stop < len(idx) and (stop == start or size + views[idx[stop]].numel() <= group_elements):
                size += views[idx[stop]].numel()
                stop += 1
            a = [views[i].to(acc_dtype(views[i])) for i in idx[start:stop]]
            b = [before[i].to(device=a[k].device, dtype=a[k].dtype, non_blocking=True)
                 for k, i in enumerate(idx[start:stop])]
            unorm = torch.stack(_foreach_norm(torch._foreach_sub(a, b), 2))
            wnorm = torch.stack(_foreach_norm(b, 2))
            out.append(torch.stack([unorm, wnorm], 1).to(partial_dtype(unorm.device)).square())
            start = stop
        return torch.cat(out)

    def combine(parts: Tensor) -> Tensor:
        unorm, wnorm = parts.sum(0).sqrt().unbind(1)
        return torch.stack([unorm, unorm / wnorm], 1)

    return defer(after, partials, combine, 2, gather)


def update_norms(after: Sequence[Tensor], before: Sequence[Tensor], group_elements: int = 1 << 26) -> Tensor:
    """``[N, 2]``: the norm of each update ``after - before`` and its ratio to ``before``'s norm.

    The difference is taken in fp32 (fp64 for fp64): bf16 weights would round a small update away. Tensors
    are processed in groups of about ``group_elements`` elements so the fp32 temporaries stay bounded.

    Example:
        >>> update_norms([torch.tensor([3.0, 4.0])], [torch.tensor([0.0, 0.0]) + 1e-30]).tolist()[0][0]
        5.0
    """
    if not after:
        return torch.empty(0, 2)
    gather = dist.Gather()
    deferred = update_partials(after, before, gather, group_elements)
    gather.run()
    return deferred.result()


class NormInputAccumulator:
    """Running mean / RMS / absmax / kurtosis of the tensors seen by a set of modules during one tick window.

    ``observer(i)`` returns a callable that folds a tensor into row ``i``; it is attached as a forward
    (pre-)hook or as a patched norm layer's ``tick_observer`` only for tick batches. One pass: the sums of
    d, d^2, d^3, d^4 with ``d = x - K`` (each chunk widened to fp32, summed in fp64; ``K`` is the first
    chunk's mean, kept on the device, so an activation of mean 50 and std 1 does not cancel away in fp32),
    the absmax and the count; kurtosis is Pearson's ``E[(x - mean)^4] / var^2`` (3 for a Gaussian, large
    for outlier features) from those shifted moments in fp64.
    """

    #: columns of ``acc``: sums of d, d^2, absmax, count, sums of d^3, d^4, the shift K
    WIDTH = 7

    def __init__(self, count: int, device: torch.device | str = "cpu") -> None:
        self.acc = torch.zeros(count, self.WIDTH, device=device, dtype=partial_dtype(torch.device(device)))

    def reset(self, device: torch.device | str | None = None) -> None:
        if device is not None and torch.device(device) != self.acc.device:
            self.acc = torch.zeros_like(self.acc, device=device, dtype=partial_dtype(torch.device(device)))
        else:
            self.acc.zero_()

    def observe(self, index: int, x: Tensor) -> None:
        """Fold ``x`` (this rank's local view of it) into row ``index``: device kernels only, no host copy."""
        x = dist.local_view(x.detach())
        if x.device != self.acc.device:
            self.acc = self.acc.to(x.device)
        if not x.numel():
            return
        acc, dtype = self.acc[index], self.acc.dtype
        for c in _chunks(x):
            c = c.float()
            acc[6].copy_(torch.where(acc[3] > 0, acc[6], c.mean().to(dtype)))  # the shift: set once, on the device
            d = c - acc[6].float()
            sq = d.square()
            acc[0] += d.sum(dtype=dtype)
            acc[1] += sq.sum(dtype=dtype)
            acc[4] += (sq * d).sum(dtype=dtype)
            acc[5] += sq.square_().sum(dtype=dtype)
            acc[3] += c.numel()  # a Python number: a kernel argument, not a host-to-device copy
        torch.maximum(acc[2], torch.linalg.vector_norm(x, float("inf"), dtype=torch.float32).to(dtype), out=acc[2])

    def observer(self, index: int):
        def observe(x: Tensor) -> None:
            self.observe(index, x)

        return observe

    def values(self) -> Tensor:
        """``[count, 4]``: mean, rms, absmax, kurtosis (NaN for modules that saw nothing)."""
        n = self.acc[:, 3]
        nan = torch.full_like(n, float("nan"))
        seen = n > 0
        k = n.clamp_min(1)
        m1, m2, m3, m4 = (self.acc[:, j] / k for j in (0, 1, 4, 5))  # moments about the shift
        shift = self.acc[:, 6]
        var = m2 - m1.square()
        central4 = m4 - 4 * m1 * m3 + 6 * m1.square() * m2 - 3 * m1.square().square()
        kurtosis = torch.where(var > 0, central4 / var.square(), nan)
        mean_square = m2 + 2 * shift * m1 + shift.square()
        out = torch.stack([shift + m1, mean_square.clamp_min(0).sqrt(), self.acc[:, 2], kurtosis], 1)
        return torch.where(seen.unsqueeze(1), out, nan.unsqueeze(1).expand_as(out)).float()


def nonfinite_partials(tensors: Sequence[Tensor], gather: dist.Gather) -> Deferred:
    """The number of non-finite elements of all ``tensors`` together (``[1, 1]`` after ``result()``)."""
    views = [dist.local_view(t).detach() for t in tensors]

    def partials(idx: list[int]) -> Tensor:
        counts = [_count_nonfinite(views[i]) for i in idx if views[i].numel()]
        dtype = partial_dtype(views[idx[0]].device)
        return (torch.stack(counts).to(dtype).sum() if counts else
                torch.zeros((), dtype=dtype, device=views[idx[0]].device)).reshape(1, 1)

    return _Total([gather.add(partials(idx), g, device) for g, device, idx in _by_placement(tensors).values()])
