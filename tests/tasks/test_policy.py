"""The policy rules as tables: jitter bounds (windows, ends, DST), retry times, auto-pause."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import SHANGHAI, T0, at, record
from pydantic import ValidationError

from tasks import lifecycle
from tasks.model import ActiveRun, PendingRetry, TaskStatus
from tasks.policy import (
    RunPolicy,
    jitter_bounds,
    jittered_start,
    pause_due,
    retry_delay,
    retry_time,
)
from tasks.runs import RunEvent, RunEventKind
from tasks.schedule import Schedule, window_closing

NEW_YORK = ZoneInfo("America/New_York")
S = timedelta(seconds=1)
US = timedelta(microseconds=1)


def ny(*args: int) -> datetime:
    return at(*args, zone=NEW_YORK)


def schedule(zone: ZoneInfo = SHANGHAI, **changes: Any) -> Schedule:
    return Schedule.of(record("x", **changes), zone)


@pytest.mark.parametrize(
    ("rules", "zone", "planned", "jitter", "latest"),
    [
        # all day: planned + jitter
        ({"valid_time_range": (0, 24)}, SHANGHAI, at(2026, 1, 8, 10), 300, at(2026, 1, 8, 10, 5)),
        # inside the window
        ({}, SHANGHAI, at(2026, 1, 8, 10), 300, at(2026, 1, 8, 10, 5)),
        # cut at the window's close
        ({}, SHANGHAI, at(2026, 1, 8, 21, 50), 1800, at(2026, 1, 8, 22) - US),
        # a window across midnight closes the next morning
        (
            {"valid_time_range": (22, 6)},
            SHANGHAI,
            at(2026, 1, 8, 5, 59),
            600,
            at(2026, 1, 8, 6) - US,
        ),
        (
            {"valid_time_range": (22, 6)},
            SHANGHAI,
            at(2026, 1, 8, 23, 0),
            600,
            at(2026, 1, 8, 23, 10),
        ),
        # cut at the end datetime
        (
            {"task_end_time": at(2026, 1, 8, 10, 2)},
            SHANGHAI,
            at(2026, 1, 8, 10),
            300,
            at(2026, 1, 8, 10, 2),
        ),
        # cut at the end of the end date
        (
            {"task_end_time": date(2026, 1, 8), "valid_time_range": (0, 24)},
            SHANGHAI,
            at(2026, 1, 8, 23, 58),
            600,
            at(2026, 1, 9) - US,
        ),
        # never at or after the next planned run (interval 3600)
        (
            {"valid_time_range": (0, 24)},
            SHANGHAI,
            at(2026, 1, 8, 10),
            7200,
            at(2026, 1, 8, 11) - US,
        ),
        # DST, spring forward: 01:00-02:00 EST, then 03:00 EDT; a window closing at 2 closes
        # at the transition
        (
            {"valid_time_range": (0, 2)},
            NEW_YORK,
            ny(2026, 3, 8, 1, 50),
            1800,
            ny(2026, 3, 8, 3).astimezone(UTC) - US,
        ),
        # DST, fall back: the window (0, 2) holds both 01:xx hours, and closes at 02:00 EST
        (
            {"valid_time_range": (0, 2)},
            NEW_YORK,
            datetime(2026, 11, 1, 1, 50, tzinfo=NEW_YORK, fold=1),
            1800,
            ny(2026, 11, 1, 2).astimezone(UTC) - US,
        ),
        (
            {"valid_time_range": (0, 2)},
            NEW_YORK,
            datetime(2026, 11, 1, 1, 50, tzinfo=NEW_YORK, fold=0),
            1800,
            datetime(2026, 11, 1, 1, 20, tzinfo=NEW_YORK, fold=1),
        ),
    ],
)
def test_jitter_bounds(
    rules: dict[str, Any], zone: ZoneInfo, planned: datetime, jitter: float, latest: datetime
) -> None:
    earliest, found = jitter_bounds(planned, jitter, schedule(zone, **rules))
    assert earliest == planned
    assert found.timestamp() == pytest.approx(latest.timestamp(), abs=1e-6)


@pytest.mark.parametrize(
    ("fraction", "start"),
    [(0.0, at(2026, 1, 8, 10)), (0.5, at(2026, 1, 8, 10, 2, 30)), (1.0, at(2026, 1, 8, 10, 5))],
)
def test_jittered_start_in_whole_seconds(fraction: float, start: datetime) -> None:
    assert jittered_start(at(2026, 1, 8, 10), 300, schedule(), fraction) == start


def test_jittered_start_at_a_cut_stays_inside() -> None:
    found = jittered_start(at(2026, 1, 8, 21, 50), 1800, schedule(), 1.0)
    assert found == at(2026, 1, 8, 21, 59, 59)


def test_window_closing_all_day_is_none() -> None:
    assert window_closing(T0, (0, 24), SHANGHAI) is None
    assert window_closing(at(2026, 1, 8, 23), (8, 22), SHANGHAI) == at(2026, 1, 8, 23)


@pytest.mark.parametrize(
    ("policy", "attempt", "delay"),
    [
        ({"retry_delay": 60}, 1, 60),
        ({"retry_delay": 60}, 2, 120),
        ({"retry_delay": 60}, 3, 240),
        ({"retry_delay": 60, "retry_backoff": 1}, 5, 60),
        ({"retry_delay": 60, "retry_max_delay": 200}, 3, 200),
        ({"retry_delay": 60, "retry_backoff": 100}, 100, 3600),  # capped, no overflow
    ],
)
def test_retry_delay(policy: dict[str, Any], attempt: int, delay: float) -> None:
    assert retry_delay(RunPolicy(retries=10, **policy), attempt) == timedelta(seconds=delay)


@pytest.mark.parametrize(
    ("policy", "attempt", "rules", "next_start", "now", "expected"),
    [
        # retries left, inside the window, before the next run
        ({"retries": 2}, 1, {}, at(2026, 1, 8, 11), at(2026, 1, 8, 10), at(2026, 1, 8, 10, 1)),
        ({"retries": 2}, 2, {}, at(2026, 1, 8, 11), at(2026, 1, 8, 10), at(2026, 1, 8, 10, 2)),
        # used up
        ({"retries": 2}, 3, {}, at(2026, 1, 8, 11), at(2026, 1, 8, 10), None),
        ({}, 1, {}, at(2026, 1, 8, 11), at(2026, 1, 8, 10), None),
        # at or after the next planned run: none
        (
            {"retries": 1, "retry_delay": 3600},
            1,
            {},
            at(2026, 1, 8, 11),
            at(2026, 1, 8, 10),
            None,
        ),
        # outside the window: at its opening, if that is before the next run
        (
            {"retries": 1, "retry_delay": 1200},
            1,
            {"interval": 86400},
            at(2026, 1, 9, 21, 50),
            at(2026, 1, 8, 21, 50),
            at(2026, 1, 9, 8),
        ),
        (
            {"retries": 1, "retry_delay": 1200},
            1,
            {},
            at(2026, 1, 9, 8),
            at(2026, 1, 8, 21, 50),
            None,
        ),
        # past the end: none
        (
            {"retries": 1},
            1,
            {"task_end_time": at(2026, 1, 8, 10, 0, 30)},
            None,
            at(2026, 1, 8, 10),
            None,
        ),
        # no next run (the last before the end): until the end
        (
            {"retries": 1},
            1,
            {"task_end_time": date(2026, 1, 8)},
            None,
            at(2026, 1, 8, 10),
            at(2026, 1, 8, 10, 1),
        ),
    ],
)
def test_retry_time(
    policy: dict[str, Any],
    attempt: int,
    rules: dict[str, Any],
    next_start: datetime | None,
    now: datetime,
    expected: datetime | None,
) -> None:
    found = retry_time(RunPolicy(**policy), attempt, schedule(**rules), next_start, now)
    assert found == expected


@pytest.mark.parametrize(
    ("limit", "failures", "due"), [(None, 99, False), (3, 2, False), (3, 3, True)]
)
def test_pause_due(limit: int | None, failures: int, due: bool) -> None:
    assert pause_due(RunPolicy(pause_after_failures=limit), failures) is due


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"jitter": -1}, "jitter"),
        ({"retries": -1}, "retries"),
        ({"retry_delay": 0}, "retry_delay"),
        ({"retry_backoff": 0.9}, "retry_backoff"),
        ({"run_timeout": 0}, "run_timeout"),
        ({"pause_after_failures": 0}, "pause_after_failures"),
        ({"retires": 1}, "retires"),
    ],
)
def test_bad_policy_values_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RunPolicy(**values)
    assert caught.value.errors()[0]["loc"] == (field,)


# ---------------------------------------------------------------------- lifecycle

RUN = ActiveRun(run_id="r1", scheduled_at=T0, submitted_at=T0, started_at=T0)
FAILED = RunEvent("r1", "a", RunEventKind.FAILED, at=T0, error="E: x", started_at=T0)
OK = RunEvent("r1", "a", RunEventKind.SUCCEEDED, at=T0, started_at=T0)
HOUR = timedelta(hours=1)


def running(**changes: Any) -> Any:
    fields: dict[str, Any] = {"status": TaskStatus.RUNNING, "active_run": RUN, "at": T0 + HOUR}
    fields.update(changes)
    return record("a", **fields)


@pytest.mark.parametrize(
    ("before", "event", "after"),
    [
        # a retry is planned: pending, not counted as failed, no error
        (
            {"run_policy": RunPolicy(retries=1)},
            FAILED,
            (TaskStatus.PENDING, 1, 0, 0, None, T0 + timedelta(minutes=1)),
        ),
        # no policy: error
        ({}, FAILED, (TaskStatus.ERROR, 1, 1, 1, "E: x", None)),
        # the last attempt: error
        (
            {
                "run_policy": RunPolicy(retries=1),
                "active_run": RUN.model_copy(update={"attempt": 2}),
            },
            FAILED,
            (TaskStatus.ERROR, 1, 1, 1, "E: x", None),
        ),
        # the n-th failure in a row pauses, with its reason
        (
            {"run_policy": RunPolicy(pause_after_failures=2), "consecutive_failures": 1},
            FAILED,
            (TaskStatus.PAUSED, 1, 1, 2, "E: x", None),
        ),
        # a success resets the count
        (
            {"run_policy": RunPolicy(pause_after_failures=2), "consecutive_failures": 1},
            OK,
            (TaskStatus.PENDING, 1, 0, 0, None, None),
        ),
    ],
)
def test_run_finished_with_policies(
    before: dict[str, Any], event: RunEvent, after: tuple[Any, ...]
) -> None:
    old = running(**before)
    new = lifecycle.run_finished(old, event, T0, schedule())
    retry_at = new.retry.at if new.retry else None
    assert (
        new.status,
        new.run_count,
        new.failure_count,
        new.consecutive_failures,
        new.last_error,
        retry_at,
    ) == after
    if new.status is TaskStatus.PAUSED:
        assert new.paused_reason == "2 failed runs in a row; the last: E: x"
        assert new.next_execution_time is None


def test_a_retry_opens_and_is_cleared() -> None:
    retry = PendingRetry(at=T0, attempt=2, scheduled_at=T0)
    opened = lifecycle.run_opened(record("a", retry=retry), RUN, T0, started=True)
    assert opened.retry is None


@pytest.mark.parametrize(
    ("status", "last", "rules", "now", "expected"),
    [
        # re-planned from the last run
        (
            TaskStatus.PENDING,
            T0,
            {"interval": 7200},
            T0 + HOUR,
            (TaskStatus.PENDING, T0 + 2 * HOUR),
        ),
        # into a later window
        (
            TaskStatus.ERROR,
            T0,
            {"valid_time_range": (12, 22)},
            T0 + HOUR / 2,
            (TaskStatus.ERROR, at(2026, 1, 8, 12)),
        ),
        # completed with a run left: pending
        (TaskStatus.COMPLETED, T0, {}, T0 + HOUR / 2, (TaskStatus.PENDING, T0 + HOUR)),
        # paused stays paused, with no next run
        (TaskStatus.PAUSED, T0, {"interval": 60}, T0, (TaskStatus.PAUSED, None)),
    ],
)
def test_edited(
    status: TaskStatus,
    last: datetime,
    rules: dict[str, Any],
    now: datetime,
    expected: tuple[Any, ...],
) -> None:
    retry = PendingRetry(at=T0, attempt=2, scheduled_at=T0)
    old = record(
        "a",
        status=status,
        last_execution_time=last,
        at=None if status.settled else T0 + HOUR,
        retry=None if status.settled else retry,
        run_count=5,
    )
    new_rules = record("a", **rules)
    new = lifecycle.edited(old, new_rules, schedule(**rules), now)
    assert (new.status, new.next_execution_time) == expected
    assert (new.retry, new.run_count, new.interval) == (None, 5, new_rules.interval)


@pytest.mark.parametrize(
    ("policy", "start", "fraction", "expected"),
    [
        (None, None, 0.5, None),
        (RunPolicy(jitter=600), None, 0.5, T0 + timedelta(minutes=5)),
        # a start drawn already for this run is kept
        (RunPolicy(jitter=600), T0 + timedelta(minutes=9), 0.0, T0 + timedelta(minutes=9)),
        # one outside the bounds (drawn for another run) is drawn again
        (RunPolicy(jitter=600), T0 + HOUR, 0.0, T0),
        # no jitter: none
        (None, T0 + timedelta(minutes=9), 0.5, None),
    ],
)
def test_jittered(
    policy: RunPolicy | None, start: datetime | None, fraction: float, expected: datetime | None
) -> None:
    old = record("a", run_policy=policy, next_start_time=start)
    assert lifecycle.jittered(old, schedule(), fraction).next_start_time == expected
