"""``TickConfig``: ``TickCallback``'s arguments as one typed, checked value.

Every argument is checked here, once, when the config is made (before any training), with one error line
that names the bad value and the valid choices; what the arguments imply (the states recorded, each
state's schedule, the dense series, the flight recorder's extras) is derived here too, so the callback
only reads it. The recipes' ``tick`` config group subclasses it (its fields are the callback's by
construction, with the recipes' own defaults).

The annotations are the ones jsonargparse reads (``LightningCLI``, ``TICK_LIGHTNING_CONFIG``, the recipes): each
argument with a rule of its own has a checked type (``Ticks``, ``StateNames``, ``RankPolicy``, ...) that runs the
same check while a command line or YAML is parsed, so a bad value is refused then with the same one line;
``Renorm`` entries are plain mappings of its fields. Rules between arguments are checked when the config is made.

Example:
    >>> cfg = TickConfig(ticks="0,every:50", states=["loss", "grad"], dense=["loss", "grad_norm", "update_norm"])
    >>> cfg.chosen_states, cfg.dense_series, cfg.flight_extras
    (('loss', 'grad'), ('loss', 'grad_norm', 'update_norm'), ('input_absmax', 'attn_logit'))
    >>> TickConfig(ranks="every")
    Traceback (most recent call last):
    ...
    tick_lightning.config.ConfigError: ranks='every' is not valid; choose one of ('zero', 'all').
"""

from __future__ import annotations

import os
import re
from collections import UserDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union

import typing_extensions
from jsonargparse.typing import register_type

from tick_lightning.collect.dense import DENSE_DEFAULT, DENSE_SERIES
from tick_lightning.collect.flight import FLIGHT_DEFAULT, FLIGHT_EXTRAS
from tick_lightning.guard.spec import Guard, GuardError
from tick_lightning.records import STATES
from tick_lightning.renorm.spec import Renorm, RenormError
from tick_lightning.schedule import ScheduleError, ScheduleSpec, TickSchedule
from tick_lightning.select import KINDS, Selector

__all__ = ["DEFAULT_STATES", "RANKS", "ConfigError", "TickConfig", "Ticks", "check_dirpath", "parse_error_line",
           "value_error"]

DEFAULT_STATES = tuple(s for s in STATES if s not in ("snapshot", "renorm", "weight_hist", "grad_hist", "activation"))
RANKS = ("zero", "all")


class ConfigError(ValueError):
    """A ``TickCallback`` argument that is not valid: one line naming the value and the valid choices."""


# -- the checks of single arguments: each takes what Python, a command line or YAML gives and returns it checked
def _schedule_text(value: Any) -> str:
    """A schedule as text, checked: ``[50, 100]`` and ``50`` become ``"50,100"`` and ``"50"``; a bad term raises the
    schedule's own one-line error."""
    if isinstance(value, (list, tuple)) and not any(isinstance(v, bool) for v in value):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TypeError(f"a tick schedule is a string such as 'every:100' or a list of steps, not {value!r}")
    TickSchedule.parse(value)
    return value


def _names(value: Any) -> bool:
    """Whether ``value`` is a name or a list of names (a string is a ``Sequence`` of strings too)."""
    return isinstance(value, str) or (isinstance(value, Sequence) and all(isinstance(v, str) for v in value))


def _state_names(value: Any) -> list[str]:
    if not _names(value):
        raise ConfigError(f"states={value!r} is not valid; pass a state name or a list of them: {', '.join(STATES)}.")
    names = [value] if isinstance(value, str) else list(value)
    unknown = [s for s in names if s not in STATES]
    if unknown:
        raise ConfigError(f"Unknown tick state(s) {unknown}; valid states: {', '.join(STATES)}.")
    return names


def _state_ticks(value: Mapping[str, Any]) -> dict[str, Any]:
    """The keys checked (from Python the values may be any ``ScheduleSpec``; ``TickConfig`` parses them)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"state_ticks={value!r} is not valid; pass a mapping of state name to schedule, such as "
                          "{weight: 'every:500'} (quoted on a command line: --tick.state_ticks='{weight: every:500}').")
    unknown = [s for s in value if s not in STATES]
    if unknown:
        raise ConfigError(f"state_ticks has unknown state(s) {unknown}; valid states: {', '.join(STATES)}.")
    return dict(value)


def _ranks(value: Any) -> str:
    if value not in RANKS:
        raise ConfigError(f"ranks={value!r} is not valid; choose one of {RANKS}.")
    return value


def _selector(name: str, value: Any) -> Any:
    """A selector's form (what it matches is known once the model is: ``TickCallback.check_selection``)."""
    if value is None or _names(value):
        return value
    raise ConfigError(f"{name}={value!r} is not valid; pass a glob over names or a kind ({', '.join(KINDS)}), a list "
                      "of them, or None.")


def _choices(name: str, value: Any, valid: Sequence[str]) -> tuple[str, ...] | None:
    """``True`` -> ``()`` (the defaults), ``False`` -> ``None`` (off), a list of names -> those, checked."""
    if isinstance(value, bool):
        return () if value else None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        unknown = [v for v in value if v not in valid]
        if unknown:
            raise ConfigError(f"{name}={list(value)} has unknown {name} entr{'y' if len(unknown) == 1 else 'ies'} "
                              f"{unknown}; valid: True, False or a list of {', '.join(valid)}.")
        return tuple(value)
    raise ConfigError(f"{name}={value!r} is not valid; pass True, False or a list of {', '.join(valid)}.")


def _named_list(name: str, value: Any, valid: Sequence[str]) -> tuple[str, ...]:
    """The list half of ``Union[<list type>, bool]``: first in the union, so that its error is the one jsonargparse
    chains as the cause (``parse_error_line``); a bool is left to the union's ``bool``."""
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is a bool")
    return _choices(name, value, valid)


#: The largest flight ring (steps) and dense buffer (rows): their host bookkeeping and device memory grow with them
#: (the ring: ``window x parameter tensors x 8`` bytes per series, 380 MB at 65,536 steps of a 723-tensor model).
MAX_FLIGHT_WINDOW = 16384
MAX_FLUSH_EVERY = 65536


def _positive_int(name: str, value: Any, minimum: int = 1, what: str = "steps", maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name}={value!r} is not valid; pass an integer {bound} ({what}).")
    return value


def _flag(name: str, value: Any) -> bool:
    """A bool argument: a string such as ``'no'`` is truthy in Python, so anything but a bool is refused."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not valid; pass True or False.")
    return value


def check_dirpath(dirpath: Any) -> str:
    """A ``dirpath`` that cannot become a directory fails now, naming the argument, not at the first write."""
    if not isinstance(dirpath, (str, os.PathLike)):
        raise ConfigError(f"dirpath={dirpath!r} is not valid; pass a directory path (a string or pathlib.Path), or "
                          "None.")
    if not str(dirpath).strip():
        raise ConfigError(f"dirpath={str(dirpath)!r} is empty; pass a directory for the records (made if missing), or "
                          "None for <trainer.log_dir>/ticks.")
    problem = dirpath_problem(dirpath)
    if problem is not None:
        raise ConfigError(f"dirpath={str(dirpath)!r} {problem}; pass a directory you can write to.")
    return str(dirpath)


def dirpath_problem(dirpath: str | os.PathLike) -> str | None:
    """Why ``dirpath`` cannot become a directory of records (``None``: it can). Creates nothing that stays: where a
    missing directory would be made, a temporary one is made in its nearest existing parent and removed."""
    import tempfile

    path = Path(dirpath)
    if path.exists():
        if not path.is_dir():
            return "is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {str(parent)!r} is a file"
    child = path.relative_to(parent).parts[0]
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {str(parent)!r} is not writable"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".tick-probe-"))
    except OSError:
        return f"cannot be created: {str(parent)!r} does not allow creating {child!r}"
    return None


def _integer(value: Any) -> Any:
    """A command line gives ``--tick.flight_window=1`` as the text ``"1"``."""
    return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else value


def _texts(values: Any) -> list[str]:
    return [str(v) for v in values]


def _parsed_type(name: str, base: type, check: Callable[[Any], Any], serializer: Callable[[Any], Any],
                 doc: str) -> type:
    """A ``base`` subclass that jsonargparse builds with ``check`` while a command line or YAML is parsed, so a bad
    value is refused then, with the check's one line and no traceback, instead of from inside ``TickCallback(...)``
    (in a plain ``LightningCLI``, a traceback of a hundred lines). Python callers pass plain values, which
    ``TickConfig`` runs through the same check."""
    cls = type(name, (base,), {"__doc__": doc, "__module__": __name__})
    register_type(cls, serializer=serializer, deserializer=lambda value: cls(check(value)))
    return cls


# `typing_extensions.TYPE_CHECKING`, spelled out: jsonargparse executes the `if TYPE_CHECKING:` blocks of a module when
# it resolves annotations (matching the bare name once any module it read imported it from typing: its list of names
# is a class attribute) and would then see the type checkers' aliases, not the checked classes
if typing_extensions.TYPE_CHECKING:  # what a type checker sees: what Python callers may pass
    Ticks = ScheduleSpec
    StateNames = Union[str, Sequence[str]]
    StateTicks = Mapping[str, ScheduleSpec]
    RankPolicy = str
    DenseSeries = FlightExtras = Sequence[str]
    FlushEvery = FlightWindow = int
    DirPath = Union[str, Path]
else:
    Ticks = _parsed_type("Ticks", str, _schedule_text, str, "A tick schedule (``\"0,50,every:25\"``) as command "
                         "lines and YAML give it; ``TickCallback(ticks=...)`` takes any ``ScheduleSpec`` from Python.")
    StateNames = _parsed_type("StateNames", list, _state_names, _texts, "States to record, by name.")
    # a UserDict: jsonargparse empties what a dict subclass's deserializer returns
    StateTicks = _parsed_type("StateTicks", UserDict, lambda value: {
        state: _schedule_text(spec) for state, spec in _state_ticks(value).items()},
        lambda value: {k: str(v) for k, v in value.items()}, "Schedules by state name.")
    RankPolicy = _parsed_type("RankPolicy", str, _ranks, str, f"Which ranks record: one of {RANKS}.")
    DenseSeries = _parsed_type("DenseSeries", list, lambda value: _named_list("dense", value, DENSE_SERIES), _texts,
                               f"Dense series by name: {', '.join(DENSE_SERIES)}.")
    FlightExtras = _parsed_type("FlightExtras", list, lambda value: _named_list("flight", value, FLIGHT_EXTRAS),
                                _texts, f"Flight recorder extras by name: {', '.join(FLIGHT_EXTRAS)}.")
    FlushEvery = _parsed_type("FlushEvery", int, lambda value: _positive_int(
        "dense_flush_every", _integer(value), maximum=MAX_FLUSH_EVERY), int,
        f"Steps between flushes of the dense buffer, 1 to {MAX_FLUSH_EVERY}.")
    FlightWindow = _parsed_type("FlightWindow", int, lambda value: _positive_int(
        "flight_window", _integer(value), minimum=2, what="steps held on the device", maximum=MAX_FLIGHT_WINDOW), int,
        f"Steps the flight recorder holds, 2 to {MAX_FLIGHT_WINDOW}.")
    DirPath = _parsed_type("DirPath", str, check_dirpath, str, "A directory for the records (made if missing).")


def _as_renorm(value: Any) -> Renorm:
    """A ``Renorm`` from its fields (``{target: linear, method: unit}``) or a ``class_path`` entry, checked at parse
    time like ``Ticks``; its own error (``Renorm method 'bogus' is unknown; valid methods: ...``) is the report."""
    if isinstance(value, Renorm):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"a renorm entry is a mapping of Renorm's fields such as {{target: linear, method: unit}}, "
                        f"not {value!r}")
    if "class_path" in value:
        if value["class_path"] not in ("tick_lightning.Renorm", "tick_lightning.renorm.Renorm",
                                       "tick_lightning.renorm.spec.Renorm", "Renorm"):
            raise ValueError(f"class_path {value['class_path']!r} is not tick_lightning.Renorm")
        value = value.get("init_args") or {}
    return Renorm(**dict(value))


def _renorm_fields(spec: Renorm) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}


register_type(Renorm, serializer=_renorm_fields, deserializer=_as_renorm)


def _as_guard(value: Any) -> Guard:
    """A ``Guard`` from its fields (``{mode: skip, z: 5}``), a mode name (``skip``) or a ``class_path`` entry,
    checked at parse time like ``Renorm``."""
    if isinstance(value, Guard):
        return value
    if isinstance(value, str):
        return Guard(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"a guard is a mode name or a mapping of Guard's fields such as {{mode: zclip, z: 3}}, "
                        f"not {value!r}")
    if "class_path" in value:
        if value["class_path"] not in ("tick_lightning.Guard", "tick_lightning.guard.Guard",
                                       "tick_lightning.guard.spec.Guard", "Guard"):
            raise ValueError(f"class_path {value['class_path']!r} is not tick_lightning.Guard")
        value = value.get("init_args") or {}
    unknown = [k for k in value if k not in {f.name for f in fields(Guard)}]
    if unknown:
        raise GuardError(f"Guard has no argument(s) {unknown}; valid: {', '.join(f.name for f in fields(Guard))}.")
    return Guard(**dict(value))


register_type(Guard, serializer=lambda g: g.arguments(), deserializer=_as_guard)


def value_error(error: BaseException) -> BaseException | None:
    """The error one of the checked types raised (a bad schedule, ``Renorm`` or argument value) in the chain of an
    error jsonargparse raised while parsing, or ``None`` (an unknown key, a wrong type)."""
    found = error.__cause__ or error.__context__
    while found is not None and not isinstance(found, (ScheduleError, RenormError, GuardError, ConfigError)):
        found = found.__cause__ or found.__context__
    return found


def parse_error_line(error: BaseException, group: str = "") -> str:
    """One line for an error jsonargparse raised while parsing a ``tick`` value.

    jsonargparse wraps the error a checked type raised (``Ticks``, ``Renorm``, the others above) in a union report
    of a dozen lines; that error names the bad value and the valid choices, so the line is the parser key (less the
    ``group.`` the caller parsed into) and that error, the key written once where the error starts with its name
    (``tick.ranks='every' is not valid; ...``). Any other error is its own message on one line.

    Example:
        >>> from jsonargparse import ArgumentParser
        >>> parser = ArgumentParser(exit_on_error=False)
        >>> _ = parser.add_argument("--ticks", type=Ticks)
        >>> try:
        ...     parser.parse_args(["--ticks=evry:5"])
        ... except Exception as err:
        ...     print(parse_error_line(err))
        ticks: Malformed tick schedule term 'evry:5' (did you mean 'every:5'?); valid terms: every:N, epoch, epoch:N, log:N, frac:F, nonfinite, spike:K, none, <step>.
    """
    cause = value_error(error)
    key = re.match(r'Parser key "([^"]+)"', str(error))
    if cause is None:
        return " ".join(str(error).split())
    if key is None:
        return str(cause)
    name = key.group(1)
    name = name[len(group) + 1:] if group and name.startswith(group + ".") else name
    leaf = name.rpartition(".")[2]
    return f"{name[:-len(leaf)]}{cause}" if str(cause).startswith(leaf + "=") else f"{name}: {cause}"


@dataclass
class TickConfig:
    """The arguments of ``TickCallback`` (see its docstring for each); checked and derived in ``__post_init__``."""

    ticks: Ticks = "every:100"
    states: Union[StateNames, None] = None
    state_ticks: Union[StateTicks, None] = None
    select: Selector = None
    norm_select: Selector = "norm"
    dirpath: Union[DirPath, None] = None
    patch_norms: bool = False
    renorm: Union[Sequence[Renorm], None] = None
    ranks: RankPolicy = "zero"
    log_to_loggers: bool = True
    log_select: Union[str, Sequence[str], None] = None
    activations: Selector = None
    update_on_host: bool = False
    reset_peak_memory: bool = False
    dense: Union[DenseSeries, bool] = True
    dense_flush_every: FlushEvery = 256
    flight: Union[FlightExtras, bool] = True
    flight_window: FlightWindow = 128
    guard: Union[Guard, None] = None

    # derived, read by the callback
    schedule: TickSchedule = field(init=False, repr=False)
    chosen_states: tuple[str, ...] = field(init=False, repr=False)
    state_schedules: dict = field(init=False, repr=False)
    dense_series: tuple[str, ...] = field(init=False, repr=False)
    flight_extras: Union[tuple[str, ...], None] = field(init=False, repr=False)  # None: the recorder is off

    def __post_init__(self) -> None:
        self.schedule = TickSchedule.parse(self.ticks)
        chosen = DEFAULT_STATES if self.states is None else tuple(_state_names(self.states))
        if self.states is not None and not chosen:
            raise ConfigError(f"states={self.states!r} records no tick state; pass state names (e.g. ['loss', 'grad']), "
                              "or None for the defaults; the dense series and flight recorder have arguments of their "
                              "own.")
        for name in ("patch_norms", "log_to_loggers", "update_on_host", "reset_peak_memory"):
            _flag(name, getattr(self, name))
        state_ticks = _state_ticks(self.state_ticks or {})
        _ranks(self.ranks)
        for name in ("select", "norm_select", "activations", "log_select"):
            _selector(name, getattr(self, name))
        if self.activations is not None and "activation" not in chosen:
            chosen = chosen + ("activation",)
        if "activation" in chosen and self.activations is None:
            raise ConfigError("states has 'activation' but activations=None; pass TickCallback(activations=...) "
                             "naming the modules whose outputs to record (globs or kinds, e.g. 'model.layers.?.mlp').")
        if self.guard is not None and not isinstance(self.guard, Guard):
            self.guard = _as_guard(self.guard)  # from Python: a mode name or a mapping of its fields
        if self.renorm and "renorm" not in chosen:
            chosen = chosen + ("renorm",)
        unrecorded = [s for s in state_ticks if s not in chosen]
        if unrecorded:
            raise ConfigError(f"state_ticks has schedule(s) for {unrecorded}, which are not recorded; states="
                             f"{list(chosen)}. Add them to states (or remove them from state_ticks).")
        if self.dirpath is not None:
            check_dirpath(self.dirpath)
        dense = _choices("dense", self.dense, DENSE_SERIES)
        self.dense_series = () if dense is None else DENSE_DEFAULT if dense == () else \
            tuple(d for d in DENSE_SERIES if d in dense)
        _positive_int("dense_flush_every", self.dense_flush_every, maximum=MAX_FLUSH_EVERY)
        _positive_int("flight_window", self.flight_window, minimum=2, what="steps held on the device",
                      maximum=MAX_FLIGHT_WINDOW)
        flight = _choices("flight", self.flight, FLIGHT_EXTRAS)
        flight = FLIGHT_DEFAULT if self.flight is True else flight
        if flight is not None and "grad_norm" not in self.dense_series:
            if self.flight is not True:  # asked for explicitly: say why it cannot run
                raise ConfigError(f"flight={self.flight!r} needs the dense grad_norm series (its spikes are the "
                                 f"flight recorder's events) but dense={self.dense!r}; pass dense=True or flight=False.")
            flight = None  # the default recorder steps aside with dense=False
        self.flight_extras = flight
        self.chosen_states = chosen
        self.state_schedules = {s: TickSchedule.parse(state_ticks.get(s, self.schedule)) for s in chosen}

    def arguments(self) -> dict[str, Any]:
        """The ``TickCallback`` keyword arguments this config holds (its init fields).

        Example:
            >>> TickConfig(ticks="every:10").arguments()["ticks"]
            'every:10'
        """
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @property
    def dense_capacity(self) -> int:
        """The dense buffer's rows: ``dense_flush_every``, at most half the flight ring while it records (a
        spike must be found while the ring still holds the steps before it)."""
        if self.flight_extras is None:
            return self.dense_flush_every
        return min(self.dense_flush_every, max(1, self.flight_window // 2))
