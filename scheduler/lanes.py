"""Per-account lanes: one run at a time per account, in the account's priority order.

Runs of different accounts proceed concurrently, up to a global limit. A lane hands itself to
the waiting run whose task stands first in the account's order at that moment, so a
``reorder_task`` takes effect for runs already waiting.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

__all__ = ["AccountLanes"]


@dataclass(eq=False)
class _Waiter:
    task_id: str
    sequence: int
    future: asyncio.Future[None]


@dataclass(eq=False)
class _Lane:
    busy: bool = False
    grant_pending: bool = False
    waiters: list[_Waiter] = field(default_factory=list)


class AccountLanes:
    """Grants run slots: serial within an account, concurrent across accounts."""

    def __init__(self, max_concurrent_runs: int, priority: Callable[[str], int]) -> None:
        if max_concurrent_runs < 1:
            raise ValueError(f"max_concurrent_runs: must be at least 1, got {max_concurrent_runs}")
        self.max_concurrent_runs = max_concurrent_runs
        self._priority = priority
        self._lanes: dict[str, _Lane] = {}
        self._sequence = itertools.count()
        self._global: asyncio.Semaphore | None = None

    def waiting(self, account: str) -> list[str]:
        """Task ids waiting for ``account``'s lane, in arrival order."""
        lane = self._lanes.get(account)
        return [w.task_id for w in lane.waiters] if lane else []

    @asynccontextmanager
    async def slot(self, account: str, task_id: str) -> AsyncIterator[None]:
        """Hold ``account``'s lane (and one global slot) for the duration of the block."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.setdefault(account, _Lane())
        waiter = _Waiter(task_id, next(self._sequence), loop.create_future())
        lane.waiters.append(waiter)
        self._schedule_grant(lane, loop)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(account, lane, loop)
            elif waiter in lane.waiters:
                lane.waiters.remove(waiter)
            raise
        try:
            if self._global is None:
                self._global = asyncio.Semaphore(self.max_concurrent_runs)
            async with self._global:
                yield
        finally:
            self._release(account, lane, loop)

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
        lane.waiters = [w for w in lane.waiters if not w.future.done()]
        if not lane.waiters:
            return
        chosen = min(lane.waiters, key=lambda w: (self._priority(w.task_id), w.sequence))
        lane.waiters.remove(chosen)
        lane.busy = True
        chosen.future.set_result(None)

    def _release(self, account: str, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        lane.busy = False
        if lane.waiters:
            self._schedule_grant(lane, loop)
        elif self._lanes.get(account) is lane and not lane.grant_pending:
            del self._lanes[account]
