"""The dashboard's timeline: what each task will do in the next hours and did in the last ones.

Pure functions of ``now``: planned runs come from the scheduler's own trigger
(:meth:`TaskTrigger.upcoming`), so the picture is exactly what the dispatcher will do; past
runs come from whatever the run history returns (anything shaped like a ``RunEntry``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol

from scheduler.triggers import TaskTrigger, Window, end_instant, in_window
from scheduler.web.views import last_outcome
from tasks.model import TaskRecord, TaskStatus

__all__ = [
    "DENSE_INTERVAL",
    "HORIZON",
    "SPANS",
    "PastRun",
    "RunLike",
    "Span",
    "TaskLine",
    "Tick",
    "Timeline",
    "axis_ticks",
    "build_timeline",
    "past_runs",
    "plan_task",
    "window_spans",
]

HORIZON = timedelta(hours=24)
"""How far the timeline looks ahead, and back."""
DENSE_INTERVAL = timedelta(minutes=15)
"""Tasks running more often than this are drawn as a band over their open window, not ticks."""

_HOUR = timedelta(hours=1)

SPANS: dict[str, timedelta] = {
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}
"""The timeline's choices of span: how far it looks back, and ahead."""

_TICK_STEPS: tuple[tuple[timedelta, int], ...] = (
    (timedelta(hours=6), 1),
    (timedelta(hours=24), 3),
    (timedelta(days=7), 6),
)
"""Hours between two hour labels, by span (the shortest span at least as long)."""


@dataclass(frozen=True, slots=True)
class Tick:
    """One label of the timeline's axis."""

    at: datetime
    label: str
    kind: str
    """``day`` (a date: at midnight, and at the axis's start) or ``hour``."""
    rank: int
    """Which labels stay when there is no room for all (lower stays first): days, then the
    hours at multiples of 12, 6, 3 and 1."""


def axis_ticks(start: datetime, stop: datetime, zone: tzinfo) -> list[Tick]:
    """The axis labels of ``[start, stop)`` in ``zone``'s wall time: the date at each midnight
    (and at the start), and whole hours every few hours (more often on a short span).

    Hours are stepped as instants, so a day with a clock change still gets one label per
    real hour step; a label's text is the wall time there.
    """
    span = (stop - start) / 2
    step = next((hours for limit, hours in _TICK_STEPS if span <= limit), _TICK_STEPS[-1][1])
    ticks = [Tick(start, _day(start.astimezone(zone)), "day", 0)]
    local = start.astimezone(zone)
    at = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    if at < start:
        at += _HOUR
    while at < stop:
        wall = at.astimezone(zone)
        if wall.hour == 0 and wall.minute == 0:
            ticks.append(Tick(at, _day(wall), "day", 0))
        elif wall.hour % step == 0 and wall.minute == 0:
            rank = next(r for r, every in enumerate((12, 6, 3, 1), 1) if wall.hour % every == 0)
            ticks.append(Tick(at, wall.strftime("%H:%M"), "hour", rank))
        at += _HOUR
    return ticks


def _day(wall: datetime) -> str:
    return wall.strftime("%a %m-%d")


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open stretch of time ``[start, end)``."""

    start: datetime
    end: datetime


class RunLike(Protocol):
    """What the timeline reads from a run history entry."""

    @property
    def task_id(self) -> str: ...

    @property
    def started_at(self) -> datetime | None: ...

    @property
    def finished_at(self) -> datetime | None: ...

    @property
    def outcome(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PastRun:
    """One run that happened (or is happening) inside the look-back window."""

    start: datetime
    end: datetime | None
    outcome: str


@dataclass(slots=True)
class TaskLine:
    """One task's row of the timeline."""

    task_id: str
    account_id: str
    status: TaskStatus
    windows: list[Span]
    planned: list[datetime]
    """Planned starts in the horizon (empty for a dense task: see ``band``)."""
    outcome: str
    """How its last run ended: ``never``, ``failed`` or ``succeeded``."""
    band: list[Span]
    """For a dense task, the stretches in which it runs back to back."""
    end: datetime | None
    """The end instant when it falls inside the horizon."""
    ends_at: datetime | None
    """The end instant, wherever it falls."""
    past: list[PastRun] = field(default_factory=list)


@dataclass(slots=True)
class Timeline:
    """Every task's line, per account in priority order, over ``[start, stop)``."""

    now: datetime
    start: datetime
    stop: datetime
    accounts: dict[str, list[TaskLine]]

    def fraction(self, t: datetime) -> float:
        """Where ``t`` falls on the axis, from 0 (``start``) to 1 (``stop``), clamped."""
        total = (self.stop - self.start).total_seconds()
        return min(1.0, max(0.0, (t - self.start).total_seconds() / total))


def window_spans(window: Window, zone: tzinfo, start: datetime, stop: datetime) -> list[Span]:
    """The stretches of ``[start, stop)`` during which the hour window is open.

    Windows open and close on whole wall-clock hours, so the zone's hour boundaries are the
    only instants where the answer can change.
    """
    if window == (0, 24):
        return [Span(start, stop)]
    local = start.astimezone(zone)
    boundary = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    spans: list[Span] = []
    opened: datetime | None = None
    while boundary < stop:
        is_open = in_window(max(boundary, start), window, zone)
        if is_open and opened is None:
            opened = max(boundary, start)
        elif not is_open and opened is not None:
            spans.append(Span(opened, boundary))
            opened = None
        boundary += _HOUR
    if opened is not None:
        spans.append(Span(opened, stop))
    return spans


def _clip(spans: Iterable[Span], start: datetime, stop: datetime) -> list[Span]:
    clipped = (Span(max(s.start, start), min(s.end, stop)) for s in spans)
    return [span for span in clipped if span.start < span.end]


def plan_task(
    record: TaskRecord, zone: tzinfo, now: datetime, horizon: timedelta = HORIZON
) -> TaskLine:
    """``record``'s planned runs over ``[now, now + horizon)``, as its trigger computes them.

    A task running more often than :data:`DENSE_INTERVAL` per 24 h of ``horizon`` is drawn as
    a band (so a week's picture stays as light as a day's).
    """
    stop = now + horizon
    trigger = TaskTrigger.for_record(record, zone)
    end = end_instant(record.task_end_time, zone)
    windows = window_spans(record.valid_time_range, zone, now, stop)
    line = TaskLine(
        task_id=record.task_id,
        account_id=record.account_id,
        status=record.status,
        windows=windows,
        planned=[],
        outcome=last_outcome(record),
        band=[],
        end=end if end is not None and now <= end < stop else None,
        ends_at=end,
    )
    first = record.next_execution_time
    if record.status in (TaskStatus.PAUSED, TaskStatus.COMPLETED) or first is None:
        return line
    if record.interval_delta < DENSE_INTERVAL * (horizon / HORIZON):
        band_start = max(first, now)
        band_stop = stop if end is None else min(stop, end)
        line.band = _clip(windows, band_start, band_stop)
        return line
    for when in trigger.upcoming(first):
        if when >= stop:
            break
        if when >= now or not line.planned:
            # An overdue first run (the loop is late, or the window just opened) still shows.
            line.planned.append(when)
    return line


def past_runs(entries: Iterable[RunLike], start: datetime) -> dict[str, list[PastRun]]:
    """History entries that started at or after ``start``, per task, oldest first."""
    result: dict[str, list[PastRun]] = {}
    for entry in entries:
        if entry.started_at is None or entry.started_at < start:
            continue
        result.setdefault(entry.task_id, []).append(
            PastRun(
                entry.started_at,
                entry.finished_at,
                str(getattr(entry.outcome, "value", entry.outcome)),
            )
        )
    for runs in result.values():
        runs.sort(key=lambda run: run.start)
    return result


def build_timeline(
    records: Sequence[TaskRecord],
    account_tasks: dict[str, list[str]],
    zone: tzinfo,
    now: datetime,
    history: Iterable[RunLike] = (),
    horizon: timedelta = HORIZON,
) -> Timeline:
    """The timeline of every task: ``horizon`` back (actual runs) and ahead (planned ones)."""
    by_id = {record.task_id: record for record in records}
    past = past_runs(history, now - horizon)
    accounts: dict[str, list[TaskLine]] = {}
    for account in sorted(account_tasks):
        lines = accounts.setdefault(account, [])
        for task_id in account_tasks[account]:
            record = by_id.get(task_id)
            if record is None:
                continue
            line = plan_task(record, zone, now, horizon)
            line.past = past.get(task_id, [])
            lines.append(line)
    return Timeline(now=now, start=now - horizon, stop=now + horizon, accounts=accounts)
