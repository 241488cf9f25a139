"""Per-account lanes: one run at a time per account, in the account's priority order.

Runs of different accounts proceed concurrently, up to a global limit. A lane hands itself to
the waiting run whose task stands first in the account's order, so a ``reorder_task`` takes
effect for runs already waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["AccountLanes", "Waiter"]


_WAITING = 0
"""Queued for its account's lane."""
_LANE = 1
"""Holds its account's lane, queued for a global slot."""
_GRANTED = 2
"""Holds the lane and a global slot: its ``grant`` was called."""
_WITHDRAWN = 3
"""Taken back before it was granted (its run was cancelled)."""


@dataclass(eq=False, slots=True)
class Waiter:
    """A run queued for its account's lane: :meth:`AccountLanes.enqueue`'s ticket."""

    account: str
    task_id: str
    sequence: int
    grant: Callable[[], object]
    state: int = _WAITING


@dataclass(eq=False)
class _Lane:
    busy: bool = False
    grant_pending: bool = False
    order_version: int = -1
    queue: list[tuple[float, int, Waiter]] = field(default_factory=list)


class AccountLanes:
    """Grants run slots: serial within an account, concurrent across accounts.

    ``priority(task_id)`` orders the task as its position in its account's order does (lower
    runs first);
    ``order_version()`` changes whenever positions may have changed, so waiting runs are
    re-ranked only then. Call on the event loop, except :meth:`waiting_counts`.
    """

    def __init__(
        self,
        max_concurrent_runs: int,
        priority: Callable[[str], float],
        order_version: Callable[[], int] = lambda: 0,
    ) -> None:
        if max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs: must be at least 1, got {max_concurrent_runs}")
        self.max_concurrent_runs = max_concurrent_runs
        self._priority = priority
        self._order_version = order_version
        self._lanes: dict[str, _Lane] = {}
        self._sequence = itertools.count()
        self._free = max_concurrent_runs
        """Global slots nobody holds."""
        self._slot_queue: deque[Waiter] = deque()
        """Holders of a lane waiting for a global slot, in the order their lanes came."""

    def waiting(self, account: str) -> list[str]:
        """Task ids waiting for ``account``'s lane, in arrival order."""
        lane = self._lanes.get(account)
        if lane is None:
            return []
        waiters = sorted(
            (w for _, _, w in lane.queue if w.state == _WAITING), key=lambda w: w.sequence
        )
        return [w.task_id for w in waiters]

    def waiting_counts(self) -> dict[str, int]:
        """Account id -> number of runs waiting for its lane (accounts with a lane in use).

        Safe to call from another thread (for metrics): it reads copies, and a count may be
        a moment old.
        """
        counts: dict[str, int] = {}
        for account, lane in list(self._lanes.items()):
            counts[account] = sum(w.state == _WAITING for _, _, w in list(lane.queue))
        return counts

    @asynccontextmanager
    async def slot(self, account: str, task_id: str) -> AsyncIterator[None]:
        """Hold ``account``'s lane (and one global slot) for the duration of the block."""
        await self.acquire(account, task_id)
        try:
            yield
        finally:
            self.release(account)

    async def acquire(self, account: str, task_id: str) -> None:
        """Wait for ``account``'s lane and a global slot; pair with :meth:`release`."""
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def grant() -> None:
            if not granted.done():
                granted.set_result(None)

        waiter = self.enqueue(account, task_id, grant)
        try:
            await granted
        except asyncio.CancelledError:
            self.withdraw(waiter)
            raise

    def occupy(self, account: str) -> bool:
        """Take ``account``'s lane and a global slot now, before anything queued for it; pair
        with :meth:`release`. False (nothing taken) if the lane is already held.

        For a run that is already executing when the dispatcher starts (recovered after a
        restart): it holds its lane before the first scheduler pass queues anything, so no
        run of its account starts beside it. It takes a global slot even when none is free
        (the run is going on whatever the limit says); the next release gives it back.
        """
        lane = self._lanes.get(account)
        if lane is None:
            lane = self._lanes[account] = _Lane(order_version=self._order_version())
        if lane.busy:
            return False
        lane.busy = True
        self._free -= 1
        return True

    def enqueue(self, account: str, task_id: str, grant: Callable[[], object]) -> Waiter:
        """Queue a run of ``task_id`` for ``account``'s lane without waiting: ``grant()`` is
        called (from the loop) once it holds the lane and a global slot; it then gives them
        back with :meth:`release`. :meth:`withdraw` takes back a waiter at any point.

        What :meth:`acquire` does without a coroutine and a future per waiting run: a
        scheduler pass may queue thousands of runs at once.
        """
        lane = self._lanes.get(account)
        if lane is None:
            lane = self._lanes[account] = _Lane(order_version=self._order_version())
        waiter = Waiter(account, task_id, next(self._sequence), grant)
        heapq.heappush(lane.queue, (self._priority(task_id), waiter.sequence, waiter))
        self._schedule_grant(lane)
        return waiter

    def withdraw(self, waiter: Waiter) -> None:
        """Take ``waiter`` out of its queue, giving back the lane (and slot) it holds."""
        state, waiter.state = waiter.state, _WITHDRAWN
        if state == _LANE:
            self._slot_queue.remove(waiter)
            self._release(waiter.account)
        elif state == _GRANTED:
            self._release_slot()
            self._release(waiter.account)

    def release(self, account: str) -> None:
        """Give back ``account``'s lane and the global slot taken by :meth:`acquire` (or held
        by a granted :meth:`enqueue` waiter)."""
        self._release_slot()
        self._release(account, at_once=True)

    def _release_slot(self) -> None:
        if self._slot_queue and self._free >= 0:
            waiter = self._slot_queue.popleft()  # the slot passes on, held all along
            waiter.state = _GRANTED
            waiter.grant()
        else:
            self._free += 1

    def _schedule_grant(self, lane: _Lane) -> None:
        # Granting on the next loop iteration lets every run submitted in the same scheduler
        # pass join the queue first, so priority, not submission order, decides.
        if not lane.busy and not lane.grant_pending:
            lane.grant_pending = True
            asyncio.get_running_loop().call_soon(self._grant, lane)

    def _grant(self, lane: _Lane) -> None:
        lane.grant_pending = False
        if lane.busy:
            return
        version = self._order_version()
        if version != lane.order_version:
            lane.order_version = version
            lane.queue = [
                (self._priority(w.task_id), w.sequence, w)
                for _, _, w in lane.queue
                if w.state == _WAITING
            ]
            heapq.heapify(lane.queue)
        while lane.queue:
            _, _, waiter = heapq.heappop(lane.queue)
            if waiter.state != _WAITING:
                continue
            lane.busy = True
            if self._free > 0:
                self._free -= 1
                waiter.state = _GRANTED
                waiter.grant()
            else:
                waiter.state = _LANE
                self._slot_queue.append(waiter)
            return

    def _release(self, account: str, *, at_once: bool = False) -> None:
        lane = self._lanes[account]
        lane.busy = False
        if lane.queue and at_once and not lane.grant_pending:
            # A run gave the lane back: whoever waits for it queued before (the wait for the
            # next loop iteration is for runs submitted together), so it passes on now.
            self._grant(lane)
        elif lane.queue:
            self._schedule_grant(lane)
        if not lane.queue and not lane.busy and not lane.grant_pending:
            del self._lanes[account]
