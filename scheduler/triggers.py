"""When a task runs (re-exported from :mod:`tasks.schedule`) and its APScheduler trigger."""

from jobstores.jobs import TaskTrigger
from tasks.schedule import (
    RunPreview,
    Schedule,
    Window,
    end_instant,
    in_window,
    may_start,
    next_run,
    preview_runs,
    resolve_wall_time,
    same_instant,
    upcoming_runs,
    utc_now,
    window_opening,
)

__all__ = [
    "RunPreview",
    "Schedule",
    "TaskTrigger",
    "Window",
    "end_instant",
    "in_window",
    "may_start",
    "next_run",
    "preview_runs",
    "resolve_wall_time",
    "same_instant",
    "upcoming_runs",
    "utc_now",
    "window_opening",
]
