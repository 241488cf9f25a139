"""Why a task waits, as a pure function of the record, ``now`` and what a running dispatcher
knows: one row per kind, and the order in which they win."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from helpers import SHANGHAI, at, record

from tasks.model import ActiveRun, PendingRetry, TaskStatus
from tasks.waiting import WAIT_KINDS, WaitContext, Waiting, why_waiting

NOW = at(2026, 1, 8, 9, 0)
SENT = NOW - timedelta(minutes=3)
QUEUED = ActiveRun(run_id="r-q", scheduled_at=SENT, submitted_at=SENT)
EXECUTING = ActiveRun(run_id="r-x", scheduled_at=SENT, submitted_at=SENT, started_at=SENT)
HOLDER = record("h", active_run=EXECUTING, status=TaskStatus.RUNNING)
DOWN = at(2026, 1, 8, 8, 58)

LIVE = WaitContext(live=True)
LANE = WaitContext(live=True, lane_queued={"t"}, lane_holder={"acc": HOLDER}.get)
NO_WORKER = WaitContext(live=True, workers={"mac_intel": []})
BUSY = WaitContext(live=True, workers={"mac_intel": ["w1@m", "w2@m"]})
OUTAGE = WaitContext(
    live=True, broker_down_since=DOWN, broker="redis://:***@broker:6379/0", workers={}
)


def why(context: WaitContext | None = None, **changes: Any) -> Waiting | None:
    return why_waiting(record("t", **changes), NOW, SHANGHAI, context)


CASES: list[tuple[str, dict[str, Any], WaitContext | None, str | None, str]] = [
    # id, record changes, context, kind, words in the message
    ("ahead", {"at": NOW + timedelta(minutes=5)}, LIVE, None, ""),
    ("completed", {"status": TaskStatus.COMPLETED, "at": None}, LIVE, None, ""),
    ("paused", {"status": TaskStatus.PAUSED, "at": None}, LIVE, "paused", "until it is resumed"),
    (
        "paused after failures",
        {
            "status": TaskStatus.PAUSED,
            "at": None,
            "paused_reason": "3 failed runs in a row; the last: exit 1",
        },
        LIVE,
        "paused_after_failures",
        "after 3 failed runs in a row; the last: exit 1",
    ),
    (
        "a pause wins over a run out",
        {"status": TaskStatus.PAUSED, "at": None, "active_run": EXECUTING},
        LIVE,
        "paused",
        "paused",
    ),
    (
        "executing",
        {"status": TaskStatus.RUNNING, "active_run": EXECUTING, "at": None},
        LIVE,
        "running",
        "run r-x executing since 2026-01-08 08:57:00",
    ),
    (
        "queued, workers unknown",
        {"active_run": QUEUED, "at": None},
        LIVE,
        "queued",
        "run r-q queued since 2026-01-08 08:57:00, waiting for a mac_intel worker to claim it",
    ),
    (
        "queued, no worker",
        {"active_run": QUEUED, "at": None},
        NO_WORKER,
        "no_worker",
        "waiting for a mac_intel worker: none is registered (start one: task-dispatcher "
        "worker --sys-type mac_intel)",
    ),
    (
        "queued, workers busy",
        {"active_run": QUEUED, "at": None},
        BUSY,
        "queued",
        "registered w1@m, w2@m (busy, or its message waits its turn)",
    ),
    (
        "broker outage, queued",
        {"active_run": QUEUED, "at": None},
        OUTAGE,
        "broker_outage",
        "the broker redis://:***@broker:6379/0 is unreachable since 2026-01-08 08:58:00",
    ),
    (
        "broker outage, due",
        {"at": NOW - timedelta(minutes=1)},
        OUTAGE,
        "broker_outage",
        "runs cannot be sent",
    ),
    ("broker outage, not due", {"at": NOW + timedelta(minutes=1)}, OUTAGE, None, ""),
    (
        "lane behind another task's run",
        {"at": NOW - timedelta(seconds=5)},
        LANE,
        "lane",
        "its due run waits for account acc's lane, behind task h's run r-x "
        "(executing since 2026-01-08 08:57:00)",
    ),
    (
        "lane, holder unknown",
        {"at": NOW - timedelta(seconds=5)},
        WaitContext(live=True, lane_queued={"t"}),
        "lane",
        "or a free run slot",
    ),
    (
        "retry",
        {
            "at": None,
            "retry": PendingRetry(at=NOW + timedelta(minutes=2), attempt=2, scheduled_at=SENT),
        },
        LIVE,
        "retry",
        "retry (attempt 2) of the run planned at 2026-01-08 08:57:00 at 2026-01-08 09:02:00",
    ),
    (
        "run asked for, stopped store",
        {"at": NOW + timedelta(hours=1), "run_requested": NOW - timedelta(minutes=1)},
        None,
        "requested",
        "a run asked for at 2026-01-08 08:59:00 runs once the dispatcher runs",
    ),
    (
        "jittered",
        {"at": NOW - timedelta(minutes=1), "next_start_time": NOW + timedelta(minutes=4)},
        LIVE,
        "jitter",
        "jittered: starts 2026-01-08 09:04:00",
    ),
    (
        "due, live",
        {"at": NOW - timedelta(minutes=2)},
        LIVE,
        "due",
        "due since 2026-01-08 08:58:00, not sent yet",
    ),
    (
        "due, stopped store",
        {"at": NOW - timedelta(minutes=2)},
        None,
        "due",
        "overdue: runs as soon as the dispatcher runs",
    ),
    (
        "outside its hours, next run at the opening",
        {"at": at(2026, 1, 8, 10, 0), "valid_time_range": (10, 18)},
        LIVE,
        "outside_hours",
        "outside its hours (10-18) until 2026-01-08 10:00:00",
    ),
    (
        "due, but the window closed",
        {"at": at(2026, 1, 7, 21, 0), "valid_time_range": (20, 22)},
        None,
        "outside_hours",
        "overdue: outside its hours now, next run 2026-01-08 20:00:00",
    ),
    (
        "due, past its end",
        {"at": at(2026, 1, 7, 21, 0), "task_end_time": at(2026, 1, 7, 22, 0)},
        None,
        "past_end",
        "overdue: past its end, completed when the dispatcher runs",
    ),
    (
        "a secret in the reason is masked",
        {
            "status": TaskStatus.PAUSED,
            "at": None,
            "paused_reason": "3 failed runs in a row; the last: GET https://u:hunter2@h/x",
        },
        LIVE,
        "paused_after_failures",
        "https://u:***@h/x",
    ),
]


@pytest.mark.parametrize(
    ("changes", "context", "kind", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_why_a_task_waits(
    changes: dict[str, Any], context: WaitContext | None, kind: str | None, words: str
) -> None:
    waiting = why(context, **changes)
    if kind is None:
        assert waiting is None
        return
    assert waiting is not None
    assert (waiting.kind, words in waiting.message) == (kind, True), waiting.message
    assert "hunter2" not in waiting.message


def test_every_kind_has_a_case() -> None:
    assert {case[3] for case in CASES} - {None} == set(WAIT_KINDS)


def test_times_say_since_and_until() -> None:
    retry = PendingRetry(at=NOW + timedelta(minutes=2), attempt=2, scheduled_at=SENT)
    assert why(LIVE, at=None, retry=retry) == Waiting(
        "retry",
        "retry (attempt 2) of the run planned at 2026-01-08 08:57:00 at 2026-01-08 09:02:00",
        until=NOW + timedelta(minutes=2),
    )
    queued = why(LIVE, active_run=QUEUED, at=None)
    assert queued is not None
    assert (queued.since, queued.until) == (SENT, None)


def test_the_json_form_reads_back() -> None:
    waiting = why(OUTAGE, active_run=QUEUED, at=None)
    assert waiting is not None
    data = waiting.to_json()
    assert data["since"] == DOWN.isoformat()
    assert Waiting.of(data) == waiting
    assert isinstance(Waiting.of(data).since, datetime)
