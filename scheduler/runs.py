"""Run messages and the run backend seam (re-exported from :mod:`tasks.runs`)."""

from scheduler.backends.local import LocalRunBackend, call_manager
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest, describe_error

__all__ = [
    "LocalRunBackend",
    "RunBackend",
    "RunEvent",
    "RunEventKind",
    "RunInbox",
    "RunRequest",
    "call_manager",
    "describe_error",
]
