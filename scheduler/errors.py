"""The dispatcher's exceptions (defined in :mod:`tasks.errors`, re-exported here)."""

from tasks.errors import (
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
    SaveFailedError,
    TaskExistsError,
    TaskNotFoundError,
    TimezoneMismatchError,
    UnknownTaskTypeError,
)

__all__ = [
    "BrokerInUseError",
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
