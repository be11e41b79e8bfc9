"""``norm_input``: mean / rms / absmax / kurtosis of each normalization layer's input over the tick's
micro-batches; ``activation``: the same of chosen modules' *outputs* (``TickCallback(activations=...)``).

Observers exist only inside a tick's training batches: a patched norm layer (``patch_norms``) gets its
``tick_observer`` set, any other layer a forward pre-hook; both are removed when the tick closes and
while validation, test or predict run inside the tick's window (``pause``), so only training inputs count.

The values are **per rank**: each rank's own micro-batches (its local view of a sharded activation), like
``loss``; use ``TickCallback(ranks="all")`` to see every rank's.

``torch.compile``: a compiled graph does not run forward pre-hooks added after it was traced, so an
unpatched layer inside a compiled module would see nothing (NaN). Patched layers observe their own input
from inside their forward, which the compiler traces (it recompiles once when the observer is set); the
callback warns at fit start when unpatched layers sit inside a compiled module.
"""

from __future__ import annotations

from torch import Tensor, nn

from tick_lightning.collect.base import Collector, Tick
from tick_lightning.records import Block
from tick_lightning.stats import NORM_INPUT_STATS, NormInputAccumulator

__all__ = ["ActivationCollector", "NormInputCollector"]


def _pre_hook(observer):
    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            observer(args[0])

    return hook


def _output_hook(observer):
    def hook(module: nn.Module, args: tuple, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        out = getattr(out, "last_hidden_state", out)  # HF model outputs
        if isinstance(out, Tensor) and out.is_floating_point():
            observer(out)

    return hook


class NormInputCollector(Collector):
    states = ("norm_input",)

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self._acc: NormInputAccumulator | None = None
        self._hooks: list = []
        self._observed: list[nn.Module] = []
        self._active = False

    def open(self, tick: Tick) -> None:
        if not self.modules:
            return
        if self._acc is None:
            self._acc = NormInputAccumulator(len(self.modules), device=tick.device)
        else:
            self._acc.reset()
        self._active = True
        self._attach()

    def _attach(self) -> None:
        for i, (_, module) in enumerate(self.modules):
            observer = self._acc.observer(i)
            if self.states == ("activation",):
                self._hooks.append(module.register_forward_hook(_output_hook(observer)))
            elif hasattr(module, "tick_observer"):  # a patched norm layer observes its own input
                module.tick_observer = observer
                self._observed.append(module)
            else:
                self._hooks.append(module.register_forward_pre_hook(_pre_hook(observer)))

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        for module in self._observed:
            module.tick_observer = None
        self._hooks, self._observed = [], []

    def pause(self) -> None:
        self._detach()

    def resume(self) -> None:
        if self._active:
            self._attach()

    def blocks(self, tick: Tick) -> list[Block]:
        if not self._active:
            return []
        return [Block(self.states[0], tuple(n for n, _ in self.modules), NORM_INPUT_STATS, self._acc.values())]

    def close(self, tick: Tick) -> None:
        self._detach()
        self._active = False


class ActivationCollector(NormInputCollector):
    """``activation``: mean, RMS, absmax and kurtosis of each chosen module's output (the first tensor of a
    tuple output, ``last_hidden_state`` of a Hugging Face output), through forward hooks that exist only
    inside tick batches and not during validation, like ``norm_input``'s. Per rank, like ``loss``."""

    states = ("activation",)
