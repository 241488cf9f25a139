"""``TaskCore``: the task table and the runs in flight, changed only by commands.

Every change to a task is a command applied at a given instant: :meth:`TaskCore.apply`
``(command, now)`` maps it to one :mod:`tasks.lifecycle` function and one table change, and
returns what changed and the events (:mod:`tasks.events`) that change means. Completion,
jitter and faults are decided here, once; nothing here reads a clock or writes to disk (the
caller passes ``now`` and saves what changed), and the table's lock is the core's lock.

The runs in flight: a run is *opened* (written into its record's ``active_run``) and *closed*
by its end (finished, cancelled or cut off), each one command: a local run enters the core
twice, a remote one three times (its ``started`` event between). A run that is due but still
waits for its account's lane is the runner's; the commands that must know of it say so
(``run_waiting``), and one that never opens is settled by one :class:`RunSettled`. While a run
is out (waiting or open), a schedule with no further run does not complete the task: the run's
end does; a fault found meanwhile outlives that run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from jobstores.commands import (
    AddTasks,
    Command,
    EditTask,
    Exhausted,
    Faulted,
    PauseTask,
    Planned,
    RemoveTask,
    ReorderTask,
    RequestRun,
    ResumeTask,
    RunAbandoned,
    RunOpened,
    RunReported,
    RunSettled,
)
from jobstores.table import TaskTable
from tasks import lifecycle
from tasks.events import (
    DispatcherEvent,
    RunFailed,
    RunReport,
    RunRetried,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    TaskAdded,
    TaskCompleted,
    TaskPaused,
    TaskRemoved,
    TaskResumed,
)
from tasks.model import ActiveRun, TaskRecord, TaskStatus
from tasks.runs import TIMED_OUT, RunEvent, RunEventKind, RunRequest
from tasks.schedule import Schedule, same_instant

__all__ = ["CUT_OFF", "Applied", "Change", "TaskCore"]

CUT_OFF = "cancelled: the dispatcher stopped before the run ended"
"""The error a run cut off in this process is reported with (it does not count)."""


# ---------------------------------------------------------------------- results


class Change(NamedTuple):
    """One task's record before and after a command (None: added, or removed)."""

    task_id: str
    before: TaskRecord | None
    after: TaskRecord | None


_NO_EVENTS: tuple[DispatcherEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Applied:
    """What a command changed and the events it means, in the order they happened."""

    changes: tuple[Change, ...]
    events: tuple[DispatcherEvent, ...] = _NO_EVENTS

    @property
    def before(self) -> TaskRecord | None:
        """The (first) task's record before the command (None: added, or no change)."""
        return self.changes[0].before if self.changes else None

    @property
    def record(self) -> TaskRecord:
        """The (first) task's record after the command (its last one if it was removed)."""
        change = self.changes[0]
        record = change.after if change.after is not None else change.before
        assert record is not None
        return record

    @property
    def records(self) -> list[TaskRecord]:
        """Every record the command left (added or changed, not removed)."""
        return [change.after for change in self.changes if change.after is not None]


_NOTHING = Applied(())
"""What a command that changes nothing returns."""


# ---------------------------------------------------------------------- the core


class TaskCore:
    """The task table and the runs in flight; :meth:`apply` is the one way to change them.

    ``schedule`` gives a record's :class:`~tasks.schedule.Schedule` (in the dispatcher's
    zone); ``fraction`` draws a jitter fraction in ``[0, 1]`` (once per planned run).
    """

    def __init__(
        self,
        table: TaskTable,
        schedule: Callable[[TaskRecord], Schedule],
        fraction: Callable[[], float],
    ) -> None:
        self.table = table
        self.lock = table.lock
        """The table's lock: every command is applied under it."""
        self.schedule = schedule
        self._fraction = fraction
        self._faults: dict[str, str] = {}
        """Tasks put in error while a run was out: the error outlives that run."""

    def jittered(self, record: TaskRecord) -> TaskRecord:
        """``record`` with the start of its next run drawn, if its policy has jitter and none
        is drawn for that run yet (:func:`tasks.lifecycle.jittered`)."""
        if record.run_policy is None and record.next_start_time is None:
            return record
        schedule = self.schedule(record)
        if (
            not record.policy.jitter
            or record.next_execution_time is None
            or record.status is TaskStatus.PAUSED
        ):
            return lifecycle.jittered(record, schedule, 0.0)  # nothing to draw: none is used
        return lifecycle.jittered(record, schedule, self._fraction())

    def apply(self, command: Command, now: datetime) -> Applied:
        """Apply ``command`` at ``now``: one table change; returns it and its events.

        Raises :class:`~tasks.errors.TaskNotFoundError` for an unknown task id (a run's
        bookkeeping for a task removed meanwhile changes nothing instead) and
        :class:`~tasks.errors.InvalidTaskError` for a refused change, changing nothing.
        """
        with self.lock:
            return _HANDLERS[type(command)](self, command, now)

    # ------------------------------------------------------------------ handlers

    def _update(self, task_id: str, change: Callable[[TaskRecord], TaskRecord]) -> Change:
        def changed(record: TaskRecord) -> TaskRecord:
            new = change(record)
            return record if new is record else self._planned_start(record, new)

        before = self.table.get(task_id)  # under the lock: the record update() changes
        return Change(task_id, before, self.table.update(task_id, changed))

    def _planned_start(self, before: TaskRecord, record: TaskRecord) -> TaskRecord:
        """``record`` (``before`` changed) with its jittered start decided: drawn once per
        planned run, when the run is planned (a start drawn for the same planned time is
        kept)."""
        if record.run_policy is None and record.next_start_time is None:
            return record
        if (
            record.next_start_time is not None
            and same_instant(record.next_execution_time, before.next_execution_time)
            and record.run_policy == before.run_policy
        ):
            return record
        return self.jittered(record)

    def _add(self, command: AddTasks, now: datetime) -> Applied:
        records = [self.jittered(record) for record in command.records]
        self.table.add(records)
        return Applied(
            tuple(Change(record.task_id, None, record) for record in records),
            tuple(_task_event(TaskAdded, record, now) for record in records),
        )

    def _edit(self, command: EditTask, now: datetime) -> Applied:
        rules = command.rules
        schedule = self.schedule(rules)
        change = self._update(
            command.task_id, lambda record: lifecycle.edited(record, rules, schedule, now)
        )
        return Applied((change,), _status_events(change, now))

    def _pause(self, command: PauseTask, now: datetime) -> Applied:
        change = self._update(
            command.task_id, lambda record: lifecycle.paused(record, now, command.reason)
        )
        return Applied((change,), _status_events(change, now))

    def _resume(self, command: ResumeTask, now: datetime) -> Applied:
        change = self._update(
            command.task_id,
            lambda record: lifecycle.resumed(record, self.schedule(record), now),
        )
        return Applied((change,), _status_events(change, now))

    def _remove(self, command: RemoveTask, now: datetime) -> Applied:
        record = self.table.remove(command.task_id)
        self._faults.pop(command.task_id, None)
        return Applied(
            (Change(command.task_id, record, None),), (_task_event(TaskRemoved, record, now),)
        )

    def _reorder(self, command: ReorderTask, now: datetime) -> Applied:
        self.table.reorder(command.task_id, command.position)
        record = self.table.get(command.task_id)
        return Applied((Change(command.task_id, record, record),))

    def _request_run(self, command: RequestRun, now: datetime) -> Applied:
        change = self._update(command.task_id, lambda r: lifecycle.run_requested(r, now))
        return Applied((change,))

    def _planned(self, command: Planned, now: datetime) -> Applied:
        when = command.when
        change = self._update(command.task_id, lambda r: lifecycle.planned(r, when, now))
        return Applied((change,))  # the scheduler's own pause or resume: no event

    def _exhausted(self, command: Exhausted, now: datetime) -> Applied:
        run_out = command.run_waiting  # an open run is the record's: lifecycle sees it
        change = self._update(
            command.task_id, lambda r: lifecycle.exhausted(r, now, run_out=run_out)
        )
        return Applied((change,), _status_events(change, now))

    def _faulted(self, command: Faulted, now: datetime) -> Applied:
        task_id = command.task_id
        record = self.table.find(task_id)
        if record is None:
            return _NOTHING
        if command.run_waiting or record.active_run is not None:
            self._faults[task_id] = command.error
        change = self._update(task_id, lambda r: lifecycle.faulted(r, command.error, now))
        return Applied((change,))

    @staticmethod
    def _settle(record: TaskRecord, fault: str | None, now: datetime) -> TaskRecord:
        """``record`` once a run of it is over: a fault found while the run was out is
        applied; a task with no next run is completed (unless a retry is planned or it is
        paused: see :func:`tasks.lifecycle.exhausted`). Completion after the last run is
        decided here, once, in the same change as the run's end."""
        if fault is not None:
            return lifecycle.faulted(record, fault, now)
        if record.next_execution_time is None:
            return lifecycle.exhausted(record, now)
        return record

    def _settled(self, command: RunSettled, now: datetime) -> Applied:
        task_id = command.task_id
        fault = self._faults.pop(task_id, None)
        record = self.table.find(task_id)
        if record is None or self.table.closed:
            return _NOTHING
        if fault is None and record.next_execution_time is not None:
            return _NOTHING
        change = self._update(task_id, lambda r: self._settle(r, fault, now))
        return Applied((change,), () if fault is not None else _status_events(change, now))

    def _opened(self, command: RunOpened, now: datetime) -> Applied:
        run, started = command.run, command.started
        change = self._update(
            command.task_id, lambda r: lifecycle.run_opened(r, run, now, started=started)
        )
        if not started:
            return Applied((change,))
        assert change.after is not None
        event = RunStarted(
            at=now,
            task_id=command.task_id,
            account_id=change.after.account_id,
            run_id=run.run_id,
            attempt=run.attempt,
            scheduled_at=run.scheduled_at,
        )
        if command.request is None:
            return Applied((change,), (event,))
        report = RunEvent(run.run_id, command.task_id, RunEventKind.STARTED, at=now)
        return Applied((change,), (_report(command.request, report, now), event))

    def _reported(self, command: RunReported, now: datetime) -> Applied:
        event = command.event
        task_id = event.task_id
        before = self.table.find(task_id)
        run = before.active_run if before is not None else None
        if command.request is None:
            reported = _NO_EVENTS
        else:  # the event whole, for the observers that keep runs
            reported = (_report(command.request, event, now),)
        if run is None or run.run_id != event.run_id:  # a duplicate, or its task was removed
            if command.request is None:
                return _NOTHING
            return Applied((), reported + _run_events(command.request, None, None, event, now))
        assert before is not None
        if event.kind is RunEventKind.STARTED:
            change = self._update(task_id, lambda r: lifecycle.run_started(r, event, now))
        elif event.kind is RunEventKind.CANCELLED:
            # It never started: closed without counting, as if never sent; and settled.
            fault = self._faults.pop(task_id, None)
            change = self._update(
                task_id,
                lambda r: self._settle(lifecycle.run_abandoned(r, run.run_id, now), fault, now),
            )
        else:
            # Only a failure may plan a retry, which needs the schedule. A fault found while
            # the run was out stays (the task is not completed by the run's end).
            schedule = None if event.ok else self.schedule(before)
            fault = self._faults.pop(task_id, None)

            def finished(record: TaskRecord) -> TaskRecord:
                record = lifecycle.run_finished(record, event, now, schedule)
                return self._settle(record, fault, now)

            change = self._update(task_id, finished)
        events = _run_events(command.request, (before, run), change.after, event, now)
        return Applied((change,), reported + events + _status_events(change, now))

    def _abandoned(self, command: RunAbandoned, now: datetime) -> Applied:
        task_id, run_id = command.task_id, command.run_id
        reported: tuple[DispatcherEvent, ...] = _NO_EVENTS
        if command.request is not None:
            cut = RunEvent(run_id, task_id, RunEventKind.LOST, at=now, error=CUT_OFF)
            reported = (_report(command.request, cut, now),)
        record = self.table.find(task_id)
        if record is None or self.table.closed:
            return Applied((), reported)
        if record.active_run is None or record.active_run.run_id != run_id:
            return Applied((), reported)  # not its open run: nothing to close
        fault = self._faults.pop(task_id, None)
        change = self._update(
            task_id, lambda r: self._settle(lifecycle.run_abandoned(r, run_id, now), fault, now)
        )
        return Applied((change,), reported + _status_events(change, now))


_HANDLERS: dict[type[Any], Callable[[TaskCore, Any, datetime], Applied]] = {
    AddTasks: TaskCore._add,
    EditTask: TaskCore._edit,
    PauseTask: TaskCore._pause,
    ResumeTask: TaskCore._resume,
    RemoveTask: TaskCore._remove,
    ReorderTask: TaskCore._reorder,
    RequestRun: TaskCore._request_run,
    Planned: TaskCore._planned,
    Exhausted: TaskCore._exhausted,
    Faulted: TaskCore._faulted,
    RunSettled: TaskCore._settled,
    RunOpened: TaskCore._opened,
    RunReported: TaskCore._reported,
    RunAbandoned: TaskCore._abandoned,
}


# ---------------------------------------------------------------------- events


def _task_event(
    kind: type[TaskAdded | TaskRemoved | TaskResumed | TaskCompleted],
    record: TaskRecord,
    now: datetime,
) -> DispatcherEvent:
    return kind(at=now, task_id=record.task_id, account_id=record.account_id)


def _status_events(change: Change, now: datetime) -> tuple[DispatcherEvent, ...]:
    """The task events a status transition means: paused, resumed, completed."""
    before, after = change.before, change.after
    if before is None or after is None or before.status is after.status:
        return _NO_EVENTS
    events: list[DispatcherEvent] = []
    if after.status is TaskStatus.PAUSED:
        events.append(
            TaskPaused(
                at=now,
                task_id=after.task_id,
                account_id=after.account_id,
                automatic=after.paused_reason is not None,
                reason=after.paused_reason,
            )
        )
    elif before.status is TaskStatus.PAUSED:
        events.append(_task_event(TaskResumed, after, now))
    if after.status is TaskStatus.COMPLETED:
        events.append(_task_event(TaskCompleted, after, now))
    return tuple(events)


def _report(request: RunRequest, event: RunEvent, now: datetime) -> RunReport:
    return RunReport(
        at=now, task_id=request.task_id, account_id=request.account_id, request=request, event=event
    )


def _run_events(
    request: RunRequest | None,
    opened: tuple[TaskRecord, ActiveRun] | None,
    after: TaskRecord | None,
    event: RunEvent,
    now: datetime,
) -> tuple[DispatcherEvent, ...]:
    """The run events of ``event`` (of the run ``request``, else the record's ``opened`` run):
    started, succeeded, or timed out, failed and retried."""
    if event.kind is RunEventKind.CANCELLED:
        return _NO_EVENTS  # it never started: no run to speak of
    if request is not None:
        task_id, account_id = request.task_id, request.account_id
        run_id, attempt, scheduled_at = request.run_id, request.attempt, request.scheduled_at
    else:
        assert opened is not None
        record, run = opened
        task_id, account_id = record.task_id, record.account_id
        run_id, attempt, scheduled_at = run.run_id, run.attempt, run.scheduled_at
    common: dict[str, Any] = {
        "at": event.at.astimezone(now.tzinfo),
        "task_id": task_id,
        "account_id": account_id,
        "run_id": run_id,
        "attempt": attempt,
        "scheduled_at": scheduled_at,
    }
    if event.kind is RunEventKind.STARTED:
        return (RunStarted(**common),)
    if event.ok:
        return (RunSucceeded(**common),)
    events: list[DispatcherEvent] = []
    timeout = event.extra.get(TIMED_OUT)
    if timeout is not None:
        events.append(RunTimedOut(**common, timeout=float(timeout)))
    retry = after.retry if after is not None else None
    events.append(
        RunFailed(
            **common,
            error=event.error or event.kind.value,
            retry_at=retry.at if retry is not None else None,
        )
    )
    if retry is not None:
        events.append(
            RunRetried(
                at=common["at"],
                task_id=task_id,
                account_id=account_id,
                run_id=run_id,
                attempt=retry.attempt,
                retry_at=retry.at,
            )
        )
    return tuple(events)
