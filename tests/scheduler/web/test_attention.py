"""What needs attention, as pure functions of ``now``: failing and overdue tasks, the summary
counts and the order of the lanes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from helpers import at, record

from scheduler.web.views import Filters, attention, failing, overdue
from tasks.model import ActiveRun, TaskStatus

NOW = at(2026, 1, 8, 9, 0)
RUN = ActiveRun(run_id="r-1", scheduled_at=NOW, submitted_at=NOW, started_at=NOW)


@pytest.mark.parametrize(
    ("changes", "is_failing", "is_overdue"),
    [
        ({"at": NOW + timedelta(minutes=5)}, False, False),
        ({"at": NOW - timedelta(seconds=30)}, False, False),  # within the minute's grace
        ({"at": NOW - timedelta(minutes=5)}, False, True),
        ({"at": NOW - timedelta(minutes=5), "active_run": RUN}, False, False),
        ({"at": NOW - timedelta(minutes=5), "status": TaskStatus.PAUSED}, False, False),
        (
            # A jittered start still to come is not overdue.
            {"at": NOW - timedelta(minutes=5), "next_start_time": NOW + timedelta(minutes=1)},
            False,
            False,
        ),
        ({"status": TaskStatus.ERROR, "run_count": 1, "last_error": "x"}, True, False),
        ({"consecutive_failures": 2, "run_count": 2, "last_error": "x"}, True, False),
        ({"run_count": 3, "last_error": "stale, the last run succeeded"}, False, False),
        ({"status": TaskStatus.PAUSED, "paused_reason": "3 failed runs in a row"}, True, False),
        ({"status": TaskStatus.COMPLETED, "consecutive_failures": 1, "run_count": 1}, False, False),
    ],
    ids=[
        "ahead",
        "grace",
        "overdue",
        "running",
        "paused",
        "jittered",
        "error",
        "failing-streak",
        "stale-error",
        "auto-paused",
        "completed",
    ],
)
def test_failing_and_overdue(changes: dict[str, Any], is_failing: bool, is_overdue: bool) -> None:
    task = record("t", at=changes.pop("at", NOW + timedelta(hours=1)), **changes)
    assert (failing(task), overdue(task, NOW)) == (is_failing, is_overdue)
    assert Filters(attention="failing").matches(task, NOW) is is_failing
    assert Filters(attention="overdue").matches(task, NOW) is is_overdue
    summary = attention([task], NOW)
    assert summary.overdue == int(is_overdue)
    assert summary.failing_accounts == int(is_failing)


def test_lanes_order_failing_then_overdue_then_paused_then_the_rest() -> None:
    late = NOW - timedelta(minutes=10)
    ahead = NOW + timedelta(hours=1)
    tasks = [
        record("a", account="a-calm", at=ahead),
        record("p", account="b-paused", at=ahead, status=TaskStatus.PAUSED),
        record("o", account="c-late", at=late),
        record("f", account="d-failing", at=ahead, status=TaskStatus.ERROR, run_count=1),
        record("f2", account="d-failing", at=ahead, status=TaskStatus.PAUSED),
        record("o2", account="d-failing", at=late),
    ]
    summary = attention(tasks, NOW)
    order = summary.order(["a-calm", "b-paused", "c-late", "d-failing"])
    assert order == ["d-failing", "c-late", "b-paused", "a-calm"]
    assert summary.reason("d-failing") == "1 failing, 1 overdue, 1 paused"
    assert summary.reason("a-calm") == ""
    assert summary.by_status == {
        "pending": 3,
        "running": 0,
        "paused": 2,
        "completed": 0,
        "error": 1,
    }
    assert summary.overdue == 2
