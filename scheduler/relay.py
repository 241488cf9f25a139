"""``EventRelay``: tells the dispatcher's events to its observers and its listeners.

A change's events reach the observers (the retry timer) where the change was applied, and the
listeners (webhooks, host callbacks) on the event loop: at once for the changes the dispatcher's
own API made (after saving), from the loop for the store's (which may come under the table's
lock). Save health becomes ``SaveFailed`` / ``SaveRecovered`` events here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from jobstores.core import Applied
from scheduler.listeners import DispatcherEvent, Listeners, SaveFailed, SaveRecovered

__all__ = ["EventRelay", "Observer"]

logger = logging.getLogger("scheduler.dispatcher")  # the dispatcher's log, as it always was

Observer = Callable[[DispatcherEvent], None]
"""Told of every event where its change was applied (on the loop for run events)."""


class EventRelay:
    """Tells every event to the observers, then to the listeners (one failing is logged and
    never stops the others or the dispatcher)."""

    def __init__(self, listeners: Listeners, now: Callable[[], datetime]) -> None:
        self.listeners = listeners
        self.observers: list[Observer] = []
        self._now = now

    def tell_applied(self, applied: Applied) -> None:
        """Tell the events of a change the dispatcher's API applied (after saving)."""
        for event in applied.events:
            self._observe(event)
            if self.listeners:
                self.listeners.emit(event)

    def relay(self, events: Sequence[DispatcherEvent]) -> None:
        """Tell the store's events: the listeners hear of them from the loop, once the
        table's lock (maybe held now) is released."""
        for event in events:
            self._observe(event)
            if self.listeners:
                self.listeners.emit_soon(event)

    def tell_save(self, error: str | None) -> None:
        """Tell the listeners that saving failed (``error``) or works again (None)."""
        if not self.listeners:
            return
        now = self._now()
        event: DispatcherEvent = (
            SaveRecovered(at=now) if error is None else SaveFailed(at=now, error=error)
        )
        self.listeners.emit_soon(event)

    def _observe(self, event: DispatcherEvent) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                logger.exception("an observer failed on %s of task %s", event.kind, event.task_id)
