"""The dispatcher: recurring per-account tasks on APScheduler 3, persisted to one JSON file."""

from scheduler.backends.local import LocalRunBackend
from scheduler.dispatcher import TaskDispatcher
from scheduler.history import RunEntry, RunHistory
from scheduler.triggers import TaskTrigger
from tasks.errors import (
    DirectoryLockedError,
    DispatcherClosedError,
    DispatcherError,
    DispatcherNotRunningError,
    HistoryUnavailableError,
    InvalidTaskError,
    NewerFormatError,
    SaveFailedError,
    TaskExistsError,
    TaskNotFoundError,
    TimezoneMismatchError,
    UnknownTaskTypeError,
)
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest

__all__ = [
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
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
