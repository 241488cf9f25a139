"""Task types by name: the default task manager factory."""

from __future__ import annotations

import threading
from typing import Any

from tasks.errors import UnknownTaskTypeError
from tasks.manager import TaskManager, TaskManagerFactory

__all__ = ["TaskTypeRegistry", "default_registry", "register_task_type"]


class TaskTypeRegistry:
    """Maps a task type name to the factory that creates its managers.

    An instance is itself a task manager factory: ``registry(sys_type=..., task_type=..., ...)``
    looks up ``task_type`` and calls the registered factory with every keyword.
    """

    def __init__(self) -> None:
        self._factories: dict[str, TaskManagerFactory] = {}
        self._lock = threading.Lock()

    def register(
        self, task_type: str, factory: TaskManagerFactory, *, replace: bool = False
    ) -> None:
        """Register ``factory`` for ``task_type``; re-registering needs ``replace=True``."""
        if not task_type:
            raise ValueError("task_type: must be a non-empty string")
        with self._lock:
            if task_type in self._factories and not replace:
                raise ValueError(f"task_type: {task_type!r} is already registered")
            self._factories[task_type] = factory

    def unregister(self, task_type: str) -> None:
        """Forget ``task_type`` (a no-op if it is not registered)."""
        with self._lock:
            self._factories.pop(task_type, None)

    def names(self) -> list[str]:
        """The registered task type names, sorted."""
        with self._lock:
            return sorted(self._factories)

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._factories

    def __call__(self, *, sys_type: str, task_type: str, **kwargs: Any) -> TaskManager:
        factory = self._factories.get(task_type)
        if factory is None:
            raise UnknownTaskTypeError(task_type, self.names())
        return factory(sys_type=sys_type, task_type=task_type, **kwargs)


default_registry = TaskTypeRegistry()
"""The registry behind ``TaskDispatcher``'s default factory; holds the built-in types."""


def register_task_type(
    task_type: str, factory: TaskManagerFactory, *, replace: bool = False
) -> None:
    """Register a task type with the default registry."""
    default_registry.register(task_type, factory, replace=replace)
