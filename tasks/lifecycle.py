"""Every status transition of a task, decided once: pure functions ``(record, ...) -> record``.

Nothing here reads a clock or touches storage: the caller passes ``now`` (and the task's
:class:`~tasks.schedule.Schedule` where the schedule decides), and stores the record returned.
A function returns its ``record`` argument itself when nothing changes, so callers can skip
saving with ``new is old``.

The statuses: ``pending`` (waiting for its next run), ``running`` (a run is executing),
``error`` (the last run failed; still scheduled), ``paused`` (no run starts until resumed) and
``completed`` (no run is left before the end; kept on file). A run that is out (submitted,
not finished) is the record's ``active_run``.
"""

from __future__ import annotations

from datetime import datetime

from tasks import policy
from tasks.model import ActiveRun, PendingRetry, TaskRecord, TaskStatus
from tasks.runs import NOT_SENT, RunEvent, RunEventKind
from tasks.schedule import Schedule, same_instant

__all__ = [
    "can_start",
    "completed",
    "edited",
    "exhausted",
    "faulted",
    "jittered",
    "loaded",
    "paused",
    "planned",
    "resumed",
    "run_abandoned",
    "run_finished",
    "run_opened",
    "run_requested",
    "run_started",
    "schedulable",
]


def schedulable(record: TaskRecord) -> bool:
    """Whether the scheduler keeps a job for ``record`` (paused ones too, without a time)."""
    if record.status is TaskStatus.PAUSED:
        return True
    return record.status is not TaskStatus.COMPLETED and record.next_execution_time is not None


def can_start(record: TaskRecord, schedule: Schedule, now: datetime) -> bool:
    """Whether a run of ``record`` may start at ``now`` (the gate at the account lane)."""
    return not record.status.settled and record.active_run is None and schedule.may_start(now)


_NOTHING_NEXT: dict[str, object] = {
    "next_execution_time": None,
    "next_start_time": None,
    "retry": None,
}


def _without_next(record: TaskRecord) -> TaskRecord:
    if record.next_execution_time or record.next_start_time or record.retry:
        return record.replace(**_NOTHING_NEXT)
    return record


def loaded(record: TaskRecord, schedule: Schedule, now: datetime) -> TaskRecord:
    """``record`` as read from disk, made consistent: times planned, ended tasks completed.

    A record with an ``active_run`` keeps it: the run ledger decides what became of that run.
    One found ``running`` without it (the process died mid-run) is runnable again.
    """
    if record.status is TaskStatus.RUNNING and record.active_run is None:
        record = record.replace(status=TaskStatus.PENDING)
    if record.status.settled:
        return _without_next(record)
    planned_at = record.next_execution_time
    if planned_at is None and record.active_run is None:
        planned_at = schedule.next_run(record.grid_time, now)
    if planned_at is not None and schedule.ended(planned_at):
        planned_at = None
    if planned_at is None:
        if record.active_run is not None or record.retry is not None:
            if record.next_execution_time or record.next_start_time:
                return record.replace(next_execution_time=None, next_start_time=None)
            return record
        return record.replace(status=TaskStatus.COMPLETED, **_NOTHING_NEXT)
    if same_instant(planned_at, record.next_execution_time):
        return record
    return record.replace(next_execution_time=planned_at, next_start_time=None)


def paused(record: TaskRecord, now: datetime, reason: str | None = None) -> TaskRecord:
    """Paused: no run starts until resumed (a run that is out finishes; a planned retry is
    dropped). ``reason`` says why the dispatcher paused it itself. Settled tasks stay."""
    if record.status.settled:
        return record
    return record.replace(
        status=TaskStatus.PAUSED, paused_reason=reason, updated_at=now, **_NOTHING_NEXT
    )


def resumed(record: TaskRecord, schedule: Schedule, now: datetime) -> TaskRecord:
    """Scheduled again: next run one interval after the last run's planned time (its
    :attr:`~tasks.model.TaskRecord.grid_time`, not its jittered start: the grid never moves)
    or now, whichever is later, in the window.

    Only a paused task changes; one with no run left before its end is completed. The reason
    of an automatic pause is cleared, and with it the count of failures that caused it.
    """
    if record.status is not TaskStatus.PAUSED:
        return record
    if record.paused_reason is not None:
        record = record.replace(paused_reason=None, consecutive_failures=0)
    planned_at = schedule.next_run(record.grid_time, now)
    if planned_at is None:
        return completed(record, now)
    executing = record.active_run is not None and not record.active_run.queued
    status = TaskStatus.RUNNING if executing else TaskStatus.PENDING
    return record.replace(
        status=status, next_execution_time=planned_at, next_start_time=None, updated_at=now
    )


def planned(record: TaskRecord, when: datetime | None, now: datetime) -> TaskRecord:
    """The scheduler moved the next run to ``when`` (None: it holds the job without a time)."""
    if same_instant(when, record.next_execution_time):
        return record
    status = record.status
    if when is None and not status.settled:
        status = TaskStatus.PAUSED
    elif when is not None and status is TaskStatus.PAUSED:
        status = TaskStatus.PENDING
    return record.replace(
        next_execution_time=when, next_start_time=None, status=status, updated_at=now
    )


def completed(record: TaskRecord, now: datetime) -> TaskRecord:
    """No run is left before the end: ``completed``, kept on file, never runs again."""
    if record.status is TaskStatus.COMPLETED and _without_next(record) is record:
        return record
    return record.replace(status=TaskStatus.COMPLETED, updated_at=now, **_NOTHING_NEXT)


def exhausted(record: TaskRecord, now: datetime, *, run_out: bool = False) -> TaskRecord:
    """The schedule has no further run. Completed now, unless a run is still out (``run_out``:
    submitted and not ended), a retry is planned, or the task is paused: then only the next
    run is cleared, and the run's end (or the retry's, or resume) decides."""
    if (
        run_out
        or record.active_run is not None
        or record.retry is not None
        or record.status is TaskStatus.PAUSED
    ):
        if record.next_execution_time is None and record.next_start_time is None:
            return record
        return record.replace(next_execution_time=None, next_start_time=None, updated_at=now)
    return completed(record, now)


def faulted(record: TaskRecord, error: str, now: datetime) -> TaskRecord:
    """Planning the task raised: ``error``, with no next run until paused and resumed."""
    if record.status is TaskStatus.PAUSED:
        return record
    return record.replace(
        status=TaskStatus.ERROR, last_error=error, updated_at=now, **_NOTHING_NEXT
    )


def run_requested(record: TaskRecord, now: datetime) -> TaskRecord:
    """An operator asked to run the task now ("run now"), whatever its window or status.

    The request is kept in the record (saved) until its run opens; asking again before then
    changes nothing: it runs once.
    """
    if record.run_requested is not None:
        return record
    return record.replace(run_requested=now, updated_at=now)


def run_opened(record: TaskRecord, run: ActiveRun, now: datetime, *, started: bool) -> TaskRecord:
    """A run was handed to a backend; ``started`` when it starts at once (this process).

    A planned run's time (``run.scheduled_at``) is the task's new grid point. A manual run takes
    the request it answers and leaves ``last_execution_time``, ``last_planned_time`` (the
    planned runs' anchor) and a planned retry as they are: it does not move the task's grid.
    """
    if run.manual:
        if started and run.started_at != now:
            run = run.model_copy(update={"started_at": now})
        return record.replace(
            active_run=run,
            run_requested=None,
            status=TaskStatus.RUNNING if started and not record.status.settled else record.status,
            updated_at=now,
        )
    if started:
        return record.replace(
            active_run=run if run.started_at == now else run.model_copy(update={"started_at": now}),
            status=record.status if record.status.settled else TaskStatus.RUNNING,
            last_execution_time=now,
            last_planned_time=run.scheduled_at,
            last_worker=None,
            retry=None,
            updated_at=now,
        )
    return record.replace(
        active_run=run, last_planned_time=run.scheduled_at, retry=None, updated_at=now
    )


def _is_open(record: TaskRecord, run_id: str) -> bool:
    return record.active_run is not None and record.active_run.run_id == run_id


def run_started(record: TaskRecord, event: RunEvent, now: datetime) -> TaskRecord:
    """A worker reports that the run started (at ``event.at``, on its clock)."""
    if not _is_open(record, event.run_id) or event.kind is not RunEventKind.STARTED:
        return record
    started_at = event.at.astimezone(now.tzinfo)
    active = record.active_run
    assert active is not None
    if not active.queued:
        return record
    if active.manual:
        return record.replace(
            active_run=active.model_copy(update={"started_at": started_at}),
            status=record.status if record.status.settled else TaskStatus.RUNNING,
            updated_at=now,
        )
    return record.replace(
        active_run=active.model_copy(update={"started_at": started_at}),
        status=record.status if record.status.settled else TaskStatus.RUNNING,
        last_execution_time=started_at,
        last_worker=event.worker,
        updated_at=now,
    )


def run_finished(
    record: TaskRecord, event: RunEvent, now: datetime, schedule: Schedule | None = None
) -> TaskRecord:
    """The run ended (succeeded, failed, lost or expired); applied once, by run id.

    Lost and expired runs count as failed runs. A failed or lost run whose task's policy has
    retries left is retried (given ``schedule``; see :func:`tasks.policy.retry_time`): the
    attempt counts as a run, but only the last attempt's failure counts as a failed run and
    sets ``error``. A task paused meanwhile stays paused; one whose policy says so is paused
    after that many failed runs in a row (with ``paused_reason``); one whose schedule has no
    further run is completed; otherwise ``pending`` after a success, ``error`` after a failure.

    A manual run (see :func:`run_requested`) is never retried, leaves ``last_execution_time``
    and the count of failures in a row as they are (so it never pauses the task), and leaves
    a paused or completed task so; it counts as a run (and a failed run if it failed).
    """
    if not _is_open(record, event.run_id) or not event.kind.finished:
        return record
    active = record.active_run
    assert active is not None
    error = None if event.ok else (event.error or event.kind.value)
    if active.manual:
        return _manual_finished(record, event, now, error)
    changes: dict[str, object] = {}
    if event.started_at is not None and event.kind is not RunEventKind.EXPIRED:
        changes["last_execution_time"] = event.started_at.astimezone(now.tzinfo)
    if event.worker is not None:
        changes["last_worker"] = event.worker
    retry = _retry(record, event, active, schedule, now) if error is not None else None
    if retry is not None:
        return record.replace(
            status=TaskStatus.PENDING,
            active_run=None,
            run_count=record.run_count + 1,
            retry=retry,
            updated_at=now,
            **changes,
        )
    # A run not sent because the broker was unreachable neither counts toward
    # pause_after_failures nor breaks a run of failures.
    not_sent = bool(event.extra.get(NOT_SENT))
    consecutive = 0 if error is None else record.consecutive_failures + (not not_sent)
    if record.status.settled:
        status = record.status
    elif record.next_execution_time is None:
        status = TaskStatus.COMPLETED
    elif error is not None and not not_sent and policy.pause_due(record.policy, consecutive):
        status = TaskStatus.PAUSED
        changes.update(next_execution_time=None, next_start_time=None)
        changes["paused_reason"] = f"{consecutive} failed runs in a row; the last: {error}"
    else:
        status = TaskStatus.PENDING if error is None else TaskStatus.ERROR
    return record.replace(
        status=status,
        active_run=None,
        run_count=record.run_count + 1,
        failure_count=record.failure_count + (error is not None),
        consecutive_failures=consecutive,
        last_error=record.last_error if error is None else error,
        retry=None,
        updated_at=now,
        **changes,
    )


def _manual_finished(
    record: TaskRecord, event: RunEvent, now: datetime, error: str | None
) -> TaskRecord:
    status = record.status
    if not status.settled:
        if record.next_execution_time is None and record.retry is None:
            status = TaskStatus.COMPLETED
        else:
            status = TaskStatus.PENDING if error is None else TaskStatus.ERROR
    return record.replace(
        status=status,
        active_run=None,
        run_count=record.run_count + 1,
        failure_count=record.failure_count + (error is not None),
        last_error=record.last_error if error is None else error,
        last_worker=event.worker if event.worker is not None else record.last_worker,
        updated_at=now,
    )


def _retry(
    record: TaskRecord,
    event: RunEvent,
    active: ActiveRun,
    schedule: Schedule | None,
    now: datetime,
) -> PendingRetry | None:
    if schedule is None or record.status.settled:
        return None
    if event.kind not in (RunEventKind.FAILED, RunEventKind.LOST):
        return None
    at = policy.retry_time(record.policy, active.attempt, schedule, record.start_time, now)
    if at is None:
        return None
    return PendingRetry(at=at, attempt=active.attempt + 1, scheduled_at=active.scheduled_at)


def run_abandoned(record: TaskRecord, run_id: str, now: datetime) -> TaskRecord:
    """The run was cut off in this process (cancelled at stop, or the process died): it does
    not count, and the task stays runnable."""
    if not _is_open(record, run_id):
        return record
    assert record.active_run is not None
    if record.active_run.manual and record.run_requested is None:
        # Asked for and cut off before it ended: it stays asked for, and runs again.
        record = record.replace(run_requested=record.active_run.submitted_at)
    status = record.status
    if status is TaskStatus.RUNNING:
        status = (
            TaskStatus.PENDING if record.next_execution_time is not None else (TaskStatus.COMPLETED)
        )
    return record.replace(status=status, active_run=None, updated_at=now)


def edited(record: TaskRecord, rules: TaskRecord, schedule: Schedule, now: datetime) -> TaskRecord:
    """The task's rules (interval, window, end, policy, kwargs) replaced by those of ``rules``
    (validated like a new task); ``schedule`` is theirs.

    The next run is planned again from the last run's planned time (its
    :attr:`~tasks.model.TaskRecord.grid_time`), or now; id, counters and the
    run that is out are kept; a planned retry is dropped. A paused task stays paused; a
    completed one with a run left under the new rules is pending again.
    """
    record = record.replace(
        interval=rules.interval,
        valid_time_range=rules.valid_time_range,
        task_end_time=rules.task_end_time,
        run_policy=rules.run_policy,
        kwargs=rules.kwargs,
        account_name=rules.account_name,
        retry=None,
        next_start_time=None,
        updated_at=now,
    )
    if record.status is TaskStatus.PAUSED:
        return record
    planned_at = schedule.next_run(record.grid_time, now)
    if planned_at is None:
        return exhausted(record, now)
    status = TaskStatus.PENDING if record.status is TaskStatus.COMPLETED else record.status
    return record.replace(status=status, next_execution_time=planned_at)


def jittered(record: TaskRecord, schedule: Schedule, fraction: float) -> TaskRecord:
    """``record`` with the start of its next run drawn (``fraction`` in ``[0, 1]`` of the way
    through its jitter; see :func:`tasks.policy.jittered_start`).

    A start already drawn for the planned run is kept (it is saved, so a restart keeps it);
    without jitter, a planned run or while paused there is none.
    """
    planned_at = record.next_execution_time
    jitter = record.policy.jitter
    if not jitter or planned_at is None or record.status is TaskStatus.PAUSED:
        return record if record.next_start_time is None else record.replace(next_start_time=None)
    start = record.next_start_time
    if start is not None:
        earliest, latest = policy.jitter_bounds(planned_at, jitter, schedule)
        if earliest.timestamp() <= start.timestamp() <= latest.timestamp():
            return record
    start = policy.jittered_start(planned_at, jitter, schedule, fraction)
    return record.replace(next_start_time=start.astimezone(planned_at.tzinfo))
