"""The clock the dispatcher reads for its scheduling decisions: a small protocol and the
system clock, the default.

Everything that decides by the time (what is due, the hour windows and end times, retries,
the instants stamped on records and saves) asks the dispatcher's one clock, so a host (or a
test) can hand in its own and move it. Durations measured with ``time.monotonic`` and the
timestamps of log lines are not decisions and keep reading the system's clocks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "resolve_clock"]


@runtime_checkable
class Clock(Protocol):
    """Tells the current instant."""

    def now(self) -> datetime:
        """The current instant, aware (any zone; the dispatcher converts it)."""
        ...


class SystemClock:
    """The system's clock: ``datetime.now(UTC)``, read at each call (so time-travel tools
    such as freezegun, which replace ``datetime.now``, move it)."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
"""The default clock."""


def resolve_clock(clock: object) -> Clock:
    """``clock`` checked (an object with a ``now()`` method), or :data:`SYSTEM_CLOCK` for None.

    Raises :class:`TypeError` naming ``clock`` for anything else.
    """
    if clock is None:
        return SYSTEM_CLOCK
    if not isinstance(clock, Clock):
        raise TypeError(f"clock: must have a now() method, not {type(clock).__name__}")
    return clock
