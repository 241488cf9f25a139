"""The timeline's maths: window shading, planned runs from the trigger, end dates, past runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from helpers import SHANGHAI, at, record

from scheduler.web.timeline import Span, build_timeline, past_runs, plan_task, window_spans
from tasks.model import TaskStatus

NEW_YORK = ZoneInfo("America/New_York")
DAY = timedelta(hours=24)


@pytest.mark.parametrize(
    ("window", "start", "expected"),
    [
        ((0, 24), at(2026, 1, 8, 7, 0), [(at(2026, 1, 8, 7, 0), at(2026, 1, 9, 7, 0))]),
        ((8, 22), at(2026, 1, 8, 7, 0), [(at(2026, 1, 8, 8, 0), at(2026, 1, 8, 22, 0))]),
        (
            (8, 22),
            at(2026, 1, 8, 9, 30),
            [
                (at(2026, 1, 8, 9, 30), at(2026, 1, 8, 22, 0)),
                (at(2026, 1, 9, 8, 0), at(2026, 1, 9, 9, 30)),
            ],
        ),
        ((22, 6), at(2026, 1, 8, 7, 0), [(at(2026, 1, 8, 22, 0), at(2026, 1, 9, 6, 0))]),
        (
            (22, 6),
            at(2026, 1, 8, 23, 15),
            [
                (at(2026, 1, 8, 23, 15), at(2026, 1, 9, 6, 0)),
                (at(2026, 1, 9, 22, 0), at(2026, 1, 9, 23, 15)),
            ],
        ),
    ],
    ids=["all-day", "day-window", "open-at-start", "overnight", "overnight-open-at-start"],
)
def test_window_spans(
    window: tuple[int, int], start: datetime, expected: list[tuple[datetime, datetime]]
) -> None:
    spans = window_spans(window, SHANGHAI, start, start + DAY)
    assert [(s.start, s.end) for s in spans] == expected


def test_window_spans_across_spring_forward_count_real_hours() -> None:
    # 2026-03-08 in New York: 02:00 EST jumps to 03:00 EDT; the 1-4 window is open 2 real hours.
    start = at(2026, 3, 8, 0, 0, zone=NEW_YORK)
    (span,) = window_spans((1, 4), NEW_YORK, start, start + timedelta(hours=12))
    assert span.start == at(2026, 3, 8, 1, 0, zone=NEW_YORK)
    assert span.end == at(2026, 3, 8, 4, 0, zone=NEW_YORK)
    assert span.end - span.start == timedelta(hours=2)


def test_hourly_task_in_a_day_window_plans_each_hour_of_the_window() -> None:
    now = at(2026, 1, 8, 7, 0)
    line = plan_task(record("t", at=at(2026, 1, 8, 8, 0)), SHANGHAI, now)
    assert line.planned == [at(2026, 1, 8, hour, 0) for hour in range(8, 22)]
    assert line.windows == [Span(at(2026, 1, 8, 8, 0), at(2026, 1, 8, 22, 0))]
    assert line.band == []
    assert line.end is None


def test_end_date_inside_the_horizon_stops_the_plan_and_is_marked() -> None:
    now = at(2026, 1, 8, 7, 0)
    task = record(
        "t", at=at(2026, 1, 8, 20, 0), valid_time_range=(0, 24), task_end_time=date(2026, 1, 8)
    )
    line = plan_task(task, SHANGHAI, now)
    assert line.planned == [
        at(2026, 1, 8, 20, 0),
        at(2026, 1, 8, 21, 0),
        at(2026, 1, 8, 22, 0),
        at(2026, 1, 8, 23, 0),
    ]
    assert line.end == at(2026, 1, 9, 0, 0) - timedelta(microseconds=1)


def test_dense_task_is_a_band_over_its_open_window() -> None:
    now = at(2026, 1, 8, 7, 0)
    line = plan_task(record("t", at=at(2026, 1, 8, 8, 0), interval=2), SHANGHAI, now)
    assert line.planned == []
    assert line.band == [Span(at(2026, 1, 8, 8, 0), at(2026, 1, 8, 22, 0))]


@pytest.mark.parametrize("status", [TaskStatus.PAUSED, TaskStatus.COMPLETED])
def test_paused_and_completed_tasks_plan_nothing(status: TaskStatus) -> None:
    line = plan_task(record("t", status=status), SHANGHAI, at(2026, 1, 8, 7, 0))
    assert line.planned == []
    assert line.band == []
    assert line.windows  # the window is still drawn


def test_an_overdue_first_run_still_shows() -> None:
    now = at(2026, 1, 8, 9, 0, 30)
    line = plan_task(record("t", at=at(2026, 1, 8, 9, 0)), SHANGHAI, now)
    assert line.planned[:2] == [at(2026, 1, 8, 9, 0), at(2026, 1, 8, 10, 0)]


@dataclass
class Entry:
    task_id: str
    started_at: datetime | None
    finished_at: datetime | None
    outcome: str


def test_past_runs_keep_the_last_day_per_task_oldest_first() -> None:
    now = at(2026, 1, 8, 12, 0)
    entries = [
        Entry("a", at(2026, 1, 8, 11, 0), at(2026, 1, 8, 11, 1), "failed"),
        Entry("a", at(2026, 1, 8, 10, 0), at(2026, 1, 8, 10, 1), "succeeded"),
        Entry("a", at(2026, 1, 7, 11, 0), at(2026, 1, 7, 11, 1), "succeeded"),
        Entry("b", None, None, "lost"),
    ]
    runs = past_runs(entries, now - DAY)
    assert list(runs) == ["a"]
    assert [(r.start.hour, r.outcome) for r in runs["a"]] == [(10, "succeeded"), (11, "failed")]


def test_build_timeline_lanes_follow_account_order() -> None:
    now = at(2026, 1, 8, 7, 0)
    records = [record("x", account="b"), record("y", account="a"), record("z", account="a")]
    timeline = build_timeline(records, {"b": ["x"], "a": ["z", "y"]}, SHANGHAI, now)
    assert [(a, [line.task_id for line in lines]) for a, lines in timeline.accounts.items()] == [
        ("a", ["z", "y"]),
        ("b", ["x"]),
    ]
    assert timeline.fraction(now) == 0.5
    assert timeline.fraction(now + 2 * DAY) == 1.0
