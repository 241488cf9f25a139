"""The dispatcher's exceptions: one hierarchy, each also the stdlib type it resembles."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AccountNotFoundError",
    "BrokerInUseError",
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
    "NotLeaderError",
    "SaveFailedError",
    "TaskExistsError",
    "TaskNotFoundError",
    "TimezoneMismatchError",
    "UnknownTaskTypeError",
]


class DispatcherError(Exception):
    """Base class of every error raised by task-dispatcher."""


class TaskNotFoundError(DispatcherError, KeyError):
    """No task with this id exists."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"no task with id {self.task_id!r}"


class AccountNotFoundError(DispatcherError, KeyError):
    """No task belongs to this account id."""

    def __init__(self, account_id: str) -> None:
        super().__init__(account_id)
        self.account_id = account_id

    def __str__(self) -> str:
        return f"no account with id {self.account_id!r}"


class InvalidTaskError(DispatcherError, ValueError):
    """A task's parameters are invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TaskExistsError(InvalidTaskError):
    """A task with this id exists already (or appears twice in one ``add_tasks`` batch)."""

    def __init__(self, task_id: str, message: str | None = None) -> None:
        super().__init__("task_id", message or f"a task with id {task_id!r} exists")
        self.task_id = task_id


class UnknownTaskTypeError(InvalidTaskError):
    """The default factory has no task manager registered for this task type."""

    def __init__(self, task_type: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            "task_type",
            f"unknown task type {task_type!r} (registered: {listed}); register it with "
            "tasks.register_task_type() or pass task_manager_factory=",
        )
        self.task_type = task_type


class DirectoryLockedError(DispatcherError, RuntimeError):
    """Another dispatcher (in this or another process) owns the dispatcher directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            f"dispatcher directory {str(directory)!r} is in use by another dispatcher "
            "(a running 'task-dispatcher run' or a host application); stop it first"
        )
        self.directory = directory


class NotLeaderError(DispatcherError, RuntimeError):
    """This dispatcher does not lead its cluster (a standby of a shared store): changes go to
    the leader, at :attr:`leader_url` when it advertises one."""

    def __init__(
        self,
        message: str,
        *,
        leader_url: str | None = None,
        leader_id: str | None = None,
        epoch: int | None = None,
    ) -> None:
        super().__init__(message)
        self.leader_url = leader_url
        """Where the leader serves its control API (None: unknown, or none leads)."""
        self.leader_id = leader_id
        """The leader's id in the lease (None: unknown)."""
        self.epoch = epoch
        """The cluster's fencing epoch as last read (None: unknown)."""


class NewerFormatError(DispatcherError, RuntimeError):
    """The state file's format version is newer than this code understands, or unreadable
    as a version (such as ``"1.1-rc1"``): either way the file is refused and left untouched."""

    def __init__(self, path: Path, version: str, *, parsed: bool = True) -> None:
        what = "newer than what" if parsed else "which is not a version"
        super().__init__(
            f"{str(path)!r} has format version {version!r}, {what} this task-dispatcher "
            "understands (1.0); upgrade task-dispatcher. The file was left untouched."
        )
        self.path = path
        self.version = version


class TimezoneMismatchError(DispatcherError, ValueError):
    """The dispatcher was given a zone other than the one its state file records.

    The hour windows and end dates were written for the recorded zone; reading them in
    another one changes when tasks run, so that takes ``convert_timezone=True``.
    """

    def __init__(self, path: Path, recorded: str, requested: str) -> None:
        super().__init__(
            f"timezone: {str(path)!r} records the zone {recorded!r}, not {requested!r}; its hour "
            f"windows mean {recorded} hours. Leave the zone out to keep {recorded!r}, or convert "
            "the store explicitly (convert_timezone=True, --convert-timezone)"
        )
        self.field = "timezone"
        self.path = path
        self.recorded = recorded
        self.requested = requested


class SaveFailedError(DispatcherError, OSError):
    """A change was applied but could not be saved durably.

    The change stays in effect in memory and is retried in the background; ``save_health``
    tells when it reaches the disk. ``task_ids`` are the tasks the failed call changed.
    ``retried`` False: the storage refused the data itself (no retry can mend it), so no
    retry is made; the next change tries again.
    """

    def __init__(
        self, path: Path, task_ids: tuple[str, ...], cause: str, *, retried: bool = True
    ) -> None:
        then = (
            "saving is retried"
            if retried
            else "saving is not retried: the store refuses the data (change or remove the task)"
        )
        super().__init__(
            f"change to task(s) {', '.join(task_ids)} not saved to {str(path)!r} ({cause}); "
            f"it is in effect in memory and {then}"
        )
        self.path = path
        self.task_ids = task_ids
        self.cause = cause
        self.retried = retried


class HistoryUnavailableError(DispatcherError, RuntimeError):
    """The run history is off, or its file cannot be opened or read."""


class DispatcherNotRunningError(DispatcherError, RuntimeError):
    """An operation needs a started dispatcher."""


class DispatcherClosedError(DispatcherError, RuntimeError):
    """The dispatcher was stopped: it no longer owns its directory and accepts no changes."""


class BrokerUnavailableError(DispatcherError, ConnectionError):
    """A run could not be sent: the broker of a remote run backend is unreachable."""


class BrokerInUseError(DispatcherError, RuntimeError):
    """The broker's Redis database already serves another running dispatcher (one per
    database: the run events and their consumer group belong to it)."""


class BrokerNotDurableError(DispatcherError, RuntimeError):
    """A worker's broker cannot keep a run's claim across a crash (its persistence settings),
    so a run could execute twice: the message names the setting to change."""


class ListenError(DispatcherError, ValueError):
    """The control API cannot listen where asked: a bad address, a non-loopback address
    without a token, or a socket path or port that is taken."""


class ControlError(DispatcherError, RuntimeError):
    """A request to a dispatcher's control API failed; the message is the server's."""

    def __init__(self, message: str, *, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        """The HTTP status (None: the dispatcher could not be reached)."""
        self.field = field
        """The request field the error is about, if any."""
