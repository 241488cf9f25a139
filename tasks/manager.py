"""The TaskManager protocol: what the dispatcher runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["TaskManager", "TaskManagerFactory"]


@runtime_checkable
class TaskManager(Protocol):
    """Runs one task for one account.

    The dispatcher creates a manager as ``factory(sys_type=..., **kwargs)`` when the task is
    added and again whenever the task is loaded from disk; ``kwargs`` include ``task_id`` and
    ``task_type``, so a manager can find its own history. Each run calls ``run()``: an
    ``async def run`` is awaited on the event loop, a plain ``def run`` is called in a worker
    thread (and its result awaited if it is awaitable). Raising marks the run failed.
    """

    def run(self) -> Awaitable[Any] | Any:
        """Do one run of the task."""


TaskManagerFactory = Callable[..., TaskManager]
"""Creates a task manager: called as ``factory(sys_type=sys_type, **kwargs)``."""
