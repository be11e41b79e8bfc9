"""Tick records as rows: a ``Block`` per state and tick, one host copy for all of them, an Arrow table.

A collector yields ``Block``s whose ``values`` are still on the device: a ``[len(names), len(stats)]``
tensor, one row per name (a parameter, a norm layer, ``""`` for a global value), one column per stat.
``to_host`` moves every block of a tick to the host with *one* copy (one ``cat``, one ``.cpu()``), and
``tick_table`` turns host blocks into the long-format rows that ``store`` writes: one row per
(state, name, stat) with its value.

Example:
    >>> import torch
    >>> blocks = [Block("loss", ("",), ("value",), torch.tensor([[0.7]])),
    ...           Block("grad", ("w", "b"), ("norm", "absmax"), torch.tensor([[1.0, 0.5], [2.0, 1.5]]))]
    >>> host = to_host(blocks)
    >>> tick_table(3, 0, host).to_pydict()["name"]
    ['', 'w', 'w', 'b', 'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["Block", "ROW_SCHEMA", "STATES", "flight_columns", "tick_table", "to_host"]

#: The states a tick can record (``TickCallback(states=...)``), in the order they are documented.
STATES = (
    "loss",  # the tick batch's loss, summed over accumulation micro-batches
    "lr",  # learning rate (and momentum / betas[0]) per param group
    "amp",  # AMP loss scale and whether the optimizer step was skipped
    "weight",  # per-parameter weight statistics (before the tick's update)
    "grad",  # per-parameter gradient statistics (after unscaling) and the global norm (name "")
    "update",  # per-parameter applied-update statistics
    "norm_input",  # mean / rms / absmax / kurtosis of every normalization layer's input
    "time",  # wall time of the tick step
    "memory",  # peak device memory
    "renorm",  # re-normalization before/after statistics
    "snapshot",  # safetensors snapshots of selected parameters (off by default)
    "weight_hist",  # per-parameter histograms of the weights, fixed log2 bins (off by default)
    "grad_hist",  # per-parameter histograms of the gradients, fixed log2 bins (off by default)
    "activation",  # mean / rms / absmax / kurtosis of chosen modules' outputs (TickCallback(activations=...))
)

#: The columns a collector produces; ``store`` adds the run, attempt and rank columns.
ROW_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int32()),
        ("state", pa.string()),
        ("name", pa.string()),
        ("stat", pa.string()),
        ("value", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Block:
    """Values of one state at one tick: ``values[i, j]`` is stat ``stats[j]`` of ``names[i]``.

    ``values`` is a device tensor until ``to_host`` and a ``numpy`` array after it.
    """

    state: str
    names: tuple[str, ...]
    stats: tuple[str, ...]
    values: Any

    def __post_init__(self) -> None:
        shape = tuple(self.values.shape)
        if shape != (len(self.names), len(self.stats)):
            raise ValueError(f"Block {self.state!r}: values of shape {shape} for {len(self.names)} names x "
                             f"{len(self.stats)} stats")

    @classmethod
    def scalars(cls, state: str, values: dict[str, Any]) -> Block:
        """A block of global host values (``name == ""``), e.g. ``Block.scalars("time", {"step_seconds": 0.1})``."""
        return cls(state, ("",), tuple(values), np.asarray([list(values.values())], dtype=np.float64))


def to_host(blocks: Sequence[Block]) -> list[Block]:
    """The tick's one device-to-host copy: every device block in one ``cat`` and one ``.cpu()``.

    Blocks already on the host (``numpy``) pass through untouched.
    """
    import torch

    device = [b for b in blocks if isinstance(b.values, torch.Tensor)]
    host_values: dict[int, np.ndarray] = {}
    if device:
        target = device[0].values.device
        # fp64 when a block is fp64: histogram and non-finite counts are fp64 partials, exact up to 2**53; an
        # fp32 copy rounded a bin of 2**24 + 1 elements to 2**24 (fp32 blocks widen exactly; MPS has no fp64)
        wide = target.type != "mps" and any(b.values.dtype == torch.float64 for b in device)
        flat = torch.cat([b.values.detach().reshape(-1).to(target).double() if wide else
                          b.values.detach().reshape(-1).float().to(target) for b in device])
        flat = flat.cpu().double().numpy()
        offset = 0
        for b in device:
            n = b.values.numel()
            host_values[id(b)] = flat[offset: offset + n].reshape(len(b.names), len(b.stats))
            offset += n
    return [Block(b.state, b.names, b.stats, host_values[id(b)]) if id(b) in host_values else b for b in blocks]


def tick_table(step: int, epoch: int, blocks: Sequence[Block]) -> pa.Table:
    """Long-format rows of one tick's host blocks, in block order, names then stats within a block."""
    state, name, stat, values = [], [], [], []
    for b in blocks:
        n, k = len(b.names), len(b.stats)
        state.extend([b.state] * (n * k))
        name.extend(np.repeat(np.asarray(b.names, dtype=object), k).tolist())
        stat.extend(list(b.stats) * n)
        values.append(np.asarray(b.values, dtype=np.float64).reshape(-1))
    flat = np.concatenate(values) if values else np.empty(0)
    rows = len(flat)
    return pa.table(
        {
            "step": pa.array(np.full(rows, step, dtype=np.int64)),
            "epoch": pa.array(np.full(rows, epoch, dtype=np.int32)),
            "state": pa.array(state, type=pa.string()),
            "name": pa.array(name, type=pa.string()),
            "stat": pa.array(stat, type=pa.string()),
            "value": pa.array(flat),
        },
        schema=ROW_SCHEMA,
    )


def flight_columns(flight: dict, key: str) -> list[str]:
    """The names of a flight series' columns from the manifest's ``flight`` section: ``key`` a flight stat or an
    event trigger; norm layers for ``input*`` (``input_absmax``, ``input_drop``, ...), attention blocks for
    ``attn*``, parameters for the rest (``grad_norm``, ``update_norm``, ``layer_rise``, ``update``, ...).

    Example:
        >>> flight_columns({"parameters": ["w"], "norm_layers": ["ln"], "attention_blocks": ["attn"]}, "attn_rise")
        ['attn']
    """
    if key.startswith("input"):
        return list(flight.get("norm_layers") or [])
    if key.startswith("attn"):
        return list(flight.get("attention_blocks") or [])
    return list(flight.get("parameters") or [])
