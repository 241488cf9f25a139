"""The dispatcher: recurring per-account tasks on APScheduler 3, persisted to one JSON file."""

from typing import TYPE_CHECKING, Any

from scheduler.backends.local import LocalRunBackend
from scheduler.dispatcher import TaskDispatcher
from scheduler.history import RunEntry, RunHistory
from scheduler.triggers import TaskTrigger
from tasks.errors import (
    BrokerUnavailableError,
    ControlError,
    DirectoryLockedError,
    DispatcherClosedError,
    DispatcherError,
    DispatcherNotRunningError,
    HistoryUnavailableError,
    InvalidTaskError,
    ListenError,
    NewerFormatError,
    SaveFailedError,
    TaskExistsError,
    TaskNotFoundError,
    TimezoneMismatchError,
    UnknownTaskTypeError,
)
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest

if TYPE_CHECKING:
    from scheduler.backends.celery import CeleryRunBackend

__all__ = [
    "BrokerUnavailableError",
    "CeleryRunBackend",
    "ControlError",
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
    "ListenError",
    "LocalRunBackend",
    "NewerFormatError",
    "RunBackend",
    "RunEntry",
    "RunEvent",
    "RunEventKind",
    "RunHistory",
    "RunInbox",
    "RunRequest",
    "SaveFailedError",
    "TaskDispatcher",
    "TaskExistsError",
    "TaskNotFoundError",
    "TaskTrigger",
    "TimezoneMismatchError",
    "UnknownTaskTypeError",
]


def __getattr__(name: str) -> Any:
    # CeleryRunBackend is imported on first use: `import scheduler` works without the extra.
    if name == "CeleryRunBackend":
        from scheduler import backends

        return backends.CeleryRunBackend
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
