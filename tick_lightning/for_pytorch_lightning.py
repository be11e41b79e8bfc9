"""tick-lightning under the ``pytorch_lightning`` package name (the standalone package, ``import pytorch_lightning``).

``pytorch_lightning`` ships the same code as ``lightning.pytorch`` under other module names, so its Trainer
runs our callbacks' hooks unchanged (they only read ``trainer`` / ``pl_module`` attributes; the ``pl.Trainer``
annotations are never checked). What differs is the class identity: ``pytorch_lightning`` code tests
``isinstance(x, pytorch_lightning.Callback)`` (``Trainer(callbacks=cb)``, ``is_overridden`` without a
parent, its ``LightningCLI``'s ``list[Callback]`` type) and builds its own precision plugins. So each class
here is the library's class with that package's base class added: same hooks, same ``state_key`` (the class
name), so checkpoints of either package carry the same callback state.

    >>> import pytorch_lightning
    >>> from tick_lightning.for_pytorch_lightning import TickCallback
    >>> isinstance(TickCallback(), pytorch_lightning.Callback)
    True

The entry point group ``pytorch_lightning.callbacks_factory`` (which ``pytorch_lightning``'s Trainer reads,
``_load_external_callbacks`` in its callback connector) calls :func:`callbacks_from_environment` through
``tick_lightning.entry.pytorch_lightning_callbacks_factory``: the ``TICK_LIGHTNING*`` variables work there too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytorch_lightning
from pytorch_lightning.plugins.precision import Precision as _Precision

from tick_lightning import callback, plugin, precision

__all__ = ["EnvironmentTickCallback", "NormPatchPrecision", "PatchNormsFromEnvironment", "TickCallback",
           "callbacks_from_environment"]


class TickCallback(callback.TickCallback, pytorch_lightning.Callback):
    """:class:`tick_lightning.TickCallback` for a ``pytorch_lightning.Trainer``."""


class EnvironmentTickCallback(plugin.EnvironmentTickCallback, pytorch_lightning.Callback):
    """:class:`tick_lightning.plugin.EnvironmentTickCallback` for a ``pytorch_lightning.Trainer``."""


class NormPatchPrecision(precision.NormPatchPrecision, _Precision):
    """:class:`tick_lightning.NormPatchPrecision` wrapping and building ``pytorch_lightning``'s precision plugins."""

    PACKAGE = "pytorch_lightning"


class PatchNormsFromEnvironment(plugin.PatchNormsFromEnvironment, pytorch_lightning.Callback):
    """``TICK_LIGHTNING_PATCH_NORMS=1`` for a ``pytorch_lightning.Trainer``."""

    @staticmethod
    def precision_class() -> type:
        return NormPatchPrecision


def callbacks_from_environment(environ: Mapping[str, str] | None = None) -> list[pytorch_lightning.Callback]:
    """:func:`tick_lightning.plugin.callbacks_from_environment` with this package's classes."""
    return plugin.callbacks_from_environment(os.environ if environ is None else environ,
                                             tick_class=EnvironmentTickCallback, patch_class=PatchNormsFromEnvironment)
