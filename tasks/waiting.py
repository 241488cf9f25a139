"""Why a task waits: one kind and one sentence, shared by the control API (a task's
``waiting``), the dashboard and ``task-dispatcher show``.

:func:`why_waiting` is a pure function of the record, ``now`` and what a running dispatcher
knows beyond the record (:class:`WaitContext`: runs queued for their account's lane, who holds
a lane, the fleet's workers, a broker outage). A stopped store passes the default context, so
the command line says the same on a stopped store as the API does wherever the record alone
decides.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from tasks.display import format_time
from tasks.model import TaskRecord, TaskStatus
from tasks.schedule import Schedule
from tasks.secrets import mask_text

__all__ = ["WAIT_KINDS", "WaitContext", "Waiting", "why_waiting"]

WAIT_KINDS = (
    "paused",
    "paused_after_failures",
    "running",
    "broker_outage",
    "no_worker",
    "queued",
    "lane",
    "retry",
    "requested",
    "jitter",
    "due",
    "past_end",
    "outside_hours",
)
"""Every ``kind`` of :class:`Waiting`, most decisive first: a task gets the first that fits."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a task's next run has not started, for people and for programs."""

    kind: str
    """One of :data:`WAIT_KINDS`."""
    message: str
    """A sentence for a person (credentials masked)."""
    since: datetime | None = None
    """Since when it waits, when that is known (a run queued, a due time, an outage)."""
    until: datetime | None = None
    """Until when, when that is known (a retry's time, a window's opening, a jittered start)."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, times as ISO-8601 with offset."""
        return {
            "kind": self.kind,
            "message": self.message,
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
        }

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Waiting:
        """The value :meth:`to_json` gave (as the control API sends it)."""

        def when(key: str) -> datetime | None:
            value = data.get(key)
            return None if value is None else datetime.fromisoformat(str(value))

        return cls(str(data["kind"]), str(data["message"]), when("since"), when("until"))


def _no_holder(account_id: str) -> TaskRecord | None:
    return None


@dataclass(frozen=True, slots=True)
class WaitContext:
    """What a running dispatcher knows beyond a task's record (the default: a stopped store,
    which knows nothing more)."""

    live: bool = False
    """A dispatcher is running the tasks (False: a stopped store)."""
    lane_queued: Collection[str] = frozenset()
    """Ids of tasks whose due run waits for its account's lane."""
    lane_holder: Callable[[str], TaskRecord | None] = _no_holder
    """Account id -> the task of that account whose run is out (holding the lane), if any."""
    workers: Mapping[str, Sequence[str]] | None = None
    """Sys_type -> the workers registered for it, for the sys_types with queued runs (None:
    a backend without workers, or not known)."""
    broker_down_since: datetime | None = None
    """When the broker became unreachable (None: reachable, or no broker)."""
    broker: str = ""
    """The broker's URL, password masked."""


def _hours(record: TaskRecord) -> str:
    start, end = record.valid_time_range
    return f"{start:02d}-{end:02d}"


def _done(kind: str, message: str, **times: datetime | None) -> Waiting:
    return Waiting(kind, mask_text(message), **times)


def _paused(record: TaskRecord) -> Waiting:
    if record.paused_reason is not None:
        return _done(
            "paused_after_failures",
            f"paused by the dispatcher after {record.paused_reason}: no run starts until "
            "it is resumed",
        )
    return _done("paused", "paused: no run starts until it is resumed")


def _queued_run(record: TaskRecord, zone: tzinfo, context: WaitContext) -> Waiting:
    run = record.active_run
    assert run is not None
    sent = format_time(run.submitted_at, zone)
    text = f"run {run.run_id} queued since {sent}, waiting for a {record.sys_type} worker"
    if context.workers is None or record.sys_type not in context.workers:
        return _done("queued", text + " to claim it", since=run.submitted_at)
    workers = list(context.workers[record.sys_type])
    if not workers:
        return _done(
            "no_worker",
            f"{text}: none is registered (start one: task-dispatcher worker "
            f"--sys-type {record.sys_type})",
            since=run.submitted_at,
        )
    return _done(
        "queued",
        f"{text}: registered {', '.join(workers)} (busy, or its message waits its turn)",
        since=run.submitted_at,
    )


def _lane(record: TaskRecord, zone: tzinfo, context: WaitContext) -> Waiting:
    holder = context.lane_holder(record.account_id)
    text = f"its due run waits for account {record.account_id}'s lane"
    run = None if holder is None or holder.task_id == record.task_id else holder.active_run
    if holder is not None and run is not None:
        state = (
            f"queued since {format_time(run.submitted_at, zone)}"
            if run.queued
            else f"executing since {format_time(run.started_at, zone)}"
        )
        text += f", behind task {holder.task_id}'s run {run.run_id} ({state})"
    else:
        text += " (or a free run slot: max_concurrent_runs are out)"
    return _done("lane", text)


def _planned(record: TaskRecord, now: datetime, zone: tzinfo, live: bool) -> Waiting | None:
    """Why a task with no run out, queued or retried has not started its next run."""
    planned = record.next_execution_time
    if planned is None:
        return None
    start = record.start_time or planned
    schedule = Schedule.of(record, zone)
    if start > now:
        if planned <= now:
            return _done(
                "jitter",
                f"jittered: starts {format_time(start, zone)}",
                since=planned,
                until=start,
            )
        if schedule.may_start(now):
            return None  # simply its time to come
        return _done(
            "outside_hours",
            f"outside its hours ({_hours(record)}) until {format_time(start, zone)}",
            until=start,
        )
    if not schedule.may_start(now):
        opening = schedule.next_run(None, now)
        if opening is None:
            ends = "when the dispatcher runs" if not live else "at its next pass"
            return _done("past_end", f"overdue: past its end, completed {ends}", since=start)
        return _done(
            "outside_hours",
            f"overdue: outside its hours now, next run {format_time(opening, zone)}",
            since=start,
            until=opening,
        )
    if live:
        return _done("due", f"due since {format_time(start, zone)}, not sent yet", since=start)
    return _done("due", "overdue: runs as soon as the dispatcher runs", since=start)


def why_waiting(
    record: TaskRecord, now: datetime, zone: tzinfo, context: WaitContext | None = None
) -> Waiting | None:
    """Why ``record``'s next run has not started at ``now`` (None: it has not had to yet, or
    never will: a completed task). Times are read in ``zone``; the first of
    :data:`WAIT_KINDS` that fits is the answer."""
    context = context or WaitContext()
    status = record.status
    if status is TaskStatus.COMPLETED:
        return None
    if status is TaskStatus.PAUSED:
        return _paused(record)
    run = record.active_run
    if run is not None and not run.queued:
        return _done(
            "running",
            f"run {run.run_id} executing since {format_time(run.started_at, zone)}",
            since=run.started_at,
        )
    due = record.start_time is not None and record.start_time <= now
    outage = context.broker_down_since
    if outage is not None and (run is not None or due or record.task_id in context.lane_queued):
        return _done(
            "broker_outage",
            f"the broker {context.broker} is unreachable since {format_time(outage, zone)}: "
            "runs cannot be sent or claimed",
            since=outage,
        )
    if run is not None:
        return _queued_run(record, zone, context)
    if record.task_id in context.lane_queued:
        return _lane(record, zone, context)
    retry = record.retry
    if retry is not None:
        return _done(
            "retry",
            f"retry (attempt {retry.attempt}) of the run planned at "
            f"{format_time(retry.scheduled_at, zone)} at {format_time(retry.at, zone)}",
            until=retry.at,
        )
    if record.run_requested is not None:
        return _done(
            "requested",
            f"a run asked for at {format_time(record.run_requested, zone)} "
            + ("waits to be sent" if context.live else "runs once the dispatcher runs"),
            since=record.run_requested,
        )
    return _planned(record, now, zone, context.live)
