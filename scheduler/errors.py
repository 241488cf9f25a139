"""The dispatcher's exceptions: one hierarchy, each also the stdlib type it resembles."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ControlError",
    "DirectoryLockedError",
    "DispatcherClosedError",
    "DispatcherError",
    "DispatcherNotRunningError",
    "HistoryUnavailableError",
    "InvalidTaskError",
    "ListenError",
    "NewerFormatError",
    "TaskExistsError",
    "TaskNotFoundError",
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


class InvalidTaskError(DispatcherError, ValueError):
    """A task's parameters are invalid; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TaskExistsError(InvalidTaskError):
    """A task with the requested id already exists (the control API answers 409)."""

    def __init__(self, task_id: str) -> None:
        super().__init__("task_id", f"a task with id {task_id!r} exists")
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


class NewerFormatError(DispatcherError, RuntimeError):
    """The state file was written by a newer format version than this code understands."""

    def __init__(self, path: Path, version: str) -> None:
        super().__init__(
            f"{str(path)!r} has format version {version!r}, newer than this task-dispatcher "
            "understands (1.0); upgrade task-dispatcher. The file was left untouched."
        )
        self.path = path
        self.version = version


class DispatcherNotRunningError(DispatcherError, RuntimeError):
    """An operation needs a started dispatcher."""


class DispatcherClosedError(DispatcherError, RuntimeError):
    """The dispatcher was stopped: it no longer owns its directory and accepts no changes."""


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


class HistoryUnavailableError(DispatcherError, RuntimeError):
    """The run history is off, or its file cannot be opened or read."""
