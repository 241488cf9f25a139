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
from tasks.model import TaskRecord, TaskStatus

__all__ = [
    "DENSE_INTERVAL",
    "HORIZON",
    "PastRun",
    "RunLike",
    "Span",
    "TaskLine",
    "Timeline",
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
    """``record``'s planned runs over ``[now, now + horizon)``, as its trigger computes them."""
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
        band=[],
        end=end if end is not None and now <= end < stop else None,
        ends_at=end,
    )
    first = record.next_execution_time
    if record.status in (TaskStatus.PAUSED, TaskStatus.COMPLETED) or first is None:
        return line
    if record.interval_delta < DENSE_INTERVAL:
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
