"""The Celery backend's runs out: a run sent (or recovered) until its finishing event is
delivered, with what the backend knows of it (its state, its worker, its deadline, whether
its message may be gone)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tasks.runs import RunEvent, RunRequest

__all__ = ["OpenRun", "run_deadline", "track", "utcnow"]


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


@dataclass(slots=True)
class OpenRun:
    """A run sent (or recovered) whose finishing event has not been delivered yet."""

    request: RunRequest
    deadline: datetime | None
    state: str = "queued"
    worker: str | None = None
    silent_since: float | None = None
    """Monotonic time since which the run's heartbeat has been seen missing."""
    verdict: bool = False
    """Whether this backend already recorded it as expired or lost."""
    orphan_since: float | None = None
    """Monotonic time at which the broker was found to have lost its data (and maybe this
    run's message)."""
    sent_at: float = float("-inf")
    """Monotonic time at which its message was last sent or seen in its queue (-inf: a run
    recovered after a restart, whose message may never have been sent)."""
    claimed: bool = False
    """Whether a worker was ever seen holding its claim (such a run is never sent again)."""


def run_deadline(request: RunRequest, start_timeout: float | None) -> datetime | None:
    """When ``request`` expires if no worker started it: its own deadline, or
    ``start_timeout`` seconds after it was submitted, whichever comes first."""
    deadline = request.deadline
    if start_timeout is not None:
        limit = request.submitted_at + timedelta(seconds=start_timeout)
        deadline = limit if deadline is None else min(deadline, limit)
    return deadline


def track(runs: dict[str, OpenRun], event: RunEvent) -> None:
    """Follow an applied event in the backend's runs out: a finished run is gone, a started
    one claimed (and running, if it was queued)."""
    if event.kind.finished:
        runs.pop(event.run_id, None)
        return
    run = runs.get(event.run_id)
    if run is not None:
        run.claimed = True
        if run.state == "queued":
            run.state, run.worker = "running", event.worker
