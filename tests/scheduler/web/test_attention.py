"""What needs attention, as pure functions of ``now``: failing and overdue tasks, the summary
counts and the order of the lanes."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import httpx
import pytest
from helpers import Recorder, at, record

from scheduler import LocalRunBackend, TaskDispatcher
from scheduler.web import dashboard_app
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


class _FleetLike(LocalRunBackend):
    """The local backend, reporting live workers per sys_type as a fleet backend does."""

    def __init__(self, workers: dict[str, list[str]], factory: Recorder) -> None:
        super().__init__(factory)
        self.workers = workers

    def health(self) -> Mapping[str, Any]:
        return {"connected": True, "workers": self.workers}


async def test_the_summary_bar_counts_and_names_workers_per_sys_type(
    make_dispatcher: Callable[..., TaskDispatcher], recorder: Recorder
) -> None:
    backend = _FleetLike({"mac": ["mac-01", "mac-02"], "win": ["win-01"]}, recorder)
    dispatcher = make_dispatcher(run_backend=backend)
    for task_id, account in (("t-1", "b"), ("t-2", "a"), ("t-3", "a")):
        await dispatcher.add_task(
            sys_type="mac", task_type="xhs", account_id=account, interval=3600, task_id=task_id
        )
    dispatcher.pause_task("t-1")
    app = dashboard_app(dispatcher)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8765"
    ) as http:
        page = (await http.get("/")).text
        alphabetical = (await http.get("/?sort=az")).text
    assert ">3 tasks</a>" in page
    assert 'data-count="paused" >1 paused</a>' in page
    assert "2 worker(s) for mac" in page
    assert "1 worker(s) for win" in page
    lanes = re.findall(r'<section class="lane"[^>]*data-account="([^"]+)"', page)
    assert lanes == ["b", "a"]  # the paused account first
    assert re.findall(r'<section class="lane"[^>]*data-account="([^"]+)"', alphabetical) == [
        "a",
        "b",
    ]
    assert "Needs attention: 1 paused" in page
