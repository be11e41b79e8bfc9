"""FSDP2 for the recipes: the ``fsdp2`` strategy (registered with Lightning's strategy registry on import),
``fully_shard`` per transformer block, and the gathered full state dict for export.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from recipes._shared.errors import RecipeError


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process is one data-parallel shard.

    ``ModelParallelStrategy``'s ``"auto"`` sizes mean data parallel across nodes and tensor parallel within a
    node; a recipe shards parameters only (``fully_shard``, see :func:`shard_model`), so here the data-parallel
    size is the world size and the tensor-parallel size 1. Registered as ``--trainer.strategy=fsdp2``; runs on
    CPU (gloo) as on GPU (nccl).

    Example:
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> "fsdp2" in StrategyRegistry
        True
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def end_process_group() -> None:
    """End the process group once a run is over, as torch asks of a distributed script.

    Lightning does it at exit under nccl only; under gloo (CPU DDP or FSDP2) a group left to the interpreter's
    shutdown can abort the exit with "terminate called without an active exception" (pytorch/pytorch#190489),
    turning a finished run into exit status -6. Called only after success: a rank that failed must not wait on
    the others.

    Example:
        >>> end_process_group()  # no group: nothing to do
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _register_fsdp2() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) per transformer block",
                                  override=True)


_register_fsdp2()


def no_split_modules(model: torch.nn.Module) -> set[str]:
    """Class names of the blocks a Hugging Face model must not split: its ``_no_split_modules`` (as Accelerate's
    ``device_map`` and FSDP auto-wrap read them), from every ``PreTrainedModel`` inside (PEFT wrappers included).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> sorted(no_split_modules(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                                                intermediate_size=8, vocab_size=10))))
        ['BertEmbeddings', 'BertLayer']
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (``DTensor``) parameters."""
    from tick_lightning import dist

    return any(dist.is_sharded(p) for p in model.parameters())


def builds_on_meta(strategy: Any) -> bool:
    """Whether this process builds the model on the meta device: under FSDP2 (any ``ModelParallelStrategy``) every
    rank but 0 does, and :func:`shard_model` gives it rank 0's weights. Decided before the launch has set up the
    process group, from the launcher's environment (``rank_zero_only.rank``: ``RANK``, ``LOCAL_RANK`` ...).

    Example:
        >>> builds_on_meta("ddp"), builds_on_meta(FSDP2Strategy())  # this process is rank 0
        (False, False)
    """
    from lightning.pytorch.utilities import rank_zero_only

    return isinstance(strategy, ModelParallelStrategy) and getattr(rank_zero_only, "rank", 0) != 0


def shard_model(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """``fully_shard`` every block named by :func:`no_split_modules`, then the root (idempotent: a sharded model is
    returned as it is, since Lightning calls ``configure_model`` again for the final validation).

    Ranks whose model is on the meta device (:func:`builds_on_meta`) get rank 0's weights after sharding: each
    takes rank 0's dtypes, then receives its own shards (``set_model_state_dict`` broadcasting from rank 0) and
    the buffers that are not in the state dict, so only rank 0 ever holds the full weights. A collective: every
    rank calls it.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    names = no_split_modules(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise RecipeError(f"--trainer.strategy=fsdp2 shards each transformer block, but {type(model).__name__} names "
                          "none (no _no_split_modules); use --trainer.strategy=ddp.")
    from tick_lightning import dist

    on_meta = _has_meta(model)
    loads = dist.any_rank(torch.tensor(float(on_meta))) > 0  # every rank takes the same branch
    if loads:
        _match_rank0(model, on_meta)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    full = model.state_dict() if loads and rank0 else {}  # references, no copy: rank 0's loaded weights
    persistent = set(model.state_dict().keys())
    extra_buffers = [n for n, _ in model.named_buffers() if n not in persistent]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    if loads:
        _load_from_rank0(model, full, extra_buffers)
    return model


def _has_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _match_rank0(model: torch.nn.Module, on_meta: bool) -> None:
    """Give a meta model rank 0's dtypes (free on meta) and check its shapes: rank 0 loads with
    ``from_pretrained``, whose dtype can come from the weights (``dtype="auto"``) when a config names none, while a
    meta build takes the config's. A load into other dtypes would cast silently and desynchronize FSDP2's
    collectives. Rank 0 sends either its tensors' (shape, dtype) or an error every rank raises (no rank is left
    waiting in a collective)."""
    rank = torch.distributed.get_rank()
    if rank == 0:
        message = None if not on_meta else ("rank 0 must hold the loaded weights under --trainer.strategy=fsdp2, but "
                                            "its model is on the meta device; build it with build_on_meta=False there.")
        payload = [message or {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}]
    else:
        payload = [None]
    torch.distributed.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise RecipeError(payload[0])
    if not on_meta:
        return
    mine = model.state_dict()
    for name, (shape, dtype) in payload[0].items():
        if name not in mine or tuple(mine[name].shape) != shape:
            raise RecipeError(f"rank {rank} built {name!r} with shape "
                              f"{list(mine[name].shape) if name in mine else 'none'} but rank 0 loaded {list(shape)}: "
                              "every rank must build the model from the same checkpoint and config.")
    dtypes = {n: d for n, (_, d) in payload[0].items()}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = tensor.data.to(dtypes[name])


def _load_from_rank0(model: torch.nn.Module, full: dict, extra_buffers: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from tick_lightning import dist

    device = dist.mesh_device(next(model.parameters()))  # the mesh's device: where FSDP2 put the shards
    if _has_meta(model):
        # real (empty) local shards first, so the load copies into them: parameter objects, and so tied weights,
        # stay as they are (assigning new ones to a meta model would untie them on this rank only)
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name in extra_buffers:  # non-persistent buffers (position ids, rotary frequencies): not in the state dict
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        buffer = module._buffers[leaf].to(device)
        torch.distributed.broadcast(buffer, src=0)
        module._buffers[leaf] = buffer
    leftover = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if leftover:  # e.g. a tensor attribute that is neither a parameter nor a buffer
        raise RecipeError(f"after loading rank 0's weights, {leftover[:3]} are still on the meta device; use "
                          "--trainer.strategy=ddp for this model.")


def full_state_dict(model: torch.nn.Module) -> Optional[dict]:
    """The whole state dict of a sharded model on CPU on rank 0 (``{}`` on the other ranks; a collective: call it
    on every rank); None for an unsharded model."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_replica(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A plain (unsharded) copy of a Hugging Face model, PEFT wrapper included, holding ``state_dict``.

    The copy is built on the meta device from the model's config and adapter config, then takes the tensors of
    ``state_dict`` as they are (``assign=True``), so rank 0 holds the gathered weights once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        replica = type(base)._from_config(base.config)
        if base is not model:
            import peft

            replica = peft.get_peft_model(replica, model.peft_config["default"])
    replica.load_state_dict(state_dict, strict=True, assign=True)
    replica.tie_weights() if hasattr(replica, "tie_weights") else None
    return replica


def shard_for_strategy(module: Any) -> None:
    """The ``configure_model`` of a recipe's module: under ``--trainer.strategy=fsdp2`` (any
    ``ModelParallelStrategy``), build ``module.model`` if needed and :func:`shard_model` it over the data-parallel
    mesh; under any other strategy, nothing."""
    if isinstance(module._trainer.strategy if module._trainer is not None else None, ModelParallelStrategy):
        if module.model is None:
            module.setup("fit")
        module.model = shard_model(module.model, module.device_mesh["data_parallel"])
