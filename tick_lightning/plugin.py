"""Ticks and norm patching in an unmodified Lightning script, switched on by environment variables.

``tick_lightning.entry.callbacks_factory`` (the registered entry point) hands ``os.environ`` to
:func:`callbacks_from_environment` when one of these variables is set:

- ``TICK_LIGHTNING``: ``1`` (or ``true``/``on``) records with ``TickCallback``'s default schedule, any other
  value is the tick schedule itself (``every:100``, ``0,50,every:25``, ``log:20``, ...); ``0``, ``false``,
  ``off`` or empty records nothing (and then the other variables are ignored).
- ``TICK_LIGHTNING_DIR``: the records' directory (``TickCallback(dirpath=...)``; default
  ``<trainer.log_dir>/ticks``).
- ``TICK_LIGHTNING_CONFIG``: YAML, inline or the path of a file, with any other ``TickCallback`` argument
  (``states``, ``state_ticks``, ``select``, ``norm_select``, ``patch_norms``, ``renorm`` as a list of
  ``Renorm`` fields such as ``{target: linear, method: unit}``, ``ranks``, ``log_to_loggers``), parsed by jsonargparse
  from ``TickCallback``'s own signature.
- ``TICK_LIGHTNING_PATCH_NORMS``: ``1`` wraps the Trainer's precision plugin in
  :class:`~tick_lightning.precision.NormPatchPrecision`, which patches every normalization layer in
  ``convert_module`` (after ``configure_model``, before the strategy wraps the model); works with or
  without ``TICK_LIGHTNING``.

Every value is checked at ``Trainer(...)``: a bad one raises :class:`PluginEnvironmentError`, one line
naming the variable, the value and the valid choices; uncaught, that line is all the program prints. What needs the model (``select`` patterns that
match nothing, renorm targets) is checked by ``TickCallback.setup``, still before the first step.

A Trainer that already holds a ``TickCallback`` (in ``callbacks=`` or from ``configure_callbacks``) keeps
it and gets no second one: the environment's callback steps aside in ``setup`` and says so in the log.

Example:
    >>> callbacks_from_environment({"TICK_LIGHTNING": "every:50", "TICK_LIGHTNING_DIR": "/tmp/ticks"})
    [EnvironmentTickCallback(ticks='every:50', dirpath='/tmp/ticks')]
    >>> callbacks_from_environment({"TICK_LIGHTNING": "every:x"})
    Traceback (most recent call last):
    ...
    tick_lightning.plugin.PluginEnvironmentError: TICK_LIGHTNING='every:x' is not valid: ...
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from tick_lightning.callback import TickCallback
from tick_lightning.config import parse_error_line, value_error
from tick_lightning.schedule import KEYWORDS as SCHEDULE_TERMS
from tick_lightning.schedule import TickSchedule

__all__ = ["EnvironmentTickCallback", "PatchNormsFromEnvironment", "PluginEnvironmentError",
           "callbacks_from_environment"]

SCHEDULE_VAR, DIR_VAR, CONFIG_VAR, PATCH_VAR = ("TICK_LIGHTNING", "TICK_LIGHTNING_DIR", "TICK_LIGHTNING_CONFIG",
                                                "TICK_LIGHTNING_PATCH_NORMS")
ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
#: TickCallback arguments with a variable of their own; the config may not repeat them
_OWN_VARIABLE = {"ticks": SCHEDULE_VAR, "dirpath": DIR_VAR}


class PluginEnvironmentError(SystemExit, ValueError):
    """A ``TICK_LIGHTNING*`` environment variable with a value that cannot be used.

    The mistake is in the shell's environment, not in any line of the script, so a traceback through the
    script's ``Trainer(...)`` and Lightning's callback connector (~20 lines) points at the wrong place. Like
    a bad command-line value under argparse or ``LightningCLI``, an uncaught one ends the program with its
    message alone, one line on stderr, exit status 1: ``SystemExit`` is what Python prints that way. It is a
    ``ValueError`` too (and so an ``Exception``): code that calls ``Trainer(...)`` in ``try`` still catches it,
    and a notebook shows the one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)  # SystemExit(message): Python prints the message, exits with status 1


def _one_line(error: BaseException) -> str:
    """An error's message as a clause of ours: one line, its final full stop dropped (we append after it)."""
    return " ".join(str(error).split()).rstrip(".")


def _switch(environ: Mapping[str, str], name: str) -> bool | None:
    """``True``/``False`` for an on/off variable, ``None`` when it is unset."""
    if name not in environ:
        return None
    value = environ[name].strip().lower()
    if value not in ON + OFF:
        raise PluginEnvironmentError(f"{name}={environ[name]!r} is not valid; use one of "
                                     f"{', '.join(v for v in ON + OFF if v)} (or empty for off).")
    return value in ON


def callbacks_from_environment(environ: Mapping[str, str], *, tick_class: type | None = None,
                               patch_class: type | None = None) -> list[Callback]:
    """The callbacks ``environ`` asks for (see the module docstring); ``[]`` when it asks for none.

    ``tick_class`` / ``patch_class``: the classes built (default ``EnvironmentTickCallback`` and
    ``PatchNormsFromEnvironment``; ``tick_lightning.for_pytorch_lightning`` passes that package's subclasses).

    Raises:
        PluginEnvironmentError: a variable holds a value that cannot be used.
    """
    tick_class = tick_class or EnvironmentTickCallback
    patch_class = patch_class or PatchNormsFromEnvironment
    callbacks: list[Callback] = []
    if _switch(environ, PATCH_VAR):
        callbacks.append(patch_class())
    schedule = environ.get(SCHEDULE_VAR)
    if schedule is None:
        stray = [name for name in (DIR_VAR, CONFIG_VAR) if name in environ]
        if stray:
            raise PluginEnvironmentError(f"{stray[0]} is set but {SCHEDULE_VAR} is not; set {SCHEDULE_VAR}=1 "
                                         f"(default schedule) or a schedule such as every:100 to record ticks.")
        return callbacks
    if schedule and not schedule.strip():
        raise PluginEnvironmentError(f"{SCHEDULE_VAR}={schedule!r} is not valid: a blank value; set {SCHEDULE_VAR}=1 "
                                     f"(the default schedule), 0 (off) or a schedule such as every:100.")
    if schedule.strip().lower() in OFF:
        return callbacks
    kwargs = _config(environ[CONFIG_VAR]) if CONFIG_VAR in environ else {}
    for key, name in _OWN_VARIABLE.items():
        if key in kwargs and name in environ and not (name == SCHEDULE_VAR and schedule.strip().lower() in ON):
            raise PluginEnvironmentError(f"{CONFIG_VAR} sets {key!r} and so does {name}={environ[name]!r}; "
                                         f"give it in one place.")
    if schedule.strip().lower() not in ON:
        try:
            TickSchedule.parse(schedule)
        except ValueError as err:
            # the schedule's sentence, its full stop dropped, then the valid terms unless it named them
            why = _one_line(err)
            terms = "" if "valid terms:" in why else f"; valid terms: {', '.join(SCHEDULE_TERMS)}"
            raise PluginEnvironmentError(f"{SCHEDULE_VAR}={schedule!r} is not valid: {why}{terms} "
                                         f"({SCHEDULE_VAR}=1 means the default schedule, 0 means off).") from None
        kwargs["ticks"] = schedule
    if DIR_VAR in environ:
        if not environ[DIR_VAR].strip():
            raise PluginEnvironmentError(f"{DIR_VAR}={environ[DIR_VAR]!r} is not valid; give a directory path "
                                         f"or unset it for <trainer.log_dir>/ticks.")
        from tick_lightning.config import dirpath_problem

        problem = dirpath_problem(environ[DIR_VAR])
        if problem is not None:
            problem = problem.removeprefix("cannot be created: ")
            raise PluginEnvironmentError(f"{DIR_VAR}={environ[DIR_VAR]!r} cannot hold the records: {problem}; give a "
                                         f"directory you can write to.")
        kwargs["dirpath"] = environ[DIR_VAR]
    try:
        callbacks.append(tick_class(**kwargs))
    except (TypeError, ValueError) as err:
        raise PluginEnvironmentError(f"{CONFIG_VAR}={environ.get(CONFIG_VAR, '')!r} is not valid: "
                                     f"{_one_line(err)}.") from None
    return callbacks


def _config(value: str) -> dict[str, Any]:
    """``TICK_LIGHTNING_CONFIG`` (inline YAML or a file) as ``TickCallback`` keyword arguments.

    jsonargparse checks names and types against ``TickCallback``'s signature and builds schedules and ``Renorm``
    entries as it parses (``tick_lightning.config``); the other values are validated by ``TickCallback.__init__``.
    """
    import yaml
    from jsonargparse import ArgumentError, ArgumentParser

    valid = [n for n in inspect.signature(TickCallback.__init__).parameters if n != "self"]

    def refuse(why: str, keys: bool = True) -> PluginEnvironmentError:
        return PluginEnvironmentError(f"{CONFIG_VAR}={value!r} is not valid: {why}"
                                      + (f"; valid keys: {', '.join(valid)}." if keys else "."))

    path = Path(value)
    looks_like_file = "\n" not in value and ":" not in value and "{" not in value and \
        (value.strip().endswith((".yaml", ".yml", ".json")) or "/" in value)
    if looks_like_file and not path.is_file():
        raise PluginEnvironmentError(f"{CONFIG_VAR}={value!r} names a file that does not exist; give an existing YAML "
                                     "file or inline YAML such as '{states: [loss, grad]}'.")
    try:
        text = path.read_text(encoding="utf-8") if value.strip() and path.is_file() else value
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as err:
        raise refuse(_one_line(err)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise refuse(f"expected a mapping of TickCallback arguments, got {type(data).__name__}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TickCallback, "tick", instantiate=False)
    try:  # Ticks and Renorm values are checked and built while they are parsed (tick_lightning.config)
        parsed = parser.parse_object({"tick": data}).tick
    except (ArgumentError, TypeError, ValueError) as err:
        # a bad value names its own choices; anything else (an unknown key, a wrong type) lists the keys
        raise refuse(parse_error_line(err, group="tick").rstrip("."), keys=value_error(err) is None) from None
    return {key: parsed[key] for key in data}


class EnvironmentTickCallback(TickCallback):
    """The ``TickCallback`` made from ``TICK_LIGHTNING*``; steps aside when the Trainer has another one.

    A subclass (not a plain ``TickCallback``) so that its ``state_key`` differs from a user's callback with
    the same arguments: Lightning refuses two stateful callbacks with one key at ``Trainer(...)``, before
    ``setup`` could resolve the duplicate.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        keeper = _kept_tick_callback(trainer.callbacks)
        if keeper is not self:
            # a new list: Lightning is iterating over the old one to call this very hook
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self]
            rank_zero_info(f"tick_lightning: the Trainer already has {type(keeper).__name__}; {SCHEDULE_VAR} "
                           f"adds no second one.")
            return
        super().setup(trainer, pl_module, stage)

    def _resolve(self, pl_module: pl.LightningModule) -> None:
        # the selectors and Renorm targets come from TICK_LIGHTNING_CONFIG (the defaults fit any model): one that
        # fits no part of this model is the variable's mistake, said as its one line, before anything changes
        try:
            self.check_selection(pl_module)
        except ValueError as err:
            why = _one_line(err)
            raise PluginEnvironmentError(f"{CONFIG_VAR} does not fit this model: {why}"
                                         + ("" if why.endswith("?") else ".")) from None
        super()._resolve(pl_module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ticks={str(self.schedule)!r}, dirpath={self.dirpath!r})"


def _kept_tick_callback(callbacks: list[Callback]) -> TickCallback | None:
    """The user's first ``TickCallback`` if there is one, else the first one from the environment."""
    ticks = [cb for cb in callbacks if isinstance(cb, TickCallback)]
    users = [cb for cb in ticks if not isinstance(cb, EnvironmentTickCallback)]
    return (users or ticks or [None])[0]


class PatchNormsFromEnvironment(Callback):
    """``TICK_LIGHTNING_PATCH_NORMS=1``: wrap the Trainer's precision plugin in ``NormPatchPrecision``.

    ``setup`` runs before ``configure_model`` and before the strategy's ``setup`` calls
    ``precision_plugin.convert_module``, so the wrapped plugin patches the finished, still unwrapped model.
    """

    @staticmethod
    def precision_class() -> type:
        """The plugin class that wraps the Trainer's (that of the Trainer's Lightning package)."""
        from tick_lightning.precision import NormPatchPrecision

        return NormPatchPrecision

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        NormPatchPrecision = self.precision_class()
        plugin = trainer.strategy.precision_plugin
        if isinstance(plugin, NormPatchPrecision):
            return  # the script passed one itself, or a previous fit of this Trainer wrapped it
        try:
            trainer.strategy.precision_plugin = NormPatchPrecision(plugin)
        except TypeError as err:  # strategies that insist on their own plugin class (FSDP1, XLA)
            raise PluginEnvironmentError(f"{PATCH_VAR}=1 cannot wrap {type(plugin).__name__} of "
                                         f"{type(trainer.strategy).__name__}: {_one_line(err)}.") from None
        rank_zero_info(f"tick_lightning: {PATCH_VAR}=1 wraps {type(plugin).__name__} in NormPatchPrecision.")
