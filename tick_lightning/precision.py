"""``NormPatchPrecision``: Lightning's own precision plugin, plus norm patching in ``convert_module``.

Every strategy calls ``precision_plugin.convert_module(model)`` in its ``setup``: after the
LightningModule's ``configure_model`` and before it moves the model to the device and wraps it
(DDP, DeepSpeed; ``ModelParallelStrategy`` calls it after the parallelization applied in
``configure_model``). That is where Lightning's ``TransformerEnginePrecision`` swaps layers, and where
this plugin calls :func:`tick_lightning.patch_norms` (in place, idempotent: a second fit or a
``validate`` on the same model patches nothing new).

Everything else is delegated, not re-implemented: the plugin holds the ``Precision`` Lightning would have
built for the same ``precision`` string (``MixedPrecision``, ``HalfPrecision``, ``DoublePrecision`` or the
``Precision`` of ``32-true``), or any plugin instance you pass, and forwards every ``Precision`` method
and attribute (``scaler``, ``device``, ...) to it.

Limits: strategies that demand their own plugin class by ``isinstance`` (FSDP1's ``FSDPPrecision``,
XLA) refuse it; ``ThroughputMonitor`` cannot see through it and counts FLOPs as fp32.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from tick_lightning import NormPatchPrecision
    >>> trainer = Trainer(plugins=[NormPatchPrecision("bf16-mixed")], max_steps=10)  # doctest: +SKIP

    LightningCLI: ``--trainer.plugins=tick_lightning.NormPatchPrecision --trainer.plugins.precision=bf16-mixed``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from tick_lightning.norms import NormPatchReport, patch_norms
from tick_lightning.norms.patch import KERNELS
from tick_lightning.select import Selector

__all__ = ["PRECISIONS", "NormPatchPrecision"]

#: the precision strings this plugin builds Lightning's own plugin for (pass a plugin instance for others)
PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


def lightning_precision(precision: str, device: str | None = None, package: str = "lightning.pytorch") -> Precision:
    """The plugin ``Trainer(precision=precision)`` builds for the default strategies.

    ``device`` only matters for the ``*-mixed`` precisions (the autocast device type): ``"cpu"``, ``"cuda"``
    or ``"mps"``; ``None`` means ``"cuda"`` when CUDA is available, else ``"cpu"``. ``package``:
    ``"pytorch_lightning"`` builds that package's classes (its Trainer's own).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"NormPatchPrecision precision={precision!r} is not supported; choose one of "
                         f"{', '.join(PRECISIONS)} or pass a Lightning Precision plugin instance.")
    plugins = importlib.import_module(f"{package}.plugins.precision")
    if precision.endswith("-mixed"):
        return plugins.MixedPrecision(precision, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision in ("16-true", "bf16-true"):
        return plugins.HalfPrecision(precision)
    return plugins.DoublePrecision() if precision == "64-true" else plugins.Precision()


class NormPatchPrecision(Precision):
    """A Lightning precision plugin that patches normalization layers once the model exists.

    Args:
        precision: a precision string (``"bf16-mixed"``, ``"16-mixed"``, ``"32-true"``, ``"bf16-true"``,
            ``"16-true"``, ``"64-true"``) or a Lightning ``Precision`` plugin instance to wrap.
        device: the autocast device of the ``*-mixed`` precisions (``"cpu"``, ``"cuda"``, ``"mps"``);
            default ``"cuda"`` when CUDA is available, else ``"cpu"``. Ignored for a plugin instance.
        select, kernel, stats, low_precision_output: passed to :func:`tick_lightning.patch_norms`.

    After the fit, ``report`` is the ``NormPatchReport`` of the patching. Under the ``pytorch_lightning``
    package, use ``tick_lightning.for_pytorch_lightning.NormPatchPrecision`` (that package's plugin classes).

    Example:
        >>> plugin = NormPatchPrecision("bf16-mixed", device="cpu")
        >>> type(plugin.wrapped).__name__, plugin.precision, plugin.device
        ('MixedPrecision', 'bf16-mixed', 'cpu')
        >>> model = plugin.convert_module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))
        >>> [entry.name for entry in plugin.report.patched]
        ['1']
    """

    #: the Lightning package whose plugins this one wraps and builds from a precision string
    PACKAGE = "lightning.pytorch"

    def __init__(
        self,
        precision: str | Precision = "32-true",
        device: str | None = None,
        select: Selector = None,
        kernel: str = "auto",
        stats: bool = True,
        low_precision_output: bool = False,
    ) -> None:
        if kernel not in KERNELS:  # patch_norms checks again; this fails at Trainer(...), not at fit
            raise ValueError(f"NormPatchPrecision kernel={kernel!r} is unknown; valid choices: {', '.join(KERNELS)}.")
        if isinstance(precision, NormPatchPrecision):
            raise TypeError("NormPatchPrecision would wrap another NormPatchPrecision; pass its precision instead.")
        base = importlib.import_module(f"{self.PACKAGE}.plugins.precision").Precision
        self._from_string = not isinstance(precision, base)
        self.wrapped = lightning_precision(precision, device, self.PACKAGE) if self._from_string else precision
        self.precision = self.wrapped.precision
        self.patch_kwargs = {"select": select, "kernel": kernel, "stats": stats,
                             "low_precision_output": low_precision_output}
        self.report: NormPatchReport | None = None

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Patch the norms of ``module`` in place (DDP ignores the return value), then let the wrapped plugin
        convert it (``HalfPrecision`` casts the patched layers' parameters like any others)."""
        report = patch_norms(module, **self.patch_kwargs)
        if self.report is None:  # keep the first report: a second call finds the layers already patched
            self.report = report
        return self.wrapped.convert_module(module)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes this object lacks: the wrapped plugin's scaler, device, dtype, ...
        if name == "wrapped":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        # what Lightning's errors print ("Received both precision=... and plugins=..."): the arguments that
        # rebuild this plugin, not object addresses; a plugin instance passed in is named by its class
        args = [] if self._from_string else [type(self.wrapped).__name__]
        args.append(f"precision={self.precision!r}")
        device = getattr(self.wrapped, "device", None)
        if self._from_string and device is not None:
            args.append(f"device={device!r}")
        defaults = inspect.signature(NormPatchPrecision.__init__).parameters
        args += [f"{k}={v!r}" for k, v in self.patch_kwargs.items() if v != defaults[k].default]
        return f"{type(self).__name__}({', '.join(args)})"


def _delegate(name: str):
    def method(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.wrapped, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Delegated to the wrapped plugin's ``{name}``."
    return method


# every method of Lightning's Precision interface, so that none silently falls back to the base class's
for _name in [n for n, _ in inspect.getmembers(Precision, inspect.isfunction)]:
    if not _name.startswith("__") and _name != "convert_module":
        setattr(NormPatchPrecision, _name, _delegate(_name))
del _name
