"""Tasks: the record model, statuses, the TaskManager protocol and the task type registry."""

from tasks.manager import TaskManager, TaskManagerFactory
from tasks.model import TaskRecord, TaskStatus
from tasks.policy import RunPolicy
from tasks.registry import TaskTypeRegistry, default_registry, register_task_type
from tasks.secrets import mask_secrets
from tasks.shell import ShellTask, ShellTaskError

__all__ = [
    "RunPolicy",
    "ShellTask",
    "ShellTaskError",
    "TaskManager",
    "TaskManagerFactory",
    "TaskRecord",
    "TaskStatus",
    "TaskTypeRegistry",
    "default_registry",
    "mask_secrets",
    "register_task_type",
]
