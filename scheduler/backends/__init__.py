"""Run backends: where runs execute (this process, or a fleet of workers)."""

from scheduler.backends.local import LocalRunBackend, call_manager

__all__ = ["LocalRunBackend", "call_manager"]
