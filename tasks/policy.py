"""Run policies: jitter, retries, run timeouts and auto-pause, and the pure rules they decide.

A :class:`RunPolicy` belongs to one task (``TaskRecord.run_policy``; None means the defaults,
which reproduce a task without a policy: no jitter, no retry, no timeout, never paused).
Every decision here is a function of its arguments: the caller passes ``now``, the task's
:class:`~tasks.schedule.Schedule` and, for jitter, a random fraction.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from tasks.schedule import Schedule, window_closing, window_opening

__all__ = [
    "DEFAULT_POLICY",
    "RunPolicy",
    "jitter_bounds",
    "jittered_start",
    "pause_due",
    "retry_delay",
    "retry_time",
]

_MAX_SECONDS = 1000 * 365 * 86400
_ONE_MICROSECOND = timedelta(microseconds=1)


class RunPolicy(BaseModel):
    """How a task's runs are started, retried, stopped and given up on.

    Pass it (or a dict of its fields) as ``add_task(..., run_policy=...)``; the defaults
    change nothing about how a task runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    jitter: float = Field(default=0, ge=0, le=_MAX_SECONDS)
    """Seconds: each planned run starts at a random offset in ``[0, jitter]`` after its planned
    time, never outside its window, after the end, or at or after the next planned run."""
    retries: int = Field(default=0, ge=0, le=100)
    """How many times a failed run is tried again (0: never)."""
    retry_delay: float = Field(default=60, ge=1, le=_MAX_SECONDS)
    """Seconds from a failure to the first retry."""
    retry_backoff: float = Field(default=2, ge=1, le=100)
    """Each further retry waits this many times longer than the one before."""
    retry_max_delay: float = Field(default=3600, ge=1, le=_MAX_SECONDS)
    """The longest wait before a retry, in seconds."""
    run_timeout: float | None = Field(default=None, gt=0, le=_MAX_SECONDS)
    """Seconds a run may take; a run still going then is stopped and counts as failed."""
    pause_after_failures: int | None = Field(default=None, ge=1, le=1_000_000)
    """Pause the task after this many consecutive failed runs (None: never)."""

    @property
    def is_default(self) -> bool:
        """Whether this policy changes nothing."""
        return self == DEFAULT_POLICY


DEFAULT_POLICY = RunPolicy()
"""The policy of a task that has none."""


def retry_delay(policy: RunPolicy, attempt: int) -> timedelta:
    """The wait before the retry that follows failed attempt ``attempt`` (1: the planned run):
    ``retry_delay * retry_backoff ** (attempt - 1)``, at most ``retry_max_delay``."""
    exponent = max(attempt - 1, 0)
    try:
        seconds = policy.retry_delay * policy.retry_backoff**exponent
    except OverflowError:
        seconds = math.inf
    return timedelta(seconds=min(seconds, policy.retry_max_delay))


def retry_time(
    policy: RunPolicy,
    attempt: int,
    schedule: Schedule,
    next_start: datetime | None,
    now: datetime,
) -> datetime | None:
    """When to retry a run whose attempt ``attempt`` failed at ``now``; None: no retry.

    A retry waits :func:`retry_delay`, then for the window to open; there is none once the
    retries are used up, past the end, or at or after ``next_start`` (the next planned run
    takes over from there).
    """
    if attempt > policy.retries:
        return None
    earliest = now.astimezone(UTC) + retry_delay(policy, attempt)
    at = window_opening(earliest, schedule.window, schedule.zone).astimezone(UTC)
    if schedule.ended(at) or (next_start is not None and at >= next_start.astimezone(UTC)):
        return None
    return at.astimezone(now.tzinfo)


def jitter_bounds(
    planned: datetime, jitter: float, schedule: Schedule
) -> tuple[datetime, datetime]:
    """The earliest and latest start of a run planned at ``planned`` with ``jitter`` seconds.

    The latest is ``planned + jitter``, but still inside the window that ``planned`` is in,
    not after the end, and before ``planned + interval`` (the earliest the next run can be).
    Both are in ``planned``'s zone.
    """
    # Elapsed time on UTC instants: aware arithmetic within one zone is wall-clock arithmetic.
    start = planned.astimezone(UTC)
    latest = start + min(timedelta(seconds=jitter), schedule.interval - _ONE_MICROSECOND)
    closing = window_closing(start, schedule.window, schedule.zone)
    if closing is not None:
        latest = min(latest, closing.astimezone(UTC) - _ONE_MICROSECOND)
    if schedule.end is not None:
        latest = min(latest, schedule.end.astimezone(UTC))
    return planned, max(latest, start).astimezone(planned.tzinfo)


def jittered_start(
    planned: datetime, jitter: float, schedule: Schedule, fraction: float
) -> datetime:
    """The start of a run planned at ``planned``: ``fraction`` (in ``[0, 1]``) of the way to
    the latest start (:func:`jitter_bounds`), in whole seconds."""
    earliest, latest = jitter_bounds(planned, jitter, schedule)
    start = earliest.astimezone(UTC)
    span = (latest.astimezone(UTC) - start).total_seconds()
    offset = math.floor(span * min(max(fraction, 0.0), 1.0))
    return (start + timedelta(seconds=offset)).astimezone(planned.tzinfo)


def pause_due(policy: RunPolicy, consecutive_failures: int) -> bool:
    """Whether a task with ``consecutive_failures`` failed runs in a row is to be paused."""
    limit = policy.pause_after_failures
    return limit is not None and consecutive_failures >= limit
