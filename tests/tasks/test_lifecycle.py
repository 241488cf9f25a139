"""Every status transition as a table: ``(record, ...) -> record``, no clock, no storage."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest
from helpers import SHANGHAI, T0, record

from tasks import lifecycle
from tasks.model import ActiveRun, TaskRecord, TaskStatus
from tasks.runs import RunEvent, RunEventKind
from tasks.schedule import Schedule

HOUR = timedelta(hours=1)
RUN = ActiveRun(run_id="r1", scheduled_at=T0, submitted_at=T0)
STARTED = RUN.model_copy(update={"started_at": T0})


def schedule(**changes: Any) -> Schedule:
    return Schedule.of(record("x", **changes), SHANGHAI)


def event(kind: RunEventKind, run_id: str = "r1", **fields: Any) -> RunEvent:
    return RunEvent(run_id, "a", kind, at=T0 + timedelta(minutes=5), **fields)


def fields(r: TaskRecord) -> tuple[Any, ...]:
    return (r.status, r.next_execution_time, r.active_run)


P, R, E, PA, C = (
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.ERROR,
    TaskStatus.PAUSED,
    TaskStatus.COMPLETED,
)


@pytest.mark.parametrize(
    ("before", "rules", "now", "after"),
    [
        # a planned time is kept
        ({"status": P, "at": T0 + HOUR}, {}, T0, (P, T0 + HOUR, None)),
        # no planned time: planned from the last run, in the window
        ({"status": P, "at": None, "last_execution_time": T0}, {}, T0, (P, T0 + HOUR, None)),
        # died mid-run (old files: running without a run out): runnable again
        ({"status": R, "at": T0}, {}, T0, (P, T0, None)),
        # a run out stays out: the ledger decides
        ({"status": R, "at": T0 + HOUR, "active_run": STARTED}, {}, T0, (R, T0 + HOUR, STARTED)),
        # paused and completed tasks have no next run
        ({"status": PA, "at": T0}, {}, T0, (PA, None, None)),
        ({"status": C, "at": T0}, {}, T0, (C, None, None)),
        # past the end date: completed
        (
            {"status": P, "at": T0 + timedelta(days=3)},
            {"task_end_time": date(2026, 1, 9)},
            T0,
            (C, None, None),
        ),
        # past the end with a run out: completion waits for the run's end
        (
            {"status": R, "at": T0 + timedelta(days=3), "active_run": STARTED},
            {"task_end_time": date(2026, 1, 9)},
            T0,
            (R, None, STARTED),
        ),
    ],
)
def test_loaded(before: dict[str, Any], rules: dict[str, Any], now: Any, after: Any) -> None:
    assert fields(lifecycle.loaded(record("a", **before), schedule(**rules), now)) == after


@pytest.mark.parametrize(
    ("status", "active_run", "expected"),
    [
        (P, None, (PA, None, None)),
        (E, None, (PA, None, None)),
        (R, STARTED, (PA, None, STARTED)),
        (PA, None, (PA, None, None)),
        (C, None, (C, None, None)),
    ],
)
def test_paused(status: TaskStatus, active_run: ActiveRun | None, expected: Any) -> None:
    at = None if status.settled else T0
    before = record("a", status=status, at=at, active_run=active_run)
    assert fields(lifecycle.paused(before, T0)) == expected


@pytest.mark.parametrize(
    ("before", "rules", "now", "after"),
    [
        # from the last run plus the interval, or now if later
        ({"last_execution_time": T0}, {}, T0, (P, T0 + HOUR, None)),
        ({"last_execution_time": T0}, {}, T0 + 2 * HOUR, (P, T0 + 2 * HOUR, None)),
        # outside the window: its next opening
        (
            {"last_execution_time": None},
            {},
            T0.replace(hour=23),
            (P, T0 + timedelta(days=1), None),
        ),
        # a run still executing: running again, the run finishes
        ({"active_run": STARTED}, {}, T0, (R, T0, STARTED)),
        # a run still queued for a worker: pending
        ({"active_run": RUN}, {}, T0, (P, T0, RUN)),
        # nothing left before the end: completed
        ({}, {"task_end_time": T0 - HOUR}, T0, (C, None, None)),
    ],
)
def test_resumed(before: dict[str, Any], rules: dict[str, Any], now: Any, after: Any) -> None:
    paused = record("a", status=PA, at=None, **before)
    assert fields(lifecycle.resumed(paused, schedule(**rules), now)) == after


def test_resume_changes_only_paused_tasks() -> None:
    for status in (P, R, E, C):
        before = record("a", status=status)
        assert lifecycle.resumed(before, schedule(), T0) is before


@pytest.mark.parametrize(
    ("status", "when", "after"),
    [
        (P, T0 + HOUR, (P, T0 + HOUR)),
        (E, T0 + HOUR, (E, T0 + HOUR)),
        (P, None, (PA, None)),  # APScheduler paused the job
        (PA, T0, (P, T0)),  # ... and resumed it
        (C, None, (C, None)),
    ],
)
def test_planned(status: TaskStatus, when: Any, after: Any) -> None:
    new = lifecycle.planned(record("a", status=status, at=None if status.settled else T0), when, T0)
    assert (new.status, new.next_execution_time) == after


@pytest.mark.parametrize(
    ("before", "run_out", "after"),
    [
        ({"status": P}, False, (C, None, None)),
        ({"status": P}, True, (P, None, None)),  # a submitted run decides when it ends
        ({"status": R, "active_run": STARTED}, False, (R, None, STARTED)),
        ({"status": PA, "at": None}, False, (PA, None, None)),
    ],
)
def test_exhausted(before: dict[str, Any], run_out: bool, after: Any) -> None:
    assert fields(lifecycle.exhausted(record("a", **before), T0, run_out=run_out)) == after


def test_a_local_run_starts_when_opened() -> None:
    opened = lifecycle.run_opened(record("a"), RUN, T0, started=True)
    assert (opened.status, opened.last_execution_time) == (R, T0)
    assert opened.active_run is not None
    assert opened.active_run.started_at == T0


def test_a_remote_run_is_queued_until_a_worker_starts_it() -> None:
    opened = lifecycle.run_opened(record("a"), RUN, T0, started=False)
    assert (opened.status, opened.active_run) == (P, RUN)
    started = lifecycle.run_started(opened, event(RunEventKind.STARTED, worker="mac-01"), T0)
    assert (started.status, started.last_worker) == (R, "mac-01")
    assert started.last_execution_time == T0 + timedelta(minutes=5)
    assert lifecycle.run_started(started, event(RunEventKind.STARTED), T0) is started


@pytest.mark.parametrize(
    ("kind", "status", "counts", "error"),
    [
        (RunEventKind.SUCCEEDED, P, (1, 0, 0), None),
        (RunEventKind.FAILED, E, (1, 1, 1), "ValueError: x"),
        (RunEventKind.LOST, E, (1, 1, 1), "lost: worker mac-01 went silent"),
        (RunEventKind.EXPIRED, E, (1, 1, 1), "expired: no worker for mac_intel"),
    ],
)
def test_run_finished(kind: RunEventKind, status: TaskStatus, counts: Any, error: Any) -> None:
    running = record("a", status=R, active_run=STARTED, last_error=None)
    done = lifecycle.run_finished(running, event(kind, error=error), T0)
    assert (done.status, done.active_run) == (status, None)
    assert (done.run_count, done.failure_count, done.consecutive_failures) == counts
    assert done.last_error == error


def test_run_finished_is_applied_once_by_run_id() -> None:
    running = record("a", status=R, active_run=STARTED)
    done = lifecycle.run_finished(running, event(RunEventKind.FAILED, error="x"), T0)
    assert lifecycle.run_finished(done, event(RunEventKind.FAILED, error="x"), T0) is done
    other = event(RunEventKind.SUCCEEDED, run_id="someone-else")
    assert lifecycle.run_finished(running, other, T0) is running


@pytest.mark.parametrize(
    ("before", "after_status"),
    [
        ({"status": PA, "at": None}, PA),  # paused during the run: stays paused
        ({"status": R, "at": None}, C),  # no run left: completed
        ({"status": R, "at": T0 + HOUR}, P),
    ],
)
def test_run_finished_status(before: dict[str, Any], after_status: TaskStatus) -> None:
    running = record("a", active_run=STARTED, **before)
    assert lifecycle.run_finished(running, event(RunEventKind.SUCCEEDED), T0).status is after_status


def test_consecutive_failures_reset_on_success() -> None:
    running = record("a", status=R, active_run=STARTED, consecutive_failures=3, last_error="old")
    done = lifecycle.run_finished(running, event(RunEventKind.SUCCEEDED), T0)
    assert (done.consecutive_failures, done.last_error) == (0, "old")


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"status": R, "at": T0 + HOUR}, (P, T0 + HOUR, None)),
        ({"status": R, "at": None}, (C, None, None)),
        ({"status": PA, "at": None}, (PA, None, None)),
    ],
)
def test_run_abandoned_does_not_count(before: dict[str, Any], after: Any) -> None:
    running = record("a", active_run=STARTED, run_count=4, **before)
    new = lifecycle.run_abandoned(running, "r1", T0)
    assert fields(new) == after
    assert new.run_count == 4
    assert lifecycle.run_abandoned(running, "other", T0) is running


# ---------------------------------------------------------------------- the grid

MINUTE = timedelta(minutes=1)
JITTERED = {"last_planned_time": T0, "last_execution_time": T0 + 7 * MINUTE}
"""The last run: planned at T0, started 7 minutes later (its jitter)."""


@pytest.mark.parametrize(
    ("last", "now", "expected"),
    [
        # one interval after the planned time, not after the jittered start
        (JITTERED, T0 + 10 * MINUTE, T0 + HOUR),
        (JITTERED, T0 + HOUR - MINUTE, T0 + HOUR),
        # that grid point passed: now, as any missed run coalesces
        (JITTERED, T0 + HOUR + MINUTE, T0 + HOUR + MINUTE),
        # a run planned at T0 + 1h (the one after), started late: T0 + 2h
        (
            {"last_planned_time": T0 + HOUR, "last_execution_time": T0 + HOUR + 59 * MINUTE},
            T0 + HOUR + 59 * MINUTE,
            T0 + 2 * HOUR,
        ),
        # a record saved before the planned time was kept: from the start, as before
        ({"last_execution_time": T0 + 7 * MINUTE}, T0 + 10 * MINUTE, T0 + HOUR + 7 * MINUTE),
        # no run yet: now
        ({}, T0 + 10 * MINUTE, T0 + 10 * MINUTE),
    ],
)
def test_resume_edit_and_load_plan_from_the_last_planned_time(
    last: dict[str, Any], now: Any, expected: Any
) -> None:
    paused = record("a", status=PA, at=None, **last)
    assert lifecycle.resumed(paused, schedule(), now).next_execution_time == expected
    pending = record("a", status=P, at=T0 + 5 * HOUR, **last)
    assert lifecycle.edited(pending, pending, schedule(), now).next_execution_time == expected
    unplanned = record("a", status=P, at=None, **last)
    assert lifecycle.loaded(unplanned, schedule(), now).next_execution_time == expected


@pytest.mark.parametrize("started", [True, False])
def test_an_opened_run_makes_its_planned_time_the_grid_point(started: bool) -> None:
    late = RUN.model_copy(update={"scheduled_at": T0 - HOUR})  # waited for its start
    opened = lifecycle.run_opened(record("a"), late, T0, started=started)
    assert (opened.last_planned_time, opened.grid_time) == (T0 - HOUR, T0 - HOUR)
    if started:
        assert opened.last_execution_time == T0


@pytest.mark.parametrize("fraction", [0.0, 0.37, 1.0])
def test_repeated_pause_resume_and_edit_cycles_never_move_the_grid(fraction: float) -> None:
    jittery = schedule(run_policy={"jitter": 1800}, valid_time_range=(0, 24))
    task = lifecycle.jittered(
        record("a", at=T0, run_policy={"jitter": 1800}, valid_time_range=(0, 24)),
        jittery,
        fraction,
    )
    planned = []
    for cycle in range(12):
        due, start = task.next_execution_time, task.start_time
        assert due is not None
        assert start is not None
        planned.append(due)
        run = ActiveRun(run_id=f"r{cycle}", scheduled_at=due, submitted_at=start)
        task = lifecycle.run_opened(task, run, start, started=True)
        task = lifecycle.planned(task, due + HOUR, start)
        done = RunEvent(f"r{cycle}", "a", RunEventKind.SUCCEEDED, at=start, started_at=start)
        task = lifecycle.run_finished(task, done, start + MINUTE, jittery)
        now = start + 2 * MINUTE
        if cycle % 2:
            task = lifecycle.resumed(lifecycle.paused(task, now), jittery, now)
        else:
            task = lifecycle.edited(task, task, jittery, now)
        task = lifecycle.jittered(task, jittery, fraction)
    assert planned == [T0 + n * HOUR for n in range(12)]
