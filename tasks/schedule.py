"""When a task runs: pure functions of ``now``, and the :class:`Schedule` of a task.

Interval arithmetic is done on UTC instants (elapsed time, as APScheduler's IntervalTrigger
counts it); the dispatcher's zone is consulted only to read wall-clock hours.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Protocol

__all__ = [
    "RunPreview",
    "Schedule",
    "Scheduled",
    "Window",
    "end_instant",
    "in_window",
    "may_start",
    "next_run",
    "preview_runs",
    "resolve_wall_time",
    "same_instant",
    "upcoming_runs",
    "utc_now",
    "window_closing",
    "window_opening",
]

Window = tuple[int, int]
"""Hours ``(start, end)`` of the dispatcher's zone: open while ``start <= hour < end``;
``start > end`` wraps midnight; ``(0, 24)`` is all day."""

_ONE_SECOND = timedelta(seconds=1)
_ONE_MICROSECOND = timedelta(microseconds=1)


def utc_now() -> datetime:
    """The current instant, aware, in UTC (the one clock the dispatcher reads)."""
    return datetime.now(UTC)


def same_instant(a: datetime | None, b: datetime | None) -> bool:
    """Whether ``a`` and ``b`` are the same instant (or both None).

    ``==`` on aware datetimes is not that: within one zone it compares wall times (ignoring
    ``fold``), and across zones PEP 495 makes it False for any ambiguous time.
    """
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a.astimezone(UTC) == b.astimezone(UTC)


def in_window(t: datetime, window: Window, zone: tzinfo) -> bool:
    """Whether a run may start at instant ``t`` as far as the hour window is concerned."""
    start, end = window
    if start == 0 and end == 24:
        return True
    hour = t.astimezone(zone).hour
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end


def resolve_wall_time(wall: datetime, zone: tzinfo) -> datetime:
    """The first instant (UTC) at which the zone's clock reads ``wall`` (naive) or later.

    A repeated wall time (fall back) resolves to its first occurrence; a skipped one (spring
    forward) to the first instant after the gap, i.e. the transition itself.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first <= second:
        return first
    # In a gap zoneinfo maps fold=0 with the offset before the transition and fold=1 with the
    # offset after it, so the transition lies between the two: find it (offsets change on
    # whole seconds).
    lo, hi = second, first
    before = lo.astimezone(zone).utcoffset()
    while hi - lo > _ONE_SECOND:
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if mid.astimezone(zone).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return hi


def window_opening(t: datetime, window: Window, zone: tzinfo) -> datetime:
    """The first instant at or after ``t`` at which the window is open (``t`` itself if open)."""
    if in_window(t, window, zone):
        return t
    local_day = t.astimezone(zone).date()
    start_offset = timedelta(hours=window[0])
    for days in range(4):
        wall = datetime.combine(local_day + timedelta(days=days), time()) + start_offset
        opening = resolve_wall_time(wall, zone)
        if opening >= t and in_window(opening, window, zone):
            return opening.astimezone(zone)
    raise AssertionError(f"window {window} never opens after {t}")  # pragma: no cover


def window_closing(t: datetime, window: Window, zone: tzinfo) -> datetime | None:
    """The first instant at or after ``t`` at which the window is closed (``t`` itself if
    closed), or None for a window open all day."""
    if window == (0, 24):
        return None
    if not in_window(t, window, zone):
        return t
    local_day = t.astimezone(zone).date()
    end_offset = timedelta(hours=window[1])
    for days in range(3):
        wall = datetime.combine(local_day + timedelta(days=days), time()) + end_offset
        closing = resolve_wall_time(wall, zone)
        if closing > t and not in_window(closing, window, zone):
            return closing.astimezone(zone)
    raise AssertionError(f"window {window} never closes after {t}")  # pragma: no cover


def end_instant(task_end_time: date | datetime | None, zone: tzinfo) -> datetime | None:
    """The last instant at which a run may start, or None for no end.

    A date allows runs until the end of that day in ``zone``; a datetime is the exact cut-off.
    """
    if task_end_time is None:
        return None
    try:
        if isinstance(task_end_time, datetime):
            if task_end_time.tzinfo is None:
                task_end_time = task_end_time.replace(tzinfo=zone)
            return task_end_time.astimezone(UTC)
        next_midnight = datetime.combine(task_end_time + timedelta(days=1), time())
        return resolve_wall_time(next_midnight, zone) - _ONE_MICROSECOND
    except OverflowError:
        return None  # an end near year 9999 is beyond any run: no end


def may_start(t: datetime, window: Window, end: datetime | None, zone: tzinfo) -> bool:
    """Whether a run may start at ``t``: inside the window and not after the end."""
    return in_window(t, window, zone) and (end is None or t <= end)


def next_run(
    previous: datetime | None,
    *,
    interval: timedelta,
    window: Window,
    end: datetime | None,
    zone: tzinfo,
    now: datetime,
) -> datetime | None:
    """When the run after ``previous`` starts, or None when no run can start before ``end``.

    The first run (``previous`` None) is ``now`` if the window is open, else its next opening.
    Then ``previous + interval``, moved to the next window opening if it falls outside the
    window. A time already past (runs missed while stopped or busy) collapses to ``now``, so
    missed runs coalesce into one run now if the window is open, else the next opening.
    """
    candidate = now if previous is None else max(previous.astimezone(UTC) + interval, now)
    result = window_opening(candidate, window, zone)
    if end is not None and result > end:
        return None
    return result.astimezone(zone)


def upcoming_runs(
    first: datetime | None,
    *,
    interval: timedelta,
    window: Window,
    end: datetime | None,
    zone: tzinfo,
) -> Iterator[datetime]:
    """The planned run times starting at ``first``, each the next after the one before."""
    current = first
    while current is not None:
        yield current
        current = next_run(
            current, interval=interval, window=window, end=end, zone=zone, now=current
        )


class Scheduled(Protocol):
    """What the time maths reads of a task (a ``tasks.model.TaskRecord`` has it): its rules
    and where its runs stand, so that this module needs no model."""

    @property
    def task_id(self) -> str: ...
    @property
    def status(self) -> object: ...
    @property
    def interval(self) -> float: ...
    @property
    def valid_time_range(self) -> Window: ...
    @property
    def task_end_time(self) -> date | datetime | None: ...
    @property
    def next_execution_time(self) -> datetime | None: ...
    @property
    def grid_time(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class Schedule:
    """When one task may run: its interval, hour window and end, read in ``zone``.

    Build it with :meth:`of` (shared between tasks with the same rules); every question about
    a task's times goes through it.
    """

    interval: timedelta
    window: Window
    end: datetime | None
    """The last instant (UTC) at which a run may start, or None for no end."""
    zone: tzinfo

    @classmethod
    def of(cls, record: Scheduled, zone: tzinfo) -> Schedule:
        """The schedule of ``record`` in ``zone``."""
        return _schedule(record.interval, record.valid_time_range, record.task_end_time, zone)

    def next_run(self, previous: datetime | None, now: datetime) -> datetime | None:
        """The run after ``previous`` (the first run when None), or None if none is left."""
        return next_run(
            previous,
            interval=self.interval,
            window=self.window,
            end=self.end,
            zone=self.zone,
            now=now,
        )

    def may_start(self, t: datetime) -> bool:
        """Whether a run may start at ``t``: inside the window and not after the end."""
        return may_start(t, self.window, self.end, self.zone)

    def ended(self, t: datetime) -> bool:
        """Whether ``t`` is past the last instant a run may start."""
        return self.end is not None and t > self.end

    def upcoming(self, first: datetime | None) -> Iterator[datetime]:
        """The planned run times from ``first`` on (see :func:`upcoming_runs`)."""
        return upcoming_runs(
            first, interval=self.interval, window=self.window, end=self.end, zone=self.zone
        )


@functools.lru_cache(maxsize=4096)
def _schedule(
    interval: float, window: Window, task_end_time: date | datetime | None, zone: tzinfo
) -> Schedule:
    return Schedule(
        interval=timedelta(seconds=interval),
        window=window,
        end=end_instant(task_end_time, zone),
        zone=zone,
    )


@dataclass(frozen=True)
class RunPreview:
    """A task's next planned runs, as ``show`` prints them and the control API serves them."""

    task_id: str
    status: str
    """The task's status when the preview was made."""
    if_resumed: bool
    """True for a paused task: the runs it would make if resumed at the preview's ``now``."""
    runs: tuple[datetime, ...]
    """Up to the requested number of planned run times, in the dispatcher's zone."""


def preview_runs(record: Scheduled, zone: tzinfo, now: datetime, count: int) -> RunPreview:
    """The next ``count`` runs of ``record``: the ones planned, or for a paused task the ones
    a resume at ``now`` would plan (a completed task has none)."""
    schedule = Schedule.of(record, zone)
    status = str(record.status)
    first = record.next_execution_time
    if status == "completed":
        first = None
    elif status == "paused":
        first = schedule.next_run(record.grid_time, now)
    runs = tuple(itertools.islice(schedule.upcoming(first), max(count, 0)))
    return RunPreview(record.task_id, status, status == "paused", runs)
