"""Window, end-date and next-run maths as tables: no scheduler, no clock patching."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from scheduler.triggers import (
    TaskTrigger,
    end_instant,
    in_window,
    may_start,
    next_run,
    resolve_wall_time,
    same_instant,
    upcoming_runs,
    window_opening,
)

SH = ZoneInfo("Asia/Shanghai")
NY = ZoneInfo("America/New_York")
BER = ZoneInfo("Europe/Berlin")
HOUR = timedelta(hours=1)
DAY = timedelta(hours=24)


def local(zone: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=zone, fold=fold)  # type: ignore[misc, arg-type]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc, arg-type]


@pytest.mark.parametrize(
    ("window", "hour", "minute", "expected"),
    [
        ((8, 22), 7, 59, False),
        ((8, 22), 8, 0, True),
        ((8, 22), 21, 59, True),
        ((8, 22), 22, 0, False),
        ((22, 6), 21, 59, False),
        ((22, 6), 22, 0, True),
        ((22, 6), 23, 30, True),
        ((22, 6), 0, 0, True),
        ((22, 6), 5, 59, True),
        ((22, 6), 6, 0, False),
        ((22, 6), 12, 0, False),
        ((0, 24), 0, 0, True),
        ((0, 24), 23, 59, True),
        ((0, 1), 0, 59, True),
        ((0, 1), 1, 0, False),
        ((23, 24), 23, 0, True),
        ((23, 24), 0, 0, False),
    ],
)
def test_in_window(window: tuple[int, int], hour: int, minute: int, expected: bool) -> None:
    assert in_window(local(SH, 2026, 1, 8, hour, minute), window, SH) is expected


@pytest.mark.parametrize(
    ("zone", "t", "window", "expected"),
    [
        # Inside: the instant itself.
        (SH, local(SH, 2026, 1, 8, 10, 0), (8, 22), local(SH, 2026, 1, 8, 10, 0)),
        # Before the window: today's opening.
        (SH, local(SH, 2026, 1, 8, 7, 0), (8, 22), local(SH, 2026, 1, 8, 8, 0)),
        # After it: tomorrow's opening.
        (SH, local(SH, 2026, 1, 8, 22, 0), (8, 22), local(SH, 2026, 1, 9, 8, 0)),
        # Wrap-around window: the evening opening, or the instant while open past midnight.
        (SH, local(SH, 2026, 1, 8, 6, 0), (22, 6), local(SH, 2026, 1, 8, 22, 0)),
        (SH, local(SH, 2026, 1, 9, 3, 0), (22, 6), local(SH, 2026, 1, 9, 3, 0)),
        # Spring forward, New York 2026-03-08 02:00 EST -> 03:00 EDT: the 2 o'clock opening
        # does not exist, so the window opens at the first instant after the gap.
        (NY, local(NY, 2026, 3, 8, 1, 30), (2, 6), utc(2026, 3, 8, 7, 0)),
        # Spring forward, Berlin 2026-03-29 02:00 CET -> 03:00 CEST.
        (BER, local(BER, 2026, 3, 29, 0, 30), (2, 22), utc(2026, 3, 29, 1, 0)),
        # A window lying wholly in the skipped hour opens the next day.
        (BER, local(BER, 2026, 3, 29, 0, 30), (2, 3), local(BER, 2026, 3, 30, 2, 0)),
        # Fall back, Berlin 2026-10-25 03:00 CEST -> 02:00 CET: the first 02:00 counts.
        (BER, local(BER, 2026, 10, 25, 1, 30), (2, 5), utc(2026, 10, 25, 0, 0)),
        # Fall back, New York 2026-11-01 02:00 EDT -> 01:00 EST: the first 01:00 counts.
        (NY, local(NY, 2026, 11, 1, 0, 30), (1, 5), utc(2026, 11, 1, 5, 0)),
        # Inside the repeated hour (second occurrence), already open.
        (NY, local(NY, 2026, 11, 1, 1, 30, fold=1), (1, 5), utc(2026, 11, 1, 6, 30)),
    ],
)
def test_window_opening(
    zone: ZoneInfo, t: datetime, window: tuple[int, int], expected: datetime
) -> None:
    opening = window_opening(t, window, zone)
    # Compare instants in UTC: PEP 495 makes == across zones False for ambiguous times.
    assert opening.astimezone(UTC) == expected.astimezone(UTC)
    assert in_window(opening, window, zone)


@pytest.mark.parametrize(
    ("wall", "zone", "expected"),
    [
        (datetime(2026, 1, 8, 8, 0), SH, utc(2026, 1, 8, 0, 0)),
        (datetime(2026, 3, 8, 2, 0), NY, utc(2026, 3, 8, 7, 0)),  # gap: the transition
        (datetime(2026, 3, 8, 2, 30), NY, utc(2026, 3, 8, 7, 0)),  # gap: the transition
        (datetime(2026, 11, 1, 1, 30), NY, utc(2026, 11, 1, 5, 30)),  # repeated: first one
        (datetime(2026, 10, 25, 2, 30), BER, utc(2026, 10, 25, 0, 30)),
    ],
)
def test_resolve_wall_time(wall: datetime, zone: ZoneInfo, expected: datetime) -> None:
    assert resolve_wall_time(wall, zone) == expected


@pytest.mark.parametrize(
    ("end", "zone", "expected"),
    [
        (None, SH, None),
        # A date: runs may start until the end of that day in the zone.
        (date(2026, 2, 8), SH, utc(2026, 2, 8, 16, 0) - timedelta(microseconds=1)),
        # ... whose midnight may fall after a DST change.
        (date(2026, 3, 8), NY, utc(2026, 3, 9, 4, 0) - timedelta(microseconds=1)),
        (date(2026, 10, 25), BER, utc(2026, 10, 25, 23, 0) - timedelta(microseconds=1)),
        # A datetime is the exact cut-off; a naive one is in the zone.
        (local(SH, 2026, 2, 8, 12, 0), SH, utc(2026, 2, 8, 4, 0)),
        (datetime(2026, 2, 8, 12, 0), SH, utc(2026, 2, 8, 4, 0)),
    ],
)
def test_end_instant(
    end: date | datetime | None, zone: ZoneInfo, expected: datetime | None
) -> None:
    assert end_instant(end, zone) == expected


END_OF_JAN_10 = end_instant(date(2026, 1, 10), SH)


@pytest.mark.parametrize(
    ("previous", "now", "interval", "window", "end", "expected"),
    [
        # First run: now if the window is open ...
        (None, local(SH, 2026, 1, 8, 10, 0), HOUR, (8, 22), None, local(SH, 2026, 1, 8, 10, 0)),
        # ... else the next opening.
        (None, local(SH, 2026, 1, 8, 7, 0), HOUR, (8, 22), None, local(SH, 2026, 1, 8, 8, 0)),
        (None, local(SH, 2026, 1, 8, 23, 0), HOUR, (8, 22), None, local(SH, 2026, 1, 9, 8, 0)),
        # Previous + interval.
        (
            local(SH, 2026, 1, 8, 10, 0),
            local(SH, 2026, 1, 8, 10, 0, 1),
            HOUR,
            (8, 22),
            None,
            local(SH, 2026, 1, 8, 11, 0),
        ),
        # The last run before the window closes, then the next morning.
        (
            local(SH, 2026, 1, 8, 20, 30),
            local(SH, 2026, 1, 8, 20, 30),
            HOUR,
            (8, 22),
            None,
            local(SH, 2026, 1, 8, 21, 30),
        ),
        (
            local(SH, 2026, 1, 8, 21, 30),
            local(SH, 2026, 1, 8, 21, 30),
            HOUR,
            (8, 22),
            None,
            local(SH, 2026, 1, 9, 8, 0),
        ),
        # Wrap-around window 22-6 carries on past midnight, then waits for 22:00.
        (
            local(SH, 2026, 1, 8, 23, 0),
            local(SH, 2026, 1, 8, 23, 0),
            timedelta(hours=3),
            (22, 6),
            None,
            local(SH, 2026, 1, 9, 2, 0),
        ),
        (
            local(SH, 2026, 1, 9, 5, 0),
            local(SH, 2026, 1, 9, 5, 0),
            timedelta(hours=3),
            (22, 6),
            None,
            local(SH, 2026, 1, 9, 22, 0),
        ),
        # All day.
        (
            local(SH, 2026, 1, 8, 23, 30),
            local(SH, 2026, 1, 8, 23, 30),
            HOUR,
            (0, 24),
            None,
            local(SH, 2026, 1, 9, 0, 30),
        ),
        # Missed runs (stopped or busy) coalesce into one run now if the window is open ...
        (
            local(SH, 2026, 1, 8, 9, 0),
            local(SH, 2026, 1, 8, 15, 20),
            HOUR,
            (8, 22),
            None,
            local(SH, 2026, 1, 8, 15, 20),
        ),
        # ... else the next opening.
        (
            local(SH, 2026, 1, 8, 9, 0),
            local(SH, 2026, 1, 8, 23, 0),
            HOUR,
            (8, 22),
            None,
            local(SH, 2026, 1, 9, 8, 0),
        ),
        # End date: runs until the end of that day, then none.
        (
            local(SH, 2026, 1, 10, 22, 30),
            local(SH, 2026, 1, 10, 22, 30),
            HOUR,
            (0, 24),
            END_OF_JAN_10,
            local(SH, 2026, 1, 10, 23, 30),
        ),
        (
            local(SH, 2026, 1, 10, 23, 30),
            local(SH, 2026, 1, 10, 23, 30),
            HOUR,
            (0, 24),
            END_OF_JAN_10,
            None,
        ),
        (
            local(SH, 2026, 1, 10, 21, 0),
            local(SH, 2026, 1, 10, 21, 0),
            HOUR,
            (8, 22),
            END_OF_JAN_10,
            None,
        ),
        # An exact cut-off is inclusive, like APScheduler's end_date.
        (
            local(SH, 2026, 1, 10, 11, 0),
            local(SH, 2026, 1, 10, 11, 0),
            HOUR,
            (0, 24),
            local(SH, 2026, 1, 10, 12, 0),
            local(SH, 2026, 1, 10, 12, 0),
        ),
        (
            local(SH, 2026, 1, 10, 11, 30),
            local(SH, 2026, 1, 10, 11, 30),
            HOUR,
            (0, 24),
            local(SH, 2026, 1, 10, 12, 0),
            None,
        ),
    ],
)
def test_next_run(
    previous: datetime | None,
    now: datetime,
    interval: timedelta,
    window: tuple[int, int],
    end: datetime | None,
    expected: datetime | None,
) -> None:
    assert (
        next_run(previous, interval=interval, window=window, end=end, zone=SH, now=now) == expected
    )


@pytest.mark.parametrize(
    ("zone", "previous", "expected"),
    [
        # A 24 h interval is elapsed time: across spring forward the wall clock moves on by
        # an hour (UTC spacing kept), as APScheduler's IntervalTrigger does.
        (NY, local(NY, 2026, 3, 7, 10, 0), local(NY, 2026, 3, 8, 11, 0)),
        (NY, local(NY, 2026, 10, 31, 10, 0), local(NY, 2026, 11, 1, 9, 0)),
        (BER, local(BER, 2026, 3, 28, 12, 0), local(BER, 2026, 3, 29, 13, 0)),
        (BER, local(BER, 2026, 10, 24, 12, 0), local(BER, 2026, 10, 25, 11, 0)),
    ],
)
def test_interval_is_elapsed_time_across_dst(
    zone: ZoneInfo, previous: datetime, expected: datetime
) -> None:
    result = next_run(previous, interval=DAY, window=(0, 24), end=None, zone=zone, now=previous)
    assert result == expected
    assert result is not None
    # Same-zone subtraction is wall time; the elapsed (UTC) spacing is the interval.
    assert result.astimezone(UTC) - previous.astimezone(UTC) == DAY
    assert result - previous != DAY


@pytest.mark.parametrize(
    ("zone", "previous", "window", "expected"),
    [
        # The window opening on a spring-forward day lands on the first instant after the gap.
        (NY, local(NY, 2026, 3, 7, 1, 0), (2, 6), utc(2026, 3, 8, 7, 0)),
        (BER, local(BER, 2026, 3, 28, 0, 30), (2, 22), utc(2026, 3, 29, 1, 0)),
        # 05:00 EST + 24 h is 06:00 EDT, past the 2-6 window: the next opening is a day on.
        (NY, local(NY, 2026, 3, 7, 5, 0), (2, 6), local(NY, 2026, 3, 9, 2, 0)),
        # An hourly task inside a window that spans the fall-back repeated hour keeps elapsed
        # spacing: 01:30 EDT + 1h is 01:30 EST (the repeated hour), still inside 1-5.
        (NY, local(NY, 2026, 11, 1, 1, 30), (1, 5), utc(2026, 11, 1, 6, 30)),
    ],
)
def test_window_and_dst(
    zone: ZoneInfo, previous: datetime, window: tuple[int, int], expected: datetime
) -> None:
    interval = HOUR if window == (1, 5) else DAY
    result = next_run(previous, interval=interval, window=window, end=None, zone=zone, now=previous)
    assert result is not None
    assert result.astimezone(UTC) == expected.astimezone(UTC)
    assert in_window(result, window, zone)


def test_may_start_needs_window_and_end() -> None:
    end = local(SH, 2026, 1, 8, 12, 0)
    assert may_start(local(SH, 2026, 1, 8, 12, 0), (8, 22), end, SH)
    assert not may_start(local(SH, 2026, 1, 8, 12, 0, 1), (8, 22), end, SH)
    assert not may_start(local(SH, 2026, 1, 8, 7, 0), (8, 22), None, SH)


def test_upcoming_runs_follow_window_and_end() -> None:
    runs = list(
        upcoming_runs(
            local(SH, 2026, 1, 10, 19, 0),
            interval=HOUR,
            window=(8, 22),
            end=end_instant(date(2026, 1, 11), SH),
            zone=SH,
        )
    )
    hours = [(r.day, r.hour) for r in runs]
    assert hours[:4] == [(10, 19), (10, 20), (10, 21), (11, 8)]
    assert hours[-1] == (11, 21)
    assert len(runs) == 3 + 14


def test_task_trigger_is_next_run() -> None:
    trigger = TaskTrigger(interval=HOUR, window=(8, 22), end=None, zone=SH)
    now = local(SH, 2026, 1, 8, 21, 30)
    assert trigger.get_next_fire_time(now, now) == local(SH, 2026, 1, 9, 8, 0)
    assert trigger.get_next_fire_time(None, now) == now
    assert "8-22" in str(trigger)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (None, None, True),
        (None, utc(2026, 1, 1), False),
        # 01:30 EDT and 01:30 EST are an hour apart although == calls them equal.
        (local(NY, 2026, 11, 1, 1, 30), local(NY, 2026, 11, 1, 1, 30, fold=1), False),
        (local(NY, 2026, 11, 1, 1, 30, fold=1), utc(2026, 11, 1, 6, 30), True),
        (local(SH, 2026, 1, 8, 8, 0), utc(2026, 1, 8, 0, 0), True),
    ],
)
def test_same_instant(a: datetime | None, b: datetime | None, expected: bool) -> None:
    assert same_instant(a, b) is expected
