"""The entry point Lightning calls at every ``Trainer(...)``: ticks and norm patching from the environment.

Registered in ``pyproject.toml`` under ``lightning.pytorch.callbacks_factory``; Lightning 2.x calls
``callbacks_factory()`` with no arguments while it builds each Trainer's callback list
(``_load_external_callbacks`` in ``lightning.fabric.utilities.registry``) and appends what it returns.
The standalone ``pytorch_lightning`` package reads its own group, ``pytorch_lightning.callbacks_factory``,
where ``pytorch_lightning_callbacks_factory`` is registered. A new entry point reaches an installed
package only when it is reinstalled (``make install`` does, whenever pyproject.toml changed).

This module stays tiny on purpose: with none of the variables set it returns ``[]`` having imported
nothing but ``os``, so an installed tick-lightning costs nothing measurable at Trainer construction.
Everything else (reading the variables, ``TickCallback``, jsonargparse) lives in ``tick_lightning.plugin``
and is imported only when a variable is set.

Example:
    >>> import os
    >>> "TICK_LIGHTNING" in os.environ or callbacks_factory()
    []
"""

from __future__ import annotations

import os

__all__ = ["ENV_VARIABLES", "callbacks_factory", "pytorch_lightning_callbacks_factory"]

#: the variables that switch the plugin on (see ``tick_lightning.plugin`` for what each means)
ENV_VARIABLES = ("TICK_LIGHTNING", "TICK_LIGHTNING_DIR", "TICK_LIGHTNING_CONFIG", "TICK_LIGHTNING_PATCH_NORMS")


def callbacks_factory() -> list:
    """The callbacks the environment asks for: ``[]`` when none of ``ENV_VARIABLES`` is set."""
    if not any(name in os.environ for name in ENV_VARIABLES):
        return []
    from tick_lightning.plugin import callbacks_from_environment

    return callbacks_from_environment(os.environ)


def pytorch_lightning_callbacks_factory() -> list:
    """The same for a ``pytorch_lightning.Trainer`` (group ``pytorch_lightning.callbacks_factory``): callbacks
    that are ``pytorch_lightning.Callback`` instances (``tick_lightning.for_pytorch_lightning``)."""
    if not any(name in os.environ for name in ENV_VARIABLES):
        return []
    from tick_lightning.for_pytorch_lightning import callbacks_from_environment

    return callbacks_from_environment(os.environ)
