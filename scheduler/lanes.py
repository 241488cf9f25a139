"""Per-account lanes: one run at a time per account, in the account's priority order.

Runs of different accounts proceed concurrently, up to a global limit. A lane hands itself to
the waiting run whose task stands first in the account's order, so a ``reorder_task`` takes
effect for runs already waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["AccountLanes"]


@dataclass(eq=False, slots=True)
class _Waiter:
    task_id: str
    sequence: int
    future: asyncio.Future[None]


@dataclass(eq=False)
class _Lane:
    busy: bool = False
    grant_pending: bool = False
    order_version: int = -1
    queue: list[tuple[int, int, _Waiter]] = field(default_factory=list)


class AccountLanes:
    """Grants run slots: serial within an account, concurrent across accounts.

    ``priority(task_id)`` is the task's position in its account's order (lower runs first);
    ``order_version()`` changes whenever positions may have changed, so waiting runs are
    re-ranked only then.
    """

    def __init__(
        self,
        max_concurrent_runs: int,
        priority: Callable[[str], int],
        order_version: Callable[[], int] = lambda: 0,
    ) -> None:
        if max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs: must be at least 1, got {max_concurrent_runs}")
        self.max_concurrent_runs = max_concurrent_runs
        self._priority = priority
        self._order_version = order_version
        self._lanes: dict[str, _Lane] = {}
        self._sequence = itertools.count()
        self._global: asyncio.Semaphore | None = None

    def waiting(self, account: str) -> list[str]:
        """Task ids waiting for ``account``'s lane, in arrival order."""
        lane = self._lanes.get(account)
        if lane is None:
            return []
        waiters = sorted(
            (w for _, _, w in lane.queue if not w.future.done()), key=lambda w: w.sequence
        )
        return [w.task_id for w in waiters]

    def waiting_counts(self) -> dict[str, int]:
        """Account id -> number of runs waiting for its lane (accounts with a lane in use).

        Safe to call from another thread (for metrics): it reads copies, and a count may be
        a moment old.
        """
        counts: dict[str, int] = {}
        for account, lane in list(self._lanes.items()):
            counts[account] = sum(not w.future.done() for _, _, w in list(lane.queue))
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
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(account)
        if lane is None:
            lane = self._lanes[account] = _Lane(order_version=self._order_version())
        waiter = _Waiter(task_id, next(self._sequence), loop.create_future())
        heapq.heappush(lane.queue, (self._priority(task_id), waiter.sequence, waiter))
        self._schedule_grant(lane, loop)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(account, lane, loop)
            raise
        if self._global is None:
            self._global = asyncio.Semaphore(self.max_concurrent_runs)
        try:
            await self._global.acquire()
        except asyncio.CancelledError:
            self._release(account, lane, loop)
            raise

    def release(self, account: str) -> None:
        """Give back ``account``'s lane and the global slot taken by :meth:`acquire`."""
        assert self._global is not None
        self._global.release()
        self._release(account, self._lanes[account], asyncio.get_running_loop())

    def _schedule_grant(self, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        # Granting on the next loop iteration lets every run submitted in the same scheduler
        # pass join the queue first, so priority, not submission order, decides.
        if not lane.busy and not lane.grant_pending:
            lane.grant_pending = True
            loop.call_soon(self._grant, lane)

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
                if not w.future.done()
            ]
            heapq.heapify(lane.queue)
        while lane.queue:
            _, _, waiter = heapq.heappop(lane.queue)
            if not waiter.future.done():
                lane.busy = True
                waiter.future.set_result(None)
                return

    def _release(self, account: str, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        lane.busy = False
        if lane.queue:
            self._schedule_grant(lane, loop)
        elif self._lanes.get(account) is lane and not lane.grant_pending:
            del self._lanes[account]
