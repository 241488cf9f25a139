"""Retries of failed runs: a timer that submits each planned retry through the runner.

The retry itself is decided when the failure is applied (:func:`tasks.lifecycle.run_finished`)
and saved in the record (``retry``), so it survives a restart; this module only keeps the
time. A retry goes through the account lane and the ledger's gate like any run, and is
skipped if the record no longer plans it (paused, edited, or the next planned run came first).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from datetime import datetime

from jobstores.jsonfile import JsonJobStore
from tasks.events import DispatcherEvent, RunRetried
from tasks.runs import RunEvent

__all__ = ["RetryTimer"]

logger = logging.getLogger(__name__)

Submit = Callable[[str, datetime, int], "asyncio.Future[RunEvent | None]"]


class RetryTimer:
    """Submits planned retries when their time comes (call on the event loop).

    Planned retries wait in a heap by time, so taking one up costs a heap push, not a look
    at every other one: an outage that fails every task plans a retry for each at once.
    """

    def __init__(self, store: JsonJobStore, submit: Submit) -> None:
        self._store = store
        self._submit = submit
        self._due: dict[str, datetime] = {}
        """Task id -> when its planned retry may start."""
        self._heap: list[tuple[datetime, str]] = []
        """``(time, task id)`` for every entry of ``_due``, and for times since replaced (a
        pair no longer in ``_due`` is passed over)."""
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: datetime | None = None
        self._running = False

    def start(self) -> None:
        """Take up the retries saved in the records and arm the timer."""
        self._running = True
        for record in self._store.table.records():
            if record.retry is not None:
                self._due[record.task_id] = record.retry.at
        self._heap = [(at, task_id) for task_id, at in self._due.items()]
        heapq.heapify(self._heap)
        self._arm()

    def stop(self) -> None:
        """Submit nothing more (the retries stay saved in their records)."""
        self._running = False
        self._disarm()

    def observe(self, event: DispatcherEvent) -> None:
        """An event of the core (on the loop, where its change was applied): take up the
        retry a :class:`~tasks.events.RunRetried` planned."""
        if isinstance(event, RunRetried):
            at = event.retry_at
            self._due[event.task_id] = at
            heapq.heappush(self._heap, (at, event.task_id))
            if len(self._heap) > 2 * len(self._due) + 64:  # mostly replaced times: drop them
                self._heap = [(at, task_id) for task_id, at in self._due.items()]
                heapq.heapify(self._heap)
            if self._armed_for is None or at < self._armed_for:
                self._arm()

    def fire_due(self) -> int:
        """Submit every retry whose time has come, earliest first; return how many were
        submitted."""
        if not self._running:
            return 0
        now = self._store.now()
        fired = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, task_id = heapq.heappop(heap)
            if self._due.get(task_id) != at:
                continue  # replaced by a later plan, or taken up already
            del self._due[task_id]
            record = self._store.table.find(task_id)
            retry = record.retry if record is not None else None
            if retry is None or retry.at > now:
                continue
            self._submit(task_id, retry.scheduled_at, retry.attempt)
            fired += 1
        self._arm()
        return fired

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_for = None

    def _arm(self) -> None:
        """Set the timer for the earliest planned retry."""
        self._disarm()
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if not self._running or not heap:
            return
        self._armed_for = heap[0][0]
        delay = (self._armed_for - self._store.now()).total_seconds()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(delay, 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_for = None
        try:
            self.fire_due()
        except Exception:  # pragma: no cover - a retry must never stop the others
            logger.exception("submitting retries failed; trying again in 5 s")
            self._timer = asyncio.get_running_loop().call_later(5.0, self._fire)
