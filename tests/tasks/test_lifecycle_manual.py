"""A manual run ("run now") through the lifecycle, as a table: it never moves the grid, never
retries, never counts toward the auto-pause, and leaves a paused or completed task so."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from helpers import SHANGHAI, T0, record

from tasks import lifecycle
from tasks.model import ActiveRun, TaskStatus
from tasks.policy import RunPolicy
from tasks.runs import RunEvent, RunEventKind
from tasks.schedule import Schedule

LAST = T0 - timedelta(hours=1)
MANUAL = ActiveRun(run_id="m1", scheduled_at=T0, submitted_at=T0, started_at=T0, manual=True)
P, R, E, PA, C = (
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.ERROR,
    TaskStatus.PAUSED,
    TaskStatus.COMPLETED,
)
POLICY = RunPolicy(retries=3, pause_after_failures=1)


def finished(kind: RunEventKind) -> RunEvent:
    error = None if kind is RunEventKind.SUCCEEDED else "boom"
    return RunEvent("m1", "a", kind, at=T0 + timedelta(minutes=1), error=error, started_at=T0)


@pytest.mark.parametrize(
    ("status", "next_at", "kind", "after", "failures"),
    [
        (P, T0 + timedelta(hours=1), RunEventKind.SUCCEEDED, P, 0),
        (E, T0 + timedelta(hours=1), RunEventKind.SUCCEEDED, P, 0),
        (P, T0 + timedelta(hours=1), RunEventKind.FAILED, E, 1),
        (P, T0 + timedelta(hours=1), RunEventKind.LOST, E, 1),
        (PA, None, RunEventKind.FAILED, PA, 1),
        (C, None, RunEventKind.SUCCEEDED, C, 0),
    ],
    ids=["pending-ok", "error-ok", "failed", "lost", "paused-failed", "completed-ok"],
)
def test_a_manual_run_ends(
    status: TaskStatus, next_at: Any, kind: RunEventKind, after: TaskStatus, failures: int
) -> None:
    task = record(
        "a",
        at=next_at,
        status=status,
        last_execution_time=LAST,
        consecutive_failures=2,
        run_policy=POLICY,
    )
    asked = lifecycle.run_requested(task, T0)
    assert lifecycle.run_requested(asked, T0 + timedelta(seconds=1)) is asked  # asked once
    opened = lifecycle.run_opened(asked, MANUAL, T0, started=True)
    assert opened.run_requested is None
    assert opened.last_execution_time == LAST
    assert opened.status is (R if not status.settled else status)
    done = lifecycle.run_finished(opened, finished(kind), T0, Schedule.of(opened, SHANGHAI))
    assert done.status is after
    assert (done.next_execution_time, done.last_execution_time) == (next_at, LAST)
    assert (done.retry, done.active_run, done.paused_reason) == (None, None, None)
    assert (done.run_count, done.failure_count) == (1, failures)
    assert done.consecutive_failures == 2  # neither counted nor reset


def test_a_manual_run_cut_off_stays_asked_for() -> None:
    opened = lifecycle.run_opened(record("a", run_requested=T0), MANUAL, T0, started=True)
    abandoned = lifecycle.run_abandoned(opened, "m1", T0 + timedelta(minutes=1))
    assert (abandoned.active_run, abandoned.run_requested) == (None, T0)
    assert abandoned.status is P
