"""The dispatcher: recurring per-account tasks on APScheduler 3, persisted to one JSON file."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scheduler.errors import (
    ControlError,
    DirectoryLockedError,
    DispatcherClosedError,
    DispatcherError,
    DispatcherNotRunningError,
    HistoryUnavailableError,
    InvalidTaskError,
    ListenError,
    NewerFormatError,
    TaskExistsError,
    TaskNotFoundError,
    UnknownTaskTypeError,
)

if TYPE_CHECKING:
    from scheduler.dispatcher import TaskDispatcher
    from scheduler.history import RunEntry, RunHistory
    from scheduler.metrics import DispatcherMetrics
    from scheduler.runs import LocalRunBackend, RunBackend, RunOutcome, RunRequest
    from scheduler.triggers import TaskTrigger

__all__ = [
    "ControlError",
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherMetrics",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
    "ListenError",
    "LocalRunBackend",
    "NewerFormatError",
    "RunBackend",
    "RunEntry",
    "RunHistory",
    "RunOutcome",
    "RunRequest",
    "TaskDispatcher",
    "TaskExistsError",
    "TaskNotFoundError",
    "TaskTrigger",
    "UnknownTaskTypeError",
]

_LAZY = {
    "TaskDispatcher": "scheduler.dispatcher",
    "DispatcherMetrics": "scheduler.metrics",
    "RunEntry": "scheduler.history",
    "RunHistory": "scheduler.history",
    "LocalRunBackend": "scheduler.runs",
    "RunBackend": "scheduler.runs",
    "RunOutcome": "scheduler.runs",
    "RunRequest": "scheduler.runs",
    "TaskTrigger": "scheduler.triggers",
}


def __getattr__(name: str) -> Any:
    # The dispatcher imports the job store, which imports scheduler.triggers: importing it
    # lazily lets `import jobstores` and `import scheduler` work in either order.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
