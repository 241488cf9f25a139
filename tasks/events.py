"""The one hierarchy of events: what happens to runs, tasks and saving.

The task core (:class:`jobstores.core.TaskCore`) decides each event once, where the change
that causes it is applied, and hands it back with the change; the dispatcher relays them to
its listeners (``TaskDispatcher.add_listener``) and observers. :mod:`scheduler.listeners`
re-exports every class here under the names users import.

Observers subscribe to the whole stream: the retry timer takes :class:`RunRetried`; the run
history and the metrics take :class:`RunReport`, a run's event whole (its request and the
backend's report), which listeners are never told (they hear the typed run events).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from tasks.runs import RunEvent, RunRequest

__all__ = [
    "EVENT_CLASSES",
    "DispatcherEvent",
    "RunFailed",
    "RunReport",
    "RunRetried",
    "RunStarted",
    "RunSucceeded",
    "RunTimedOut",
    "SaveFailed",
    "SaveRecovered",
    "TaskAdded",
    "TaskCompleted",
    "TaskEvent",
    "TaskPaused",
    "TaskRemoved",
    "TaskResumed",
    "event_by_kind",
]


@dataclass(frozen=True, kw_only=True)
class DispatcherEvent:
    """Something that happened in the dispatcher; ``kind`` names the event class."""

    kind: ClassVar[str] = "event"
    at: datetime
    """When it happened (the dispatcher's zone)."""
    task_id: str | None
    """The task concerned (None for events about the whole dispatcher)."""

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object: ``{"event": kind, ...fields}``, times in ISO-8601."""
        data: dict[str, Any] = {"event": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = value.isoformat() if isinstance(value, datetime) else value
        return data


@dataclass(frozen=True, kw_only=True)
class TaskEvent(DispatcherEvent):
    """Something that happened to one task (of ``account_id``)."""

    task_id: str
    account_id: str


@dataclass(frozen=True, kw_only=True)
class _RunEvent(TaskEvent):
    run_id: str
    attempt: int
    """1 for a planned run, 2 and up for its retries."""
    scheduled_at: datetime
    """The planned time of the run."""


@dataclass(frozen=True, kw_only=True)
class RunStarted(_RunEvent):
    """A run started executing."""

    kind: ClassVar[str] = "run_started"


@dataclass(frozen=True, kw_only=True)
class RunSucceeded(_RunEvent):
    """A run finished without error."""

    kind: ClassVar[str] = "run_succeeded"


@dataclass(frozen=True, kw_only=True)
class RunFailed(_RunEvent):
    """A run failed (raised, timed out, was lost or expired); ``retry_at`` if retried."""

    kind: ClassVar[str] = "run_failed"
    error: str
    retry_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class RunTimedOut(_RunEvent):
    """A run was stopped by its ``run_timeout`` (a :class:`RunFailed` follows)."""

    kind: ClassVar[str] = "run_timed_out"
    timeout: float


@dataclass(frozen=True, kw_only=True)
class RunRetried(TaskEvent):
    """A failed run will be tried again: attempt ``attempt`` at ``retry_at``."""

    kind: ClassVar[str] = "run_retried"
    run_id: str
    """The run that failed."""
    attempt: int
    retry_at: datetime


@dataclass(frozen=True, kw_only=True)
class RunReport(TaskEvent):
    """A run's event as applied, whole: the run's ``request`` and the backend's ``event`` (any
    kind, ``started`` included, with its worker, error and extra). For the observers that
    keep runs (run history, metrics); not a listener event (not in :data:`EVENT_CLASSES`)."""

    kind: ClassVar[str] = "run_report"
    request: RunRequest
    event: RunEvent


@dataclass(frozen=True, kw_only=True)
class TaskAdded(TaskEvent):
    """A task was added."""

    kind: ClassVar[str] = "task_added"


@dataclass(frozen=True, kw_only=True)
class TaskPaused(TaskEvent):
    """A task was paused: on request, or by the dispatcher (``automatic``, with ``reason``)."""

    kind: ClassVar[str] = "task_paused"
    automatic: bool = False
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class TaskResumed(TaskEvent):
    """A paused task was resumed."""

    kind: ClassVar[str] = "task_resumed"


@dataclass(frozen=True, kw_only=True)
class TaskRemoved(TaskEvent):
    """A task was removed."""

    kind: ClassVar[str] = "task_removed"


@dataclass(frozen=True, kw_only=True)
class TaskCompleted(TaskEvent):
    """A task has no run left before its end."""

    kind: ClassVar[str] = "task_completed"


@dataclass(frozen=True, kw_only=True)
class SaveFailed(DispatcherEvent):
    """Saving the state file failed (changes stay in memory; saving is retried)."""

    kind: ClassVar[str] = "save_failed"
    task_id: None = None
    error: str


@dataclass(frozen=True, kw_only=True)
class SaveRecovered(DispatcherEvent):
    """Saving works again after a failure; every pending change is written."""

    kind: ClassVar[str] = "save_recovered"
    task_id: None = None


EVENT_CLASSES: tuple[type[DispatcherEvent], ...] = (  # the listener events
    RunStarted,
    RunSucceeded,
    RunFailed,
    RunTimedOut,
    RunRetried,
    TaskAdded,
    TaskPaused,
    TaskResumed,
    TaskRemoved,
    TaskCompleted,
    SaveFailed,
    SaveRecovered,
)
_BY_KIND = {cls.kind: cls for cls in EVENT_CLASSES}


def event_by_kind(kind: str) -> type[DispatcherEvent] | None:
    """The event class whose ``kind`` is ``kind`` (None if there is none)."""
    return _BY_KIND.get(kind)
