"""Tasks: the record model, statuses, the TaskManager protocol and the task type registry."""

from tasks.manager import TaskManager, TaskManagerFactory
from tasks.model import TaskRecord, TaskStatus
from tasks.registry import TaskTypeRegistry, default_registry, register_task_type

__all__ = [
    "TaskManager",
    "TaskManagerFactory",
    "TaskRecord",
    "TaskStatus",
    "TaskTypeRegistry",
    "default_registry",
    "register_task_type",
]
