"""``SaveFailures``: the dispatcher's policy for a change whose save failed.

The change stays applied (it is scheduled and announced like any other), a background retry
of the save is asked for, and the caller hears of it last, as a
:class:`~tasks.errors.SaveFailedError` naming the tasks changed.
"""

from __future__ import annotations

from collections.abc import Iterable

from jobstores.jsonfile import JsonJobStore
from tasks.errors import SaveFailedError

__all__ = ["SaveFailures"]


class SaveFailures:
    """Raises :class:`SaveFailedError` for a change not saved, after asking for a retry."""

    def __init__(self, store: JsonJobStore) -> None:
        self._store = store

    def check(self, saved: bool, task_ids: Iterable[str]) -> None:
        """Raise :class:`SaveFailedError` naming ``task_ids`` unless ``saved``.

        Called last by each change: one whose save failed is in effect all the same.
        """
        if saved:
            return
        self._store.saver.request_retry()  # a background retry is scheduled when there is a loop
        health = self._store.save_health
        raise SaveFailedError(
            self._store.path,
            tuple(task_ids),
            health.last_error or "unknown error",
            retried=not health.permanent,
        )
