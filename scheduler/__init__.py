"""The dispatcher: recurring per-account tasks on APScheduler 3, persisted to one JSON file."""

from scheduler.backends.local import LocalRunBackend
from scheduler.dispatcher import TaskDispatcher
from scheduler.triggers import TaskTrigger
from tasks.errors import (
    DirectoryLockedError,
    DispatcherClosedError,
    DispatcherError,
    DispatcherNotRunningError,
    InvalidTaskError,
    NewerFormatError,
    TaskNotFoundError,
    UnknownTaskTypeError,
)
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest

__all__ = [
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherNotRunningError",
    "InvalidTaskError",
    "LocalRunBackend",
    "NewerFormatError",
    "RunBackend",
    "RunEvent",
    "RunEventKind",
    "RunInbox",
    "RunRequest",
    "TaskDispatcher",
    "TaskNotFoundError",
    "TaskTrigger",
    "UnknownTaskTypeError",
]
