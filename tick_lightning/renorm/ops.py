"""The re-normalization math on lists of tensors: fp32 compute, batched kernels, DTensor-aware.

Why batched: ``at="step"`` runs after every optimizer step, so on a GPU a Python loop of several kernel
launches per tensor would dominate for a model with hundreds of weights. Tensors with the same (global)
shape, dtype and layout -- the Q/K/V/O weights of every layer, say -- are stacked into one ``[G, ...]`` fp32
tensor, the row statistics of all of them come from one reduction, and ``torch._foreach_copy_`` writes the
results back into the original storages in their own dtype. The kernel count is per *group*, not per tensor.
On CPU launches are cheap and the stacking copy is not, so there every tensor is its own group (measured in
benchmarks/renorm_experiment.py).

Sharded tensors (``DTensor``, as FSDP2 uses): the math runs on the local shard. A row whose
elements are split across ranks (the placement shards the row dimension) gets its sums all-reduced
over that mesh dimension, in two passes (mean first, then the centred sum of squares), so the result
equals the unsharded computation up to fp32 rounding. Rows that are not split need no communication.
Replicated placements (DDP-style) compute the same thing on every rank with no communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor

from tick_lightning.dist import is_sharded, local_view

__all__ = ["MAX_BATCH_BYTES", "STATS", "FlattenedViewError", "RenormPlan", "check_planned_shapes", "renorm_"]

#: Per-tensor statistics recorded for every application, in this order.
STATS = ("norm_before", "norm_after", "mean_before", "mean_after", "std_before", "std_after")


#: Default cap on the bytes of one stacked fp32 batch (``RenormPlan(max_batch_bytes=...)``): a group of
#: same-shape tensors larger than this is applied in chunks, so the temporaries of a step (the stacked
#: input, the result, its cast) stay a few times this size instead of a few copies of every Q/K/V/O weight.
MAX_BATCH_BYTES = 1 << 28


class FlattenedViewError(RuntimeError):
    """A planned tensor no longer has the shape it was planned for (e.g. an FSDP1 flat-parameter view)."""


@dataclass
class TensorGroup:
    indices: list[int]
    dim: int  # row dimension, non-negative, in the un-stacked tensor
    n_row: int  # global length of a row
    numel: int  # global number of elements of one tensor
    row_groups: list = field(default_factory=list)  # process groups that split rows
    all_groups: list = field(default_factory=list)  # process groups that split the tensor at all
    sharded: bool = False


class RenormPlan:
    """Group ``tensors`` once (by global shape, dtype, device and sharding) so each application is cheap.

    Example:
        >>> import torch
        >>> ws = [torch.randn(4, 8) for _ in range(3)] + [torch.randn(8, 4)]
        >>> plan = RenormPlan(ws, dim=-1)
        >>> stats = plan.run("unit", stats=True)
        >>> torch.allclose(ws[3].norm(dim=-1), torch.ones(8)), tuple(stats.shape)
        (True, (4, 6))
    """

    def __init__(self, tensors: Sequence[Tensor], dim: int = -1, batch: bool | None = None,
                 max_batch_bytes: int = MAX_BATCH_BYTES, names: Sequence[str] | None = None) -> None:
        """``batch``: stack same-layout tensors (default: on accelerators only -- on CPU a kernel launch costs
        microseconds and the stacking copy costs more than it saves, as benchmarks/renorm_experiment.py shows).
        ``max_batch_bytes``: the most fp32 bytes one stacked batch may hold; larger groups are chunked (a single
        tensor larger than the cap is its own batch). ``names``: for error messages."""
        if isinstance(max_batch_bytes, bool) or not isinstance(max_batch_bytes, int) or max_batch_bytes <= 0:
            raise ValueError(f"max_batch_bytes={max_batch_bytes!r} must be a positive number of bytes, e.g. {MAX_BATCH_BYTES}.")
        self.tensors = list(tensors)
        self.names = list(names) if names is not None else [f"tensor {i}" for i in range(len(self.tensors))]
        self.shapes = [tuple(t.shape) for t in self.tensors]  # checked before every application
        self.max_batch_bytes = max_batch_bytes
        groups: dict[tuple, TensorGroup] = {}
        for i, t in enumerate(self.tensors):
            if t.dim() < 1:
                raise ValueError(f"Tensor {i} is a scalar; re-normalization needs tensors with rows.")
            if not (-t.dim() <= dim < t.dim()):
                raise ValueError(f"dim={dim} is out of range for tensor {i} of shape {list(t.shape)}.")
            d = dim % t.dim()
            sharded = is_sharded(t)
            layout: tuple = ()
            row_groups, all_groups = [], []
            if sharded:
                mesh, placements = t.device_mesh, t.placements
                for mesh_dim, placement in enumerate(placements):
                    if placement.is_partial():
                        raise ValueError(f"Tensor {i} has a Partial placement; re-normalize parameters, not pending sums.")
                    if placement.is_shard():
                        group = mesh.get_group(mesh_dim)
                        all_groups.append(group)
                        if placement.dim % t.dim() == d:
                            row_groups.append(group)
                layout = (id(mesh), tuple(placements))
            stack = batch if batch is not None else t.device.type != "cpu"
            key = (tuple(t.shape), t.dtype, str(t.device), d, layout) + (() if stack else (i,))
            if key not in groups:
                groups[key] = TensorGroup([], d, int(t.shape[d]), t.numel(), row_groups, all_groups, sharded)
            groups[key].indices.append(i)
        # deterministic order, identical on every rank: first appearance; then chunks of at most the cap
        self.groups = [chunk for g in groups.values() for chunk in self._chunks(g)]
        self.order = [i for g in self.groups for i in g.indices]

    def _chunks(self, group: TensorGroup) -> list[TensorGroup]:
        local = self.tensors[group.indices[0]]
        local_bytes = local_view(local).numel() * 4  # stacked in fp32
        per = max(1, self.max_batch_bytes // max(1, local_bytes))
        return [replace(group, indices=group.indices[k: k + per]) for k in range(0, len(group.indices), per)]

    @torch.no_grad()
    def run(self, method: str, *, keep_norm: bool = False, eps: float = 1e-5, skip: Tensor | None = None,
            stats: bool = False) -> Tensor | None:
        """Re-normalize every tensor in place. Returns ``[len(order), 6]`` fp32 statistics (``STATS`` columns,
        rows in ``self.order``) when ``stats``; they stay on the device.

        ``skip``: a 0-d device tensor; where true, every tensor is written back bit-identical (masked with
        ``torch.where``, so deciding costs no host synchronisation).
        """
        check_planned_shapes(self.tensors, self.shapes, self.names)
        out = []
        for group in self.groups:
            # under no_grad a DTensor's ``to_local`` is the shard's own storage: edits land in the parameter
            locals_ = [local_view(self.tensors[i]) for i in group.indices]
            result = _apply_group(locals_, group, method, keep_norm, eps, skip, stats)
            if stats:
                out.append(result)
        return torch.cat(out) if stats and out else None


def check_planned_shapes(tensors: Sequence[Tensor], shapes: Sequence[tuple], names: Sequence[str]) -> None:
    """Refuse to edit a tensor whose shape changed since it was planned (Python-side compare, no device work).

    FSDP1 (Lightning's ``strategy="fsdp"``) replaces each parameter's data by a 1-D slice of its rank's flat
    shard (or an empty tensor): a row plan made for the 2-D weight would normalize a whole shard as one
    row, silently corrupting the weights.
    """
    for t, shape, name in zip(tensors, shapes, names):
        if tuple(t.shape) != shape:
            raise FlattenedViewError(
                f"Renorm: {name} has shape {list(t.shape)} but was planned for {list(shape)}; it is a flattened view "
                "(FSDP1, Lightning's strategy='fsdp', keeps 1-D slices of a flat shard). Re-normalizing it would "
                "mix rows. Use ModelParallelStrategy with fully_shard (FSDP2) or DDP for Renorm."
            )


def _reduce(t: Tensor, groups: list) -> Tensor:
    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _apply_group(xs: list[Tensor], group: TensorGroup, method: str, keep_norm: bool, eps: float,
                 skip: Tensor | None, stats: bool) -> Tensor | None:
    dtype = xs[0].dtype
    # [G, ...] in fp32; a single fp32 tensor is used in place (a view), so "before" stats come before the write
    x = (xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)).to(torch.float32)
    d = group.dim + 1

    def row_sum(t: Tensor) -> Tensor:
        return _reduce(t.sum(d, keepdim=True), group.row_groups)

    def row_norm(t: Tensor) -> Tensor:
        if group.row_groups:
            return row_sum(t * t).sqrt()
        return torch.linalg.vector_norm(t, dim=d, keepdim=True)  # one fused kernel when rows are local

    if method == "unit":
        y = x / row_norm(x).clamp_min(eps)
    elif method in ("center", "layernorm"):
        if group.row_groups:  # split rows: exact two-pass from all-reduced sums (mean, then centred squares)
            y = x - row_sum(x) / group.n_row
            if method == "layernorm":
                y = y * torch.rsqrt(row_sum(y * y) / group.n_row + eps)
        elif method == "layernorm":  # biased variance as nn.LayerNorm; var_mean is a stable one-kernel pass
            var, mean = torch.var_mean(x, dim=d, keepdim=True, correction=0)
            y = (x - mean) * torch.rsqrt(var + eps)
        else:
            y = x - x.mean(d, keepdim=True)
        if keep_norm:
            y = y * (row_norm(x) / row_norm(y).clamp_min(eps))
    else:  # validated by Renorm; kept so a direct caller gets a clear message
        raise ValueError(f"Unknown re-normalization method {method!r}; valid: layernorm, unit, center.")
    if skip is not None:
        y = torch.where(skip.to(device=y.device, dtype=torch.bool), x, y)
    written = y.to(dtype)
    if stats:
        nb, mb, sb = group_stats(x, group)
    torch._foreach_copy_(xs, list(written.unbind(0)))
    if not stats:
        return None
    after = written.to(torch.float32) if dtype != torch.float32 else written
    na, ma, sa = group_stats(after, group)
    return torch.stack([nb, na, mb, ma, sb, sa], dim=1)


def group_stats(t: Tensor, group: TensorGroup) -> tuple[Tensor, Tensor, Tensor]:
    """Whole-tensor L2 norm, mean and (population) std of each stacked tensor, over every shard."""
    dims = tuple(range(1, t.dim()))
    sums = _reduce(torch.stack([t.sum(dims), (t * t).sum(dims)]), group.all_groups)
    mean = sums[0] / group.numel
    centred = _reduce(((t - mean.view(-1, *([1] * len(dims)))) ** 2).sum(dims), group.all_groups)
    return sums[1].sqrt(), mean, (centred / group.numel).sqrt()


def renorm_(tensors: Sequence[Tensor], method: str = "layernorm", *, dim: int = -1, keep_norm: bool = False,
            eps: float = 1e-5, skip: Tensor | None = None, stats: bool = False,
            batch: bool | None = None) -> Tensor | None:
    """Re-normalize ``tensors`` in place along ``dim`` (one-shot form of ``RenormPlan``).

    Statistics, when asked for, come back in the order of ``tensors``.

    Example:
        >>> import torch
        >>> w = torch.randn(3, 16, dtype=torch.bfloat16)
        >>> _ = renorm_([w], "layernorm")
        >>> bool(w.float().mean(-1).abs().max() < 1e-2)
        True
    """
    plan = RenormPlan(tensors, dim, batch)
    result = plan.run(method, keep_norm=keep_norm, eps=eps, skip=skip, stats=stats)
    if result is None:
        return None
    inverse = torch.empty(len(plan.order), dtype=torch.long)
    inverse[torch.tensor(plan.order)] = torch.arange(len(plan.order))
    return result[inverse.to(result.device)]
