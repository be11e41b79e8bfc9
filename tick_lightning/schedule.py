"""Tick schedules: parse a specification and decide, from integers alone, whether a step is a tick.

Pure module (no Lightning, no torch): every decision is a function of ``(step, epoch, total_steps)``
so it is identical on every rank and after a resume.

Grammar (terms joined by commas; whitespace ignored)::

    50            explicit optimizer step (``trainer.global_step``), integer >= 0
    every:100     every 100 optimizer steps (steps 0, 100, 200, ...)
    epoch         end of every training epoch;  epoch:2  end of every 2nd epoch
    log:20        20 log-spaced steps over the run's total steps, dense early (needs a known total)
    frac:0.25     the step at that fraction of the run, fraction in (0, 1] (needs a known total)
    nonfinite     any step whose loss or gradients are not finite
    spike:8       the 8 optimizer steps after a loss / gradient-norm spike is detected (see below)
    none          nothing (an empty schedule)

A Python list of ints (``[50, 100]``) is the same as ``"50,100"``.

``spike:K`` reacts to the dense series (every step's loss and gradient norm, kept on the device): a
spike is detected when that buffer reaches the host -- at the next tick, or every
``TickCallback(dense_flush_every=N)`` steps -- so the K deep ticks start at most ``N`` steps after the
spike itself (never a host read per step). ``is_spike_tick(step, detected_at)`` is the decision.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Union

__all__ = ["ScheduleError", "ScheduleSpec", "TickSchedule"]

ScheduleSpec = Union[str, int, Sequence[int | str], "TickSchedule", None]

KEYWORDS = ("every:N", "epoch", "epoch:N", "log:N", "frac:F", "nonfinite", "spike:K", "none", "<step>")
# Every parse error is one sentence that names the bad term and ends in "." (callers may strip it and append):
# the ones that cannot guess what was meant end with the valid terms.
_VALID_TERMS = f"valid terms: {', '.join(KEYWORDS)}"


class ScheduleError(ValueError):
    """A tick schedule that cannot be parsed or resolved."""


_HEADS = ("every", "epoch", "log", "frac", "nonfinite", "spike", "none")


def _did_you_mean(term: str) -> str:
    """`` (did you mean 'every:5'?)`` for a misspelt keyword such as ``evry:5``, else ``""``."""
    key, sep, arg = term.partition(":")
    close = difflib.get_close_matches(key.lower(), _HEADS, n=1, cutoff=0.6)
    return f" (did you mean {close[0] + sep + arg!r}?)" if close and close[0] != key.lower() else ""


def _parse_positive_int(value: str, term: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ScheduleError(
            f"Tick schedule term {term!r}: {value!r} is not an integer; expected a positive integer such as "
            f"'{term.split(':')[0]}:10'."
        ) from None
    if number <= 0:
        raise ScheduleError(f"Tick schedule term {term!r}: {number} must be a positive integer.")
    return number


def _parse_step(value: int | str) -> int:
    if isinstance(value, bool) or (not isinstance(value, (int, str))):
        raise ScheduleError(
            f"Tick step {value!r} is not an integer; steps are optimizer steps (trainer.global_step) >= 0."
        )
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ScheduleError(
                f"Unknown tick schedule term {value!r}{_did_you_mean(value)}; {_VALID_TERMS} "
                "(for example '0,50,100,every:25')."
            ) from None
    if value < 0:
        raise ScheduleError(f"Tick step {value} is negative; steps are optimizer steps (trainer.global_step) >= 0.")
    return value


def log_spaced_steps(count: int, total_steps: int) -> tuple[int, ...]:
    """``count`` distinct steps in ``[0, total_steps)`` spaced evenly in log(step + 1), dense early.

    Always includes step 0 and the last step ``total_steps - 1``; returns every step when
    ``count >= total_steps``.
    """
    if total_steps <= 0:
        return ()
    want = min(count, total_steps)
    if want == 1:
        return (0,)
    # Rounding log-spaced points collapses duplicates at the dense start; widen until we have enough.
    points = want
    while True:
        ratio = total_steps ** (1.0 / (points - 1))
        steps = sorted({min(total_steps, round(ratio**i)) - 1 for i in range(points)})
        if len(steps) >= want or points > 64 * want:
            break
        points += 1
    if len(steps) > want:  # keep the first and last, thin the middle evenly
        idx = [round(i * (len(steps) - 1) / (want - 1)) for i in range(want)]
        steps = [steps[i] for i in idx]
    return tuple(steps)


@dataclass(frozen=True)
class TickSchedule:
    """A parsed tick schedule.

    Example:
        >>> s = TickSchedule.parse("0,50,every:25,frac:0.5").bind(total_steps=200)
        >>> [step for step in range(200) if s.is_step_tick(step)][:5]
        [0, 25, 50, 75, 100]
        >>> s.epoch_every, s.nonfinite
        (0, False)
    """

    steps: frozenset = frozenset()
    every: tuple = ()
    log_counts: tuple = ()
    fractions: tuple = ()
    epoch_every: int = 0
    nonfinite: bool = False
    spike_steps: int = 0
    total_steps: int | None = None
    resolved_steps: frozenset = field(default=frozenset(), compare=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, spec: ScheduleSpec) -> TickSchedule:
        """Parse a string, an int, a list of ints/terms, ``None`` (empty) or an existing schedule."""
        if isinstance(spec, TickSchedule):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, bool):
            raise ScheduleError(f"Tick schedule {spec!r} is a bool; pass a string such as 'every:100' or a list of steps.")
        if isinstance(spec, int):
            terms: Iterable[int | str] = [spec]
        elif isinstance(spec, str):
            terms = [t.strip() for t in spec.split(",")]
            if spec.strip() == "":
                raise ScheduleError("Tick schedule '' is empty; use 'none' for no ticks, or a schedule such as 'every:100'.")
        elif isinstance(spec, Sequence):
            terms = list(spec)
        else:
            raise ScheduleError(
                f"Tick schedule {spec!r} of type {type(spec).__name__} is not supported; pass a string such as "
                "'0,50,every:100', a list of steps, or None."
            )
        steps: set[int] = set()
        every: list[int] = []
        log_counts: list[int] = []
        fractions: list[float] = []
        epoch_every = 0
        nonfinite = False
        spike_steps = 0
        for term in terms:
            if isinstance(term, str):
                term = term.strip()
                if term == "":
                    raise ScheduleError(f"Tick schedule {spec!r} has an empty term (two commas in a row?).")
                key, _, arg = term.partition(":")
                key = key.lower()
                if key == "every":
                    every.append(_parse_positive_int(arg, term))
                    continue
                if key == "log":
                    log_counts.append(_parse_positive_int(arg, term))
                    continue
                if key == "frac":
                    try:
                        frac = float(arg)
                    except ValueError:
                        raise ScheduleError(f"Tick schedule term {term!r}: {arg!r} is not a number in (0, 1].") from None
                    if not (0.0 < frac <= 1.0) or math.isnan(frac):
                        raise ScheduleError(f"Tick schedule term {term!r}: fraction {frac} is outside (0, 1].")
                    fractions.append(frac)
                    continue
                if key == "spike":
                    spike_steps = max(spike_steps, _parse_positive_int(arg, term))
                    continue
                if key == "epoch":
                    epoch_every = _parse_positive_int(arg, term) if arg else 1
                    continue
                if key == "nonfinite" and not arg:
                    nonfinite = True
                    continue
                if key == "none" and not arg:
                    continue
                if key in ("every", "log", "frac", "epoch", "nonfinite", "spike", "none") or arg:
                    raise ScheduleError(f"Malformed tick schedule term {term!r}{_did_you_mean(term)}; {_VALID_TERMS}.")
            steps.add(_parse_step(term))
        return cls(
            steps=frozenset(steps),
            every=tuple(sorted(set(every))),
            log_counts=tuple(sorted(set(log_counts))),
            fractions=tuple(sorted(set(fractions))),
            epoch_every=epoch_every,
            nonfinite=nonfinite,
            spike_steps=spike_steps,
        )

    # ---------------------------------------------------------------- resolving
    @property
    def needs_total(self) -> bool:
        """True when the schedule has ``log:`` or ``frac:`` terms, which need the run's total steps."""
        return bool(self.log_counts or self.fractions)

    @property
    def is_empty(self) -> bool:
        return not (self.steps or self.every or self.log_counts or self.fractions or self.epoch_every or self.nonfinite
                    or self.spike_steps)

    def bind(self, total_steps: float | None) -> TickSchedule:
        """Resolve ``log:``/``frac:`` terms against the run's total optimizer steps.

        ``total_steps`` is typically ``trainer.estimated_stepping_batches``; ``None`` or ``inf`` means unknown,
        which is an error only when the schedule needs it.
        """
        known = total_steps is not None and not (isinstance(total_steps, float) and math.isinf(total_steps))
        if self.needs_total and not known:
            terms = [f"log:{n}" for n in self.log_counts] + [f"frac:{f}" for f in self.fractions]
            raise ScheduleError(
                f"Tick schedule terms {terms} need the run's total number of steps, which is unknown "
                "(set Trainer(max_steps=...) or max_epochs with a sized dataloader), or use 'every:N' / explicit steps."
            )
        if not known:
            return replace(self, total_steps=None, resolved_steps=self.steps)
        total = int(total_steps)
        extra: set[int] = set()
        for count in self.log_counts:
            extra.update(log_spaced_steps(count, total))
        for frac in self.fractions:
            extra.add(max(0, min(total - 1, math.floor(frac * total))))
        return replace(self, total_steps=total, resolved_steps=frozenset(self.steps | extra))

    def including(self, steps: Iterable[int]) -> TickSchedule:
        """This schedule with ``steps`` as ticks too (the fit's last step: ``TickCallback`` always records it); an
        empty schedule (``none``) stays empty.

        Example:
            >>> TickSchedule.parse("every:7").including([9]).ticks_between(0, 10)
            [0, 7, 9]
        """
        if self.is_empty:
            return self
        return replace(self, resolved_steps=frozenset(self.resolved_steps | self.steps | set(steps)))

    # ---------------------------------------------------------------- decisions
    def is_step_tick(self, step: int) -> bool:
        """Whether optimizer step ``step`` (``trainer.global_step`` of the batch) is a scheduled tick.

        Integer arithmetic only: this runs on every training batch.
        """
        if self.needs_total and self.total_steps is None:
            raise ScheduleError("TickSchedule with log:/frac: terms must be bound with .bind(total_steps) first.")
        if step in self.steps or step in self.resolved_steps:  # explicit steps need no bind()
            return True
        for n in self.every:
            if step % n == 0:
                return True
        return False

    def is_spike_tick(self, step: int, detected_at: int | None) -> bool:
        """Whether ``step`` is one of the ``spike:K`` steps after a spike the host learned of at step ``detected_at``.

        The K steps are ``detected_at + 1 ... detected_at + K``: the first step whose batch has not started
        when the detection ran, and the K - 1 after it.
        """
        return self.spike_steps > 0 and detected_at is not None and detected_at < step <= detected_at + self.spike_steps

    def is_epoch_tick(self, epoch: int) -> bool:
        """Whether the end of (0-based) ``epoch`` is a tick."""
        return self.epoch_every > 0 and (epoch + 1) % self.epoch_every == 0

    def ticks_between(self, start: int, stop: int) -> list[int]:
        """Step ticks in ``[start, stop)``, for documentation, tests and planning."""
        return [s for s in range(start, stop) if self.is_step_tick(s)]

    def __str__(self) -> str:
        terms = [str(s) for s in sorted(self.steps)]
        terms += [f"every:{n}" for n in self.every]
        terms += [f"log:{n}" for n in self.log_counts]
        terms += [f"frac:{f:g}" for f in self.fractions]
        if self.epoch_every:
            terms.append("epoch" if self.epoch_every == 1 else f"epoch:{self.epoch_every}")
        if self.nonfinite:
            terms.append("nonfinite")
        if self.spike_steps:
            terms.append(f"spike:{self.spike_steps}")
        return ",".join(terms) or "none"
