"""The dispatcher's exceptions (defined in :mod:`tasks.errors`, re-exported here)."""

from tasks.errors import (
    BrokerUnavailableError,
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

__all__ = [
    "BrokerUnavailableError",
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
    "NewerFormatError",
    "SaveFailedError",
    "TaskExistsError",
    "TaskNotFoundError",
    "TimezoneMismatchError",
    "UnknownTaskTypeError",
]
