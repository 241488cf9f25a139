"""The dispatcher's exceptions (defined in :mod:`tasks.errors`, re-exported here)."""

from tasks.errors import (
    BrokerNotDurableError,
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

__all__ = [
    "BrokerNotDurableError",
    "BrokerUnavailableError",
    "ControlError",
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
    "ListenError",
    "NewerFormatError",
    "SaveFailedError",
    "TaskExistsError",
    "TaskNotFoundError",
    "TimezoneMismatchError",
    "UnknownTaskTypeError",
]
