"""Run backends: where runs execute (this process, or a fleet of workers).

``CeleryRunBackend`` needs the ``celery`` extra: ``pip install 'task-dispatcher[celery]'``.
"""

from typing import TYPE_CHECKING, Any

from scheduler.backends.local import LocalRunBackend, call_manager

if TYPE_CHECKING:
    from scheduler.fleet.backend import CeleryRunBackend

__all__ = ["CeleryRunBackend", "LocalRunBackend", "call_manager"]

_EXTRA_MODULES = {"celery", "kombu", "redis", "billiard", "vine"}


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import scheduler` works without the celery extra.
    if name != "CeleryRunBackend":
        raise AttributeError(f"module 'scheduler.backends' has no attribute {name!r}")
    try:
        from scheduler.fleet.backend import CeleryRunBackend
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in _EXTRA_MODULES:
            raise
        raise ImportError(
            "CeleryRunBackend needs the celery extra: pip install 'task-dispatcher[celery]' "
            f"({exc})"
        ) from exc
    return CeleryRunBackend
