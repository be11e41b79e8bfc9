"""``TickConfig``: ``TickCallback``'s arguments as one typed, checked value.

Every argument is checked here, once, when the config is made (before any training), with one error line
that names the bad value and the valid choices; what the arguments imply (the states recorded, each
state's schedule, the dense series, the flight recorder's extras) is derived here too, so the callback
only reads it. The recipes' ``tick`` config group subclasses it (its fields are the callback's by
construction, with the recipes' own defaults).

Example:
    >>> cfg = TickConfig(ticks="0,every:50", states=["loss", "grad"], dense=["loss", "grad_norm", "update_norm"])
    >>> cfg.chosen_states, cfg.dense_series, cfg.flight_extras
    (('loss', 'grad'), ('loss', 'grad_norm', 'update_norm'), ())
    >>> TickConfig(ranks="every")
    Traceback (most recent call last):
    ...
    ValueError: ranks='every' is not valid; choose one of ('zero', 'all').
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from tick_lightning.collect.dense import DENSE_DEFAULT, DENSE_SERIES
from tick_lightning.collect.flight import FLIGHT_EXTRAS
from tick_lightning.records import STATES
from tick_lightning.schedule import ScheduleSpec, TickSchedule
from tick_lightning.select import Selector

__all__ = ["DEFAULT_STATES", "RANKS", "TickConfig", "check_dirpath"]

DEFAULT_STATES = tuple(s for s in STATES if s not in ("snapshot", "renorm", "weight_hist", "grad_hist", "activation"))
RANKS = ("zero", "all")


def check_dirpath(dirpath: str) -> None:
    """A ``dirpath`` that cannot become a directory fails now, naming the argument, not at the first write."""
    path = Path(dirpath)
    if path.exists() and not path.is_dir():
        raise ValueError(f"dirpath={dirpath!r} is a file; TickCallback needs a directory for its records "
                         "(pass a new or existing directory).")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"dirpath={dirpath!r} cannot be created: {str(parent)!r} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"dirpath={dirpath!r} is not writable ({str(parent)!r} does not allow writing); "
                         "pass a directory you can write to.")


def _choices(name: str, value: Any, valid: Sequence[str]) -> tuple[str, ...] | None:
    """``True`` -> ``()`` (the defaults), ``False`` -> ``None`` (off), a list of names -> those, checked."""
    if isinstance(value, bool):
        return () if value else None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        unknown = [v for v in value if v not in valid]
        if unknown:
            raise ValueError(f"{name}={list(value)} has unknown {name} entr{'y' if len(unknown) == 1 else 'ies'} "
                             f"{unknown}; valid: True, False or a list of {', '.join(valid)}.")
        return tuple(value)
    raise ValueError(f"{name}={value!r} is not valid; pass True, False or a list of {', '.join(valid)}.")


def _positive_int(name: str, value: Any, minimum: int = 1, what: str = "steps") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; pass an integer >= {minimum} ({what}).")


@dataclass
class TickConfig:
    """The arguments of ``TickCallback`` (see its docstring for each); checked and derived in ``__post_init__``."""

    ticks: ScheduleSpec = "every:100"
    states: Union[Sequence[str], None] = None
    state_ticks: Union[Mapping[str, ScheduleSpec], None] = None
    select: Selector = None
    norm_select: Selector = "norm"
    dirpath: Union[str, Path, None] = None
    patch_norms: bool = False
    renorm: Union[Sequence[Any], None] = None
    ranks: str = "zero"
    log_to_loggers: bool = True
    log_select: Union[str, Sequence[str], None] = None
    activations: Selector = None
    update_on_host: bool = False
    reset_peak_memory: bool = False
    dense: Union[bool, Sequence[str]] = True
    dense_flush_every: int = 256
    flight: Union[bool, Sequence[str]] = True
    flight_window: int = 128

    # derived, read by the callback
    schedule: TickSchedule = field(init=False, repr=False)
    chosen_states: tuple[str, ...] = field(init=False, repr=False)
    state_schedules: dict = field(init=False, repr=False)
    dense_series: tuple[str, ...] = field(init=False, repr=False)
    flight_extras: Union[tuple[str, ...], None] = field(init=False, repr=False)  # None: the recorder is off

    def __post_init__(self) -> None:
        self.schedule = TickSchedule.parse(self.ticks)
        states = self.states
        chosen = tuple(DEFAULT_STATES if states is None else ([states] if isinstance(states, str) else states))
        unknown = [s for s in chosen if s not in STATES]
        if unknown:
            raise ValueError(f"Unknown tick state(s) {unknown}; valid states: {', '.join(STATES)}.")
        state_ticks = dict(self.state_ticks or {})
        unknown = [s for s in state_ticks if s not in STATES]
        if unknown:
            raise ValueError(f"state_ticks has unknown state(s) {unknown}; valid states: {', '.join(STATES)}.")
        if self.ranks not in RANKS:
            raise ValueError(f"ranks={self.ranks!r} is not valid; choose one of {RANKS}.")
        if self.activations is not None and "activation" not in chosen:
            chosen = chosen + ("activation",)
        if "activation" in chosen and self.activations is None:
            raise ValueError("states has 'activation' but activations=None; pass TickCallback(activations=...) "
                             "naming the modules whose outputs to record (globs or kinds, e.g. 'model.layers.?.mlp').")
        if self.renorm and "renorm" not in chosen:
            chosen = chosen + ("renorm",)
        unrecorded = [s for s in state_ticks if s not in chosen]
        if unrecorded:
            raise ValueError(f"state_ticks has schedule(s) for {unrecorded}, which are not recorded; states="
                             f"{list(chosen)}. Add them to states (or remove them from state_ticks).")
        if self.dirpath is not None:
            check_dirpath(str(self.dirpath))
        dense = _choices("dense", self.dense, DENSE_SERIES)
        self.dense_series = () if dense is None else DENSE_DEFAULT if dense == () else \
            tuple(d for d in DENSE_SERIES if d in dense)
        _positive_int("dense_flush_every", self.dense_flush_every)
        _positive_int("flight_window", self.flight_window, minimum=2, what="steps held on the device")
        flight = _choices("flight", self.flight, FLIGHT_EXTRAS)
        if flight is not None and "grad_norm" not in self.dense_series:
            if self.flight is not True:  # asked for explicitly: say why it cannot run
                raise ValueError(f"flight={self.flight!r} needs the dense grad_norm series (its spikes are the "
                                 f"flight recorder's events) but dense={self.dense!r}; pass dense=True or flight=False.")
            flight = None  # the default recorder steps aside with dense=False
        self.flight_extras = flight
        self.chosen_states = chosen
        self.state_schedules = {s: TickSchedule.parse(state_ticks.get(s, self.schedule)) for s in chosen}

    @property
    def dense_capacity(self) -> int:
        """The dense buffer's rows: ``dense_flush_every``, at most half the flight ring while it records (a
        spike must be found while the ring still holds the steps before it)."""
        if self.flight_extras is None:
            return self.dense_flush_every
        return min(self.dense_flush_every, max(1, self.flight_window // 2))
