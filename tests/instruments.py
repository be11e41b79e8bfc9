"""Measuring instruments for the accelerator promises, meaningful on a CPU-only machine.

``HostTraffic`` counts what makes an accelerator wait for the host or the host for the accelerator:

- ``syncs``: a device value read into Python (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``,
  ``float(t)``, ``int(t)``, an ``if t:``);
- ``d2h``: a device tensor copied to the host (``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.numpy()``,
  ``host.copy_(device)``);
- ``h2d``: host data copied to the device (``torch.tensor(data, device=d)`` and the other factories from
  Python/numpy data, an index or value given as a Python list: ``t[[0, 2]] = v``, ``device.copy_(host)``,
  ``host_tensor.to(d)``). From pageable memory every one of these is a synchronous ``cudaMemcpy``.

Two modes do the counting: a ``TorchFunctionMode`` sees the Python-level calls (factories, indexing,
``.cpu()``), a ``TorchDispatchMode`` sees the ATen ops (``_local_scalar_dense``, and cross-device
``_to_copy`` / ``copy_`` that no Python-level call accounted for).

What is "the device" on a CPU-only machine: ``HostTraffic(device="cpu")`` *simulates* an accelerator. A CPU
tensor is a device tensor unless it is a host tensor: one made by a factory without ``device=`` (as it
would be on a GPU machine, where that lands in host memory), one returned by ``.cpu()`` / ``.to("cpu")``
(here a real copy, so the host copy is a distinct object) and whatever is computed from host tensors only.
With ``device="meta"`` or ``"cuda"`` host tensors are simply the CPU ones; a ``meta`` value read or copied to
the host is counted and then answered with zeros so the checked code runs on in full (meta tensors have
no data: use it to check large models without memory).

The same check on a GPU: run the code on ``cuda`` under ``HostTraffic(device="cuda")`` and, for syncs the
Python-level instruments cannot see (inside C++ ops), also under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on every synchronizing CUDA call (``benchmarks/gpu_check.sh`` does both).

``scope``: only events raised while a frame from a file under that directory (or under one of a tuple
of paths) is on the Python stack are counted (default: the ``tick_lightning`` package), so the optimizer's and Lightning's own host work does not
mix with the library's. ``None`` counts everything.

``LiveBytes`` measures the peak of extra bytes alive at once: every storage a piece of code allocates
(on any device, ``meta`` included) counted from its creation until it is freed (weakly referenced), views
and in-place results not counted twice, pre-existing storages never counted.

Example:
    >>> import torch
    >>> x = torch.ones(3)
    >>> with HostTraffic(device="cpu", scope=None) as traffic:
    ...     _ = x.sum().item()
    ...     _ = torch.tensor([1.0, 2.0], device="cpu")
    >>> traffic.syncs, traffic.h2d, traffic.d2h
    (1, 1, 0)
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import tick_lightning

__all__ = ["LIBRARY", "HostTraffic", "LiveBytes", "TrafficEvent", "load_module"]

#: The directory of the ``tick_lightning`` package: the default scope.
LIBRARY = str(Path(tick_lightning.__file__).resolve().parent)
_HERE = str(Path(__file__).resolve())

# factories that make a tensor from host data / from nothing (no tensor input to inherit a device from)
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_FACTORIES = _FROM_DATA | {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace,
                           torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
                           torch.empty_strided, torch.scalar_tensor}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist}
_INDEXING = {torch.Tensor.__setitem__, torch.Tensor.__getitem__}


@dataclass(frozen=True)
class TrafficEvent:
    kind: str  # "sync", "h2d" or "d2h"
    op: str  # what did it: "torch.tensor", "Tensor.cpu", "aten._local_scalar_dense.default", ...
    label: Any  # HostTraffic.label when it happened (e.g. the training step)
    where: str  # innermost frame inside the scope: "file.py:123 in function"


def _scoped_frame(scope: str | tuple[str, ...] | None, depth: int = 2) -> str | None:
    """``"file:line in func"`` of the innermost frame under ``scope`` (``""`` for no scope), else ``None``."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != _HERE and (scope is None or name.startswith(scope)):
            return f"{Path(name).name}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def _tensors(*trees) -> list[torch.Tensor]:
    flat, _ = tree_flatten(list(trees))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _target_device(args, kwargs) -> torch.device | None:
    """The device of ``Tensor.to(...)``'s target, if it names one."""
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class HostTraffic:
    """Count host syncs and host<->device copies (see the module docstring). Use as a context manager.

    Args:
        device: the device the checked code trains on: ``"cpu"`` simulates an accelerator, ``"meta"`` and
            ``"cuda"`` are real devices.
        scope: a directory; only events raised below code from it count (default: ``tick_lightning``).

    ``label`` is copied into each event (set it to the training step to count per step).
    """

    def __init__(self, device: str | torch.device = "cpu", scope: str | tuple[str, ...] | None = LIBRARY) -> None:
        self.device = torch.device(device)
        self.simulated = self.device.type == "cpu"
        self.scope = scope
        self.label: Any = None
        self.events: list[TrafficEvent] = []
        self._host = WeakIdKeyDictionary()  # simulated mode: CPU tensors that stand for host memory
        self._counted_call = 0  # > 0 while a Python-level counted call runs: its ATen copies are the same event
        self._modes = (_TrafficFunctionMode(self), _TrafficDispatchMode(self))

    # ----------------------------------------------------------- results
    def count(self, kind: str, label: Any = ...) -> int:
        return sum(1 for e in self.events if e.kind == kind and (label is ... or e.label == label))

    @property
    def syncs(self) -> int:
        return self.count("sync")

    @property
    def h2d(self) -> int:
        return self.count("h2d")

    @property
    def d2h(self) -> int:
        return self.count("d2h")

    def by_label(self) -> dict[Any, dict[str, int]]:
        """``{label: {"sync": n, "h2d": n, "d2h": n}}`` over every label that saw an event."""
        out: dict = {}
        for e in self.events:
            out.setdefault(e.label, {"sync": 0, "h2d": 0, "d2h": 0})[e.kind] += 1
        return out

    def report(self, label: Any = ...) -> str:
        return "\n".join(f"{e.kind} {e.op} at {e.where} (label {e.label})" for e in self.events
                         if label is ... or e.label == label)

    # ------------------------------------------------------------ state
    def is_host(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu":
            return False
        return t in self._host if self.simulated else True

    def mark_host(self, t: torch.Tensor) -> None:
        if self.simulated and t.device.type == "cpu":
            self._host[t] = True

    def record(self, kind: str, op: str, depth: int = 3) -> None:
        where = _scoped_frame(self.scope, depth)
        if where is not None:
            self.events.append(TrafficEvent(kind, op, self.label, where))

    def __enter__(self) -> HostTraffic:
        self._modes[0].__enter__()
        self._modes[1].__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._modes[1].__exit__(*exc)
        self._modes[0].__exit__(*exc)


def _name(func) -> str:
    qual = getattr(func, "__qualname__", "") or ""
    name = getattr(func, "__name__", str(func))
    return f"Tensor.{name}" if qual.startswith(("Tensor.", "TensorBase.")) else f"torch.{name}"


class _TrafficFunctionMode(TorchFunctionMode):
    def __init__(self, traffic: HostTraffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tr = self.traffic
        kind = self._classify(func, args, kwargs)
        if kind is None:
            out = func(*args, **kwargs)
        else:
            tr.record(kind, _name(func))
            tr._counted_call += 1
            try:
                out = func(*args, **kwargs)
            finally:
                tr._counted_call -= 1
        return self._mark(func, args, kwargs, kind, out)

    def _classify(self, func, args, kwargs) -> str | None:
        tr = self.traffic
        if func in _FROM_DATA:
            data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else kwargs.get("data"))
            if isinstance(data, torch.Tensor) and not tr.is_host(data):
                return None  # a device tensor re-wrapped: no host data moves
            if func is torch.Tensor.new_tensor:
                return None if tr.is_host(args[0]) else "h2d"
            device = kwargs.get("device")
            if device is None:
                return None
            return "h2d" if tr.simulated or torch.device(device).type != "cpu" else None
        if func in _INDEXING:
            self_, index = args[0], args[1]
            value = args[2] if len(args) > 2 else None
            if tr.is_host(self_):
                return None
            moving = isinstance(value, (list, np.ndarray)) or (isinstance(value, torch.Tensor) and tr.is_host(value))
            return "h2d" if moving or _host_index(tr, index) else None
        if func in _TO_HOST:
            return None if tr.is_host(args[0]) else "d2h"
        if func is torch.Tensor.to:
            if not tr.simulated:
                return None  # the dispatch mode sees the cross-device _to_copy
            # simulated: `.to(<the device>)` moves to the device; only `.to(host_tensor)` means the host
            target = _target_device(args[1:], kwargs)
            if target is None or target.type != "cpu":
                return None
            other = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
            if other is not None and tr.is_host(other):
                return None if tr.is_host(args[0]) else "d2h"
            return "h2d" if tr.is_host(args[0]) else None
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if not isinstance(src, torch.Tensor):
                return None
            if tr.is_host(dst) and not tr.is_host(src):
                return "d2h"
            if not tr.is_host(dst) and tr.is_host(src):
                return "h2d"
        return None

    def _mark(self, func, args, kwargs, kind, out):
        tr = self.traffic
        if not tr.simulated or not isinstance(out, torch.Tensor) or func is torch.Tensor.copy_:
            return out
        if kind == "d2h":
            if out is args[0]:  # on CPU `.cpu()` returns self: make the host copy a distinct tensor
                out = out.clone()
            tr.mark_host(out)
        elif kind == "h2d" and func is torch.Tensor.to and out is args[0]:
            out = out.clone()  # the device copy of a host tensor
        elif kind is None and func in _FACTORIES and "device" not in kwargs and func is not torch.Tensor.new_tensor:
            if not any(isinstance(a, torch.Tensor) and not tr.is_host(a) for a in args):
                tr.mark_host(out)  # made without a device: host memory on an accelerator machine
        return out


def _host_index(tr: HostTraffic, index) -> bool:
    """An index that torch copies to the device first: a Python list, a numpy array, a host tensor."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (list, np.ndarray)) or (isinstance(i, torch.Tensor) and tr.is_host(i)) for i in items)


def _meta_answer(func, args, kwargs):
    """What a meta value read / copy to the host returns so the checked code can go on: zeros."""
    if func is torch.ops.aten._local_scalar_dense.default:
        return False if args[0].dtype == torch.bool else 0 if not args[0].dtype.is_floating_point else 0.0
    if func is torch.ops.aten._to_copy.default:
        src = args[0]
        return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
    return args[0]  # copy_ into a host tensor: leave it as it is


class _TrafficDispatchMode(TorchDispatchMode):
    def __init__(self, traffic: HostTraffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tr = self.traffic
        kind, meta = None, False
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:
            src = args[0]
            if not tr.is_host(src):
                kind, meta = "sync", src.device.type == "meta"
        elif func is aten._to_copy.default and "device" in kwargs and kwargs["device"] is not None:
            src, dst = args[0].device, torch.device(kwargs["device"])
            if src.type != "cpu" and dst.type == "cpu":
                kind, meta = "d2h", src.type == "meta"
            elif src.type == "cpu" and dst.type != "cpu" and dst.type != "meta":
                kind = "h2d"
        elif func is aten.copy_.default:
            dst, src = args[0].device, args[1].device
            if dst.type == "cpu" and src.type != "cpu":
                kind, meta = "d2h", src.type == "meta"
            elif dst.type != "cpu" and src.type == "cpu" and dst.type != "meta":
                kind = "h2d"
        if kind is not None and not tr._counted_call:
            tr.record(kind, str(func))
        out = _meta_answer(func, args, kwargs) if meta else func(*args, **kwargs)
        if tr.simulated:  # computed from host tensors only: a host tensor
            inputs = _tensors(args, kwargs)
            if inputs and all(tr.is_host(t) for t in inputs):
                for t in _tensors(out):
                    tr.mark_host(t)
        return out


# ------------------------------------------------------------------------------------------ live bytes
class LiveBytes(TorchDispatchMode):
    """Peak of the bytes that storages allocated inside the ``with`` block hold at the same time.

    Every ATen op's outputs are inspected: a storage that is not one of the op's inputs' storages and is
    not already tracked is new (views and in-place results share an input's storage, so they are never
    counted twice; parameters and other pre-existing tensors are never counted). Each new storage is
    weakly referenced and counted until it is freed. Works on every device, ``meta`` included (a meta
    storage reports the bytes it would hold). ``scope`` as for ``HostTraffic`` (default: everything).

    ``peak``: the largest sum at any moment; ``live``: what is still alive (e.g. held for a later hook);
    ``largest``: the largest single storage.

    Example:
        >>> import torch
        >>> x = torch.ones(1000, device="meta")
        >>> with LiveBytes() as mem:
        ...     y = x * 2          # 4000 bytes
        ...     z = y.view(10, 100) # a view: no new bytes
        ...     del y, z
        ...     w = x + 1          # the first is freed: the peak stays 4000
        >>> mem.peak, mem.live
        (4000, 4000)
    """

    def __init__(self, scope: str | tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.scope = scope
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._tracked: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._tracked.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = set()
        for t in _tensors(args, kwargs):
            storage = _storage(t)
            if storage is not None:
                inputs.add(id(storage))
        new = []
        for t in _tensors(out):
            storage = _storage(t)
            if storage is None or id(storage) in inputs or id(storage) in self._tracked:
                continue
            new.append(storage)
            inputs.add(id(storage))
        if new and (self.scope is None or _scoped_frame(self.scope) is not None):
            for storage in new:
                nbytes = storage.nbytes()
                self._tracked[id(storage)] = nbytes
                weakref.finalize(storage, self._free, id(storage))
                self.live += nbytes
                self.largest = max(self.largest, nbytes)
            self.peak = max(self.peak, self.live)
        return out


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # subclasses without storage (DTensor wrappers)
        return None


def load_module(path: Path, source: str):
    """Write ``source`` to ``path`` and import it: code whose frames a ``scope`` can name (tests of scoping)."""
    import importlib.util

    path = Path(path)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
