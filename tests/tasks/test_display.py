"""How numbers read to people, once for the command line and the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from scheduler.cli_parse import parse_interval
from tasks.display import format_interval, format_time, preview_label
from tasks.schedule import RunPreview


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1, "1s"),
        (59, "59s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (3661, "1h1m1s"),
        (5400, "1h30m"),
        (86400, "1d"),
        (129600, "1d12h"),
        (90061, "1d1h1m1s"),
        (604800, "7d"),
        (0.5, "0.5s"),
        (1.5, "1.5s"),
        (90.5, "90.5s"),
    ],
)
def test_format_interval(seconds: float, text: str) -> None:
    assert format_interval(seconds) == text
    assert parse_interval(text) == seconds  # what --interval reads back


@pytest.mark.parametrize(
    ("value", "zone", "text"),
    [
        (None, "UTC", "-"),
        (datetime(2026, 1, 8, 2, 30, tzinfo=UTC), "Asia/Shanghai", "2026-01-08 10:30:00"),
        (datetime(2026, 1, 8, 2, 30, 5, 999_000, tzinfo=UTC), "UTC", "2026-01-08 02:30:05"),
        (datetime(2026, 3, 29, 1, 30, tzinfo=UTC), "Europe/Berlin", "2026-03-29 03:30:00"),
    ],
)
def test_format_time(value: datetime | None, zone: str, text: str) -> None:
    assert format_time(value, ZoneInfo(zone)) == text


@pytest.mark.parametrize(
    ("status", "if_resumed", "label"),
    [
        ("pending", False, "next runs"),
        ("running", False, "next runs"),
        ("paused", True, "if resumed now"),
        ("completed", False, "none (completed)"),
    ],
)
def test_preview_label(status: str, if_resumed: bool, label: str) -> None:
    assert preview_label(RunPreview("t", status, if_resumed, ())) == label
