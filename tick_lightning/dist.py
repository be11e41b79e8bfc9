"""The one place that knows about sharding: which tensors are sharded, their local view, and the
collectives that turn per-shard partial results into global ones.

Rules every caller relies on:

- ``is_sharded(t)``: ``t`` is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel ``parallelize_module``).
  Its ``local_view`` is what this rank holds; ``shard_groups(t)`` are the process groups over which it is
  split (its ``Shard`` mesh dimensions; ``Replicate`` dimensions hold identical copies and need nothing).
- ``Gather``: per-tensor partial rows of one tick are packed per set of process groups and gathered with
  **one collective per process group per tick**, whatever the number of parameters. Every rank must run
  the same ``Gather`` (same tensors, same order): the tick decisions are pure integers, identical on
  every rank, and flags that depend on values go through ``any_rank`` first.
- Collective tensors live on the mesh's device (``mesh.device_type``): an FSDP2 CPU-offloaded shard is
  on the CPU while its NCCL group talks CUDA, so partial rows move to the mesh device before a collective.

Example:
    >>> import torch
    >>> is_sharded(torch.zeros(3)), local_view(torch.ones(2)).tolist()
    (False, [1.0, 1.0])
    >>> g = Gather()
    >>> pending = g.add(torch.tensor([[1.0, 2.0]]), groups=())   # nothing to gather: [1 rank, 1 row, 2]
    >>> g.run(); pending.value.shape
    torch.Size([1, 1, 2])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as tdist
from torch import Tensor

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = None  # type: ignore[assignment]
try:  # FSDP2 over a tensor-parallel dimension shards with _StridedShard, which is not a Shard subclass
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover
    _StridedShard = Shard if DTensor is not None else ()  # type: ignore[assignment,misc]

__all__ = ["Gather", "GroupStrategy", "Pending", "any_rank", "flat_shard_group", "flat_views", "is_sharded", "local_view",
           "mean_over_ranks", "mesh_device", "shard_groups", "unsharded"]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a distributed tensor (``DTensor``): its local view may not be the whole tensor."""
    return DTensor is not None and isinstance(t, DTensor)


def local_view(t: Tensor) -> Tensor:
    """What this rank holds of ``t``: the local shard of a ``DTensor``, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def shard_groups(t: Tensor) -> tuple:
    """Process groups over which ``t`` is split (empty for a plain tensor or a replicated ``DTensor``)."""
    if not is_sharded(t):
        return ()
    if any(isinstance(p, Partial) for p in t.placements):
        raise NotImplementedError(f"tick statistics of a DTensor with placements {t.placements} (pending "
                                  "reduction) are not supported; redistribute it to Shard or Replicate first.")
    mesh = t.device_mesh
    return tuple(mesh.get_group(dim) for dim, p in enumerate(t.placements) if isinstance(p, (Shard, _StridedShard)))


def mesh_device(t: Tensor) -> torch.device:
    """The device collectives about ``t`` use: its mesh's device type, or ``t``'s device for plain tensors."""
    if not is_sharded(t):
        return t.device
    kind = t.device_mesh.device_type
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind)
    return torch.device(kind, module.current_device())


class Pending:
    """The gathered partial rows of one ``Gather.add``: ``value`` is ``[ranks, *rows.shape]`` after ``run``."""

    __slots__ = ("rows", "value")

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows
        self.value: Tensor | None = None


class Gather:
    """Packs the partial rows of one tick and gathers them: one ``all_gather`` per process group.

    Rows added with the same groups (and device) are concatenated into one flat tensor; a tensor split
    over two mesh dimensions (FSDP x TP) is gathered over each of its groups in turn. Rows without groups
    (plain or replicated tensors) are resolved at once, without communication.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple, tuple[tuple, torch.device, list[Pending]]] = {}
        self.collectives = 0

    def add(self, rows: Tensor, groups: tuple, device: torch.device | None = None) -> Pending:
        pending = Pending(rows)
        if not groups:
            pending.value = rows.unsqueeze(0)
            return pending
        device = rows.device if device is None else device
        key = (tuple(id(g) for g in groups), str(device))
        self._pending.setdefault(key, (groups, device, []))[2].append(pending)
        return pending

    def run(self) -> None:
        """Issue the collectives (every rank, same order); afterwards every ``Pending.value`` is set."""
        for groups, device, items in self._pending.values():
            flat = torch.cat([p.rows.reshape(-1).to(device) for p in items])
            out = flat.unsqueeze(0)
            for group in groups:
                size = tdist.get_world_size(group)
                parts = [torch.empty_like(out) for _ in range(size)]
                tdist.all_gather(parts, out.contiguous(), group=group)
                self.collectives += 1
                out = torch.cat(parts, 0)
            offset = 0
            for p in items:
                n = p.rows.numel()
                p.value = out[:, offset: offset + n].reshape(out.shape[0], *p.rows.shape).to(p.rows.device)
                offset += n
        self._pending = {}


def any_rank(flag: Tensor) -> Tensor:
    """``flag`` (a device scalar, > 0 meaning yes) maxed over every rank, so every rank takes the same branch.

    Call it before a host read that decides whether collectives follow: if only one rank saw a NaN loss,
    a rank-local decision would leave the others waiting in a collective forever (an NCCL hang).
    Without an initialized process group it returns ``flag`` unchanged.
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return flag
    backend = tdist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    out = flag.detach().float().reshape(1).to(device).clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
    return out.reshape(()).to(flag.device)


def mean_over_ranks(value: Tensor) -> Tensor:
    """``value`` (a device scalar) averaged over every rank with one all-reduce; unchanged without a process group.

    The guard's loss: each rank's loss differs under data parallelism, and a decision taken on it must be the same
    on every rank. No host read (the collective is ordered on the device under nccl).
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return value
    backend = tdist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    out = value.detach().reshape(1).to(device=device, dtype=value.dtype).clone()
    tdist.all_reduce(out)
    return (out / tdist.get_world_size()).reshape(()).to(value.device)


@contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[None]:
    """Inside, every FSDP2 (``fully_shard``) module of ``module`` holds its full, plain parameters.

    For one-off work that needs the real tensors, such as probing normalization layers before patching
    them: it all-gathers every sharded parameter at once (the full model's size per rank, briefly) and
    reshards on exit. A collective: every rank must enter it. Without FSDP2 modules it does nothing.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()  # noqa: N806
    fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()


def flat_views(module: torch.nn.Module, shapes: dict[str, tuple], named: Sequence[tuple[str, Tensor]],
               world_size: int = 1) -> list[str]:
    """Problems that make a rank's parameters *views* of something else (FSDP1 / DeepSpeed flat parameters).

    ``shapes`` are the shapes recorded when the parameters were selected; ``named`` the parameters now.
    A parameter whose shape changed (a 1-D slice of a flat shard) or that became empty on this rank (its
    elements live on another rank) would give statistics of a slice as if it were the whole tensor. An
    FSDP1-wrapped model on several ranks is refused even when the shapes were recorded after wrapping; on
    one rank FSDP1 holds every parameter whole.
    """
    problems = []
    if flat_shard_group(module, world_size) is not None:
        problems.append("the model is wrapped in FSDP1 (FullyShardedDataParallel): its parameters are per-rank "
                        "slices of flat parameters")
    for name, p in named:
        recorded = shapes.get(name)
        if is_sharded(p):
            continue
        if recorded is not None and tuple(p.shape) != tuple(recorded):
            problems.append(f"parameter {name!r} has shape {list(p.shape)} but {list(recorded)} when it was selected")
        elif p.numel() == 0 and (recorded is None or any(recorded)):
            problems.append(f"parameter {name!r} is empty on this rank (its elements live on other ranks)")
    return problems


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return ()
    return FullyShardedDataParallel


def flat_shard_group(module: torch.nn.Module, world_size: int = 1):
    """The process group over which FSDP1 shards ``module``'s flat parameters (``None`` if it does not).

    Under FSDP1 a rank's parameters are plain tensors holding *its slice* of a flattened parameter, so the
    squared norms of its gradients are partials of the global one, like a ``DTensor``'s local shard: they
    are summed over this group (the outermost FSDP1 module's ``process_group``: its sharding group, which
    under ``HYBRID_SHARD`` is one node, not the world). DDP's plain tensors are whole replicas: no group.
    """
    if world_size <= 1:
        return None
    fsdp1 = _fsdp1_class()
    root = next((m for m in module.modules() if fsdp1 and isinstance(m, fsdp1)), None)
    if root is None:
        return None
    return getattr(root, "process_group", None) or tdist.group.WORLD



class GroupStrategy:
    """What ``TickCallback`` asks of a Lightning strategy (a broadcast from rank 0 when a run starts, a barrier at a
    checkpoint), over the default ``torch.distributed`` group when there is one of several ranks, else nothing: the
    adapters for loops that are not Lightning's (``tick_lightning.hf``, ``tick_lightning.loop``).

    Example:
        >>> GroupStrategy.broadcast({"run": 1})      # one process: the object itself
        {'run': 1}
    """

    @staticmethod
    def _group() -> bool:
        return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1

    @staticmethod
    def broadcast(obj, src: int = 0):
        if not GroupStrategy._group():
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    @staticmethod
    def barrier(name: str | None = None) -> None:
        if GroupStrategy._group():
            tdist.barrier()
