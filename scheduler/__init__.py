"""The dispatcher: recurring per-account tasks on APScheduler 3, persisted to one JSON file."""

from typing import TYPE_CHECKING, Any

from scheduler.backends.local import LocalRunBackend
from scheduler.dispatcher import AccountChange
from scheduler.history import RunEntry, RunHistory
from scheduler.listeners import (
    DispatcherEvent,
    RunFailed,
    RunRetried,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    SaveFailed,
    SaveRecovered,
    TaskAdded,
    TaskCompleted,
    TaskPaused,
    TaskRemoved,
    TaskResumed,
    WebhookListener,
)
from scheduler.serve import TaskDispatcher
from scheduler.triggers import TaskTrigger
from tasks.errors import (
    AccountNotFoundError,
    BrokerInUseError,
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
    NotLeaderError,
    SaveFailedError,
    TaskExistsError,
    TaskNotFoundError,
    TimezoneMismatchError,
    UnknownTaskTypeError,
)
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest

if TYPE_CHECKING:
    from scheduler.fleet.backend import CeleryRunBackend

__all__ = [
    "AccountChange",
    "AccountNotFoundError",
    "BrokerInUseError",
    "BrokerUnavailableError",
    "CeleryRunBackend",
    "ControlError",
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherEvent",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
    "ListenError",
    "LocalRunBackend",
    "NewerFormatError",
    "NotLeaderError",
    "RunBackend",
    "RunEntry",
    "RunEvent",
    "RunEventKind",
    "RunFailed",
    "RunHistory",
    "RunInbox",
    "RunRequest",
    "RunRetried",
    "RunStarted",
    "RunSucceeded",
    "RunTimedOut",
    "SaveFailed",
    "SaveFailedError",
    "SaveRecovered",
    "TaskAdded",
    "TaskCompleted",
    "TaskDispatcher",
    "TaskExistsError",
    "TaskNotFoundError",
    "TaskPaused",
    "TaskRemoved",
    "TaskResumed",
    "TaskTrigger",
    "TimezoneMismatchError",
    "UnknownTaskTypeError",
    "WebhookListener",
]


def __getattr__(name: str) -> Any:
    # CeleryRunBackend is imported on first use: `import scheduler` works without the extra.
    if name == "CeleryRunBackend":
        from scheduler import backends

        return backends.CeleryRunBackend
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
