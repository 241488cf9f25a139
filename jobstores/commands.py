"""The commands of the task core (:class:`jobstores.core.TaskCore`): plain data, one per
kind of change, each applied at a given instant by :meth:`~jobstores.core.TaskCore.apply`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tasks.model import ActiveRun, TaskRecord
from tasks.runs import RunEvent, RunRequest

__all__ = [
    "AddTasks",
    "Command",
    "EditTask",
    "Exhausted",
    "Faulted",
    "PauseTask",
    "Planned",
    "RemoveTask",
    "ReorderTask",
    "RequestRun",
    "ResumeTask",
    "RunAbandoned",
    "RunOpened",
    "RunReported",
    "RunSettled",
]


@dataclass(frozen=True, slots=True)
class AddTasks:
    """New tasks, all together or none (a taken or repeated id raises)."""

    records: Sequence[TaskRecord]


@dataclass(frozen=True, slots=True)
class EditTask:
    """The task's rules replaced by those of ``rules`` (validated like a new task)."""

    task_id: str
    rules: TaskRecord


@dataclass(frozen=True, slots=True)
class PauseTask:
    """No run starts until resumed; ``reason`` when the dispatcher pauses it itself."""

    task_id: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ResumeTask:
    """A paused task is scheduled again."""

    task_id: str


@dataclass(frozen=True, slots=True)
class RemoveTask:
    """The task is deleted for good."""

    task_id: str


@dataclass(frozen=True, slots=True)
class ReorderTask:
    """The task moves to ``position`` (0-based) in its account's priority order."""

    task_id: str
    position: int


@dataclass(frozen=True, slots=True)
class RequestRun:
    """An operator asked to run the task now."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Planned:
    """The scheduler moved the next run to ``when`` (None: it holds the job without one)."""

    task_id: str
    when: datetime | None


@dataclass(frozen=True, slots=True)
class Exhausted:
    """The schedule has no further run; ``run_waiting``: a run of the task is due and waits
    for its lane (not opened yet), so its end decides completion."""

    task_id: str
    run_waiting: bool = False


@dataclass(frozen=True, slots=True)
class Faulted:
    """Planning the task raised ``error``; ``run_waiting`` as for :class:`Exhausted`."""

    task_id: str
    error: str
    run_waiting: bool = False


@dataclass(frozen=True, slots=True)
class RunSettled:
    """A run due for the task is over without having opened: skipped at the gate, or cut
    off while it waited for its lane. (A run that opened is settled by its end.)"""

    task_id: str


@dataclass(frozen=True, slots=True)
class RunOpened:
    """``run`` was handed to a backend; ``started`` when it starts at once (this process);
    ``request``: the run as sent (its ``started`` event is then reported whole)."""

    task_id: str
    run: ActiveRun
    started: bool
    request: RunRequest | None = None


@dataclass(frozen=True, slots=True)
class RunReported:
    """``event`` arrived for a run; ``request`` is the run as it was opened (None: not known
    to the caller; the record's open run is used)."""

    event: RunEvent
    request: RunRequest | None = None


@dataclass(frozen=True, slots=True)
class RunAbandoned:
    """The run was cut off in this process: it does not count. With ``request`` (a run cut
    off while this process runs, not one found at a restart) it is reported as lost."""

    task_id: str
    run_id: str
    request: RunRequest | None = None


Command = (
    AddTasks
    | EditTask
    | PauseTask
    | ResumeTask
    | RemoveTask
    | ReorderTask
    | RequestRun
    | Planned
    | Exhausted
    | Faulted
    | RunSettled
    | RunOpened
    | RunReported
    | RunAbandoned
)
