"""The timeline's axis (dates at midnight and at the start, hours stepped by span) and its
error badge, as pure functions of ``now``."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from helpers import SHANGHAI, at, record

from scheduler.web.timeline import SPANS, axis_ticks, plan_task
from tasks.model import TaskStatus

NEW_YORK = ZoneInfo("America/New_York")


def labels(span: str, now_hour: int, zone: ZoneInfo = SHANGHAI) -> list[tuple[str, str]]:
    now = at(2026, 1, 8, now_hour, 20, zone=zone)
    horizon = SPANS[span]
    return [(t.kind, t.label) for t in axis_ticks(now - horizon, now + horizon, zone)]


def test_a_6h_span_labels_every_hour_and_the_midnight_date() -> None:
    found = labels("6h", 3)
    assert found[0] == ("day", "Wed 01-07")  # the axis starts 21:20 the day before
    assert found[1:5] == [
        ("hour", "22:00"),
        ("hour", "23:00"),
        ("day", "Thu 01-08"),
        ("hour", "01:00"),
    ]
    assert found[-1] == ("hour", "09:00")
    assert len(found) == 1 + 12


def test_a_24h_span_labels_every_third_hour() -> None:
    found = labels("24h", 12)
    assert found[0] == ("day", "Wed 01-07")
    hours = [label for kind, label in found if kind == "hour"]
    assert hours[:3] == ["15:00", "18:00", "21:00"]
    assert [label for kind, label in found if kind == "day"] == [
        "Wed 01-07",
        "Thu 01-08",
        "Fri 01-09",
    ]


def test_a_week_labels_every_sixth_hour_and_each_midnight() -> None:
    found = labels("7d", 12)
    days = [label for kind, label in found if kind == "day"]
    assert (days[0], days[-1]) == ("Thu 01-01", "Thu 01-15")
    assert len(days) == 1 + 14
    assert {label for kind, label in found if kind == "hour"} == {"06:00", "12:00", "18:00"}


def test_ranks_keep_dates_then_the_coarser_hours_first() -> None:
    now = at(2026, 1, 8, 12, 0)
    ticks = axis_ticks(now - SPANS["6h"], now + SPANS["6h"], SHANGHAI)
    rank = {t.label: t.rank for t in ticks}
    assert (rank["Thu 01-08"], rank["12:00"], rank["06:00"], rank["09:00"], rank["07:00"]) == (
        0,
        1,
        2,
        3,
        4,
    )


def test_a_clock_change_labels_the_wall_time() -> None:
    # 2026-03-08 in New York: 02:00 EST jumps to 03:00 EDT.
    now = at(2026, 3, 8, 3, 0, zone=NEW_YORK)
    ticks = axis_ticks(now - timedelta(hours=6), now + timedelta(hours=6), NEW_YORK)
    hours = [t.label for t in ticks if t.kind == "hour"]
    assert "02:00" not in hours
    assert hours[hours.index("01:00") + 1] == "03:00"


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ({}, "never"),
        ({"run_count": 3, "consecutive_failures": 0, "last_error": "old"}, "succeeded"),
        ({"run_count": 3, "consecutive_failures": 2, "last_error": "boom"}, "failed"),
        ({"run_count": 1, "status": TaskStatus.ERROR, "last_error": "manual run failed"}, "failed"),
    ],
    ids=["never-ran", "stale-error-after-success", "failing", "error-status"],
)
def test_the_error_badge_follows_the_last_outcome(changes: dict[str, object], outcome: str) -> None:
    task = record("t", at=at(2026, 1, 8, 8, 0)).replace(**changes)
    assert plan_task(task, SHANGHAI, at(2026, 1, 8, 7, 0)).outcome == outcome


def test_a_week_draws_hourly_tasks_as_a_band() -> None:
    now = at(2026, 1, 8, 7, 0)
    hourly = record("t", at=at(2026, 1, 8, 8, 0))
    assert plan_task(hourly, SHANGHAI, now).planned
    week = plan_task(hourly, SHANGHAI, now, SPANS["7d"])
    assert (week.planned, bool(week.band)) == ([], True)
