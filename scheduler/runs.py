"""The seam between "a run is due" and "the manager ran, with this outcome".

A :class:`RunBackend` executes one :class:`RunRequest` and returns its :class:`RunOutcome`.
The local backend calls the task manager in this process; a backend that routes runs to
remote workers by ``sys_type`` plugs in here without touching scheduling or persistence.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from tasks.manager import TaskManager

__all__ = [
    "LocalRunBackend",
    "RunBackend",
    "RunOutcome",
    "RunRequest",
    "call_manager",
    "describe_error",
]

_ERROR_LIMIT = 2000


@dataclass(frozen=True)
class RunRequest:
    """One run of one task."""

    run_id: str
    task_id: str
    account_id: str
    sys_type: str
    task_type: str
    scheduled_at: datetime
    started_at: datetime
    manager: TaskManager


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: ``error`` is None on success, else ``"Type: message"``."""

    run_id: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the run succeeded."""
        return self.error is None


class RunBackend(Protocol):
    """Executes runs. Raising instead of returning an outcome counts as a failed run."""

    async def execute(self, request: RunRequest) -> RunOutcome:
        """Run ``request`` to its end and report the outcome."""
        ...


def describe_error(exc: BaseException) -> str:
    """``"Type: message"``, cut to a sane length for the state file."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _ERROR_LIMIT else text[: _ERROR_LIMIT - 3] + "..."


async def call_manager(manager: TaskManager) -> object:
    """Call ``manager.run()``: on the loop if it is a coroutine function, else in a thread."""
    run = manager.run
    if inspect.iscoroutinefunction(run):
        result = await run()
    else:
        result = await asyncio.to_thread(run)
        if inspect.isawaitable(result):
            result = await result
    return result


class LocalRunBackend:
    """Runs the task manager in this process."""

    async def execute(self, request: RunRequest) -> RunOutcome:
        """Call the manager; an exception it raises becomes the outcome's error."""
        try:
            await call_manager(request.manager)
        except Exception as exc:
            return RunOutcome(request.run_id, error=describe_error(exc))
        return RunOutcome(request.run_id)
