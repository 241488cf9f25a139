"""How a task's numbers read to people: one interval, one time and one preview wording, shared
by the command line and the dashboard (so ``5400`` reads ``1h30m`` in both)."""

from __future__ import annotations

from datetime import datetime, tzinfo

from tasks.model import TaskStatus
from tasks.schedule import RunPreview

__all__ = ["format_interval", "format_time", "preview_label"]

_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_interval(seconds: float) -> str:
    """``3600`` as ``1h``, ``90`` as ``1m30s``, ``5400`` as ``1h30m``, ``1.5`` as ``1.5s``.

    Whole seconds read as days, hours, minutes and seconds, largest first, zero parts left out
    (what ``--interval`` accepts back); a fraction of a second, or less than a minute, in seconds.
    """
    if seconds < 60 or seconds % 1:
        return f"{seconds:g}s"
    parts: list[str] = []
    rest = int(seconds)
    for unit, size in _UNITS:
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def format_time(value: datetime | None, zone: tzinfo) -> str:
    """An instant as wall time of ``zone`` (``2026-01-08 10:30:00``), or ``-`` for none."""
    return "-" if value is None else value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def preview_label(preview: RunPreview) -> str:
    """What a preview's runs are: ``next runs``, ``if resumed now`` (a paused task), or
    ``none (completed)`` (a completed task, which has no runs)."""
    if preview.status == TaskStatus.COMPLETED:
        return "none (completed)"
    return "if resumed now" if preview.if_resumed else "next runs"
