"""From "APScheduler submitted a run" to "its outcome is on the task record".

A run goes: due (APScheduler) -> the account lane -> the ledger opens it (the gate: paused,
removed, outside the window or past the end means skipped) -> the backend executes it ->
its events come back to the ledger -> the lane is released.

While it waits for its lane a run is the runner's alone (:meth:`TaskRunner.waiting`; the store
asks it when the schedule runs out or a fault is found). The core hears of a run when it opens
and when it ends, the end settling it (a local run: two commands; a remote one: three, its
``started`` event between); a run that never opens is settled by one command.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jobstores.jsonfile import JsonJobStore
from scheduler.backends.local import finish_or_cancel
from scheduler.lanes import AccountLanes, Waiter
from scheduler.ledger import RunLedger
from tasks.errors import BrokerUnavailableError
from tasks.runs import NOT_SENT, RunBackend, RunEvent, RunEventKind, RunRequest, describe_error

__all__ = ["TaskRunner"]

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Queued:
    """A submitted run waiting for its account's lane: no task until the lane is granted."""

    runner: TaskRunner
    task_id: str
    scheduled_at: datetime
    attempt: int
    outcome: asyncio.Future[RunEvent | None]
    manual: bool = False
    waiter: Waiter | None = None
    started: bool = False

    def __call__(self) -> None:
        """The lane and a global slot are granted: run it (the lanes' ``grant``)."""
        self.runner._start(self)


class TaskRunner:
    """Runs submitted tasks through their account lane, the ledger and the backend."""

    def __init__(
        self, store: JsonJobStore, backend: RunBackend, lanes: AccountLanes, ledger: RunLedger
    ) -> None:
        self._store = store
        self._backend = backend
        self._lanes = lanes
        self._ledger = ledger
        self._tasks: dict[asyncio.Task[Any], _Queued | None] = {}
        """Runs executing (or holding a recovered run's lane), with their queue entries."""
        self._queued: set[_Queued] = set()
        """Runs waiting for their lanes."""
        self._cancels: set[asyncio.Task[None]] = set()
        self._waiting: Counter[str] = Counter()
        """Task id -> its runs submitted and not yet opened, skipped or cut off."""
        store.runs_waiting = self.waiting
        self.leading: Callable[[], bool] | None = None
        """Whether this dispatcher leads at this instant (a shared store's lease); asked
        just before a run starts or is sent (None: it always leads)."""

    def waiting(self, task_id: str) -> bool:
        """Whether a run of ``task_id`` was submitted and waits to open (for its lane, or
        just granted it)."""
        return task_id in self._waiting

    def _unwait(self, task_id: str) -> None:
        count = self._waiting[task_id] - 1
        if count > 0:
            self._waiting[task_id] = count
        else:
            del self._waiting[task_id]

    def submit(
        self, task_id: str, scheduled_at: datetime, attempt: int = 1, *, manual: bool = False
    ) -> asyncio.Future[RunEvent | None]:
        """Queue attempt ``attempt`` of a run of ``task_id`` planned for ``scheduled_at`` (2
        and up: a retry; ``manual``: asked for with "run now"); call on the event loop. The
        future is the run's finishing event (None: skipped, or the task is gone); it is
        cancelled if the run is cut off.

        A run waits for its lane as a queue entry: its task is made once it may start, so a
        pass that finds thousands of runs due does not make thousands of waiting tasks.
        """
        record = self._store.table.find(task_id)
        if record is None:
            return self._spawn(self._gone(), task_id)
        self._waiting[task_id] += 1
        queued = _Queued(
            self,
            task_id,
            scheduled_at,
            attempt,
            asyncio.get_running_loop().create_future(),
            manual,
        )
        self._queued.add(queued)
        queued.waiter = self._lanes.enqueue(record.account_id, task_id, queued)
        return queued.outcome

    def resume(self, request: RunRequest) -> asyncio.Task[RunEvent | None]:
        """Hold the lane of a run recovered after a restart until it ends.

        The lane is taken before this returns (unless another recovered run of the account
        holds it): called before the scheduler starts, no run of the account that is due
        can start beside a run still executing on a worker.
        """
        held = self._lanes.occupy(request.account_id)
        return self._spawn(self._hold(request, held), request.task_id)

    def cancel_sent(self, run_id: str) -> None:
        """Ask the backend to withdraw ``run_id`` if no worker started it yet (call on the
        loop); if it is withdrawn, its ``cancelled`` event closes it and frees its lane."""

        async def cancel() -> None:
            try:
                if await self._backend.cancel(run_id):
                    logger.info("run %s withdrawn before it started", run_id)
            except Exception:
                logger.exception("run %s could not be withdrawn", run_id)

        task = asyncio.get_running_loop().create_task(cancel(), name=f"cancel run {run_id}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    def _spawn(
        self, coroutine: Coroutine[Any, Any, RunEvent | None], task_id: str
    ) -> asyncio.Task[RunEvent | None]:
        task = asyncio.get_running_loop().create_task(
            coroutine, name=f"task-dispatcher run {task_id}"
        )
        self._tasks[task] = None
        task.add_done_callback(self._done)
        return task

    def _start(self, queued: _Queued) -> None:
        if queued.outcome.done():  # cancelled while it waited: it never runs
            self._withdraw(queued)
            return
        self._queued.discard(queued)
        task = asyncio.get_running_loop().create_task(
            self._run(queued), name=f"task-dispatcher run {queued.task_id}"
        )
        self._tasks[task] = queued
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        queued = self._tasks.pop(task, None)
        if queued is not None and not queued.started:
            # Cancelled before its first step: it never ran, so nothing else gives back
            # its lane or settles it.
            assert queued.waiter is not None
            self._lanes.withdraw(queued.waiter)
            self._unwait(queued.task_id)
            self._settled(queued.task_id)
            queued.outcome.cancel()

    def _withdraw(self, queued: _Queued) -> None:
        """Cut off a run still waiting for its lane (it never started)."""
        if queued not in self._queued:
            return
        self._queued.remove(queued)
        assert queued.waiter is not None
        self._lanes.withdraw(queued.waiter)
        self._unwait(queued.task_id)
        self._settled(queued.task_id)
        queued.outcome.cancel()

    def cut_off(self) -> int:
        """This dispatcher leads no more: withdraw the runs waiting for their lanes and cancel
        the local runs in progress, at once (call on the loop). Their outcomes could not be
        committed, and the instance that takes over records them as lost: going on would
        let a run it starts again, or the account's next one, overlap them. Runs on workers
        go on, for the new leader. Returns how many local runs were cut off."""
        if self._backend.remote:
            return 0
        waiting = list(self._queued)
        for queued in waiting:
            self._withdraw(queued)
        running = [task for task in self._tasks if not task.done()]
        for task in running:
            task.cancel()
        return len(waiting) + len(running)

    async def wait_idle(self) -> None:
        """Return when every run submitted so far has finished."""
        while self._tasks or self._queued:
            try:
                await asyncio.gather(
                    *self._tasks,
                    *(queued.outcome for queued in self._queued),
                    return_exceptions=True,
                )
            except asyncio.CancelledError:
                # The gather cancelled the runs it waited for (their outcomes, for runs
                # submitted while it waited): those still queued never run, those started
                # since are cut off.
                for queued in list(self._queued):
                    if queued.outcome.cancelled():
                        self._withdraw(queued)
                for task, started in list(self._tasks.items()):
                    if started is not None and started.outcome.cancelled():
                        task.cancel()
                raise

    async def drain(self, grace_period: float | None) -> None:
        """Let runs finish for up to ``grace_period`` seconds, then cancel the rest and wait."""
        running = {*self._tasks, *(queued.outcome for queued in self._queued)}
        if running:
            await asyncio.wait(running, timeout=grace_period)
        # Those still waiting never start (withdrawn first, so that the runs cancelled next
        # hand their lanes to nobody), then those still going are cancelled.
        cancelled = len(self._queued)
        for queued in list(self._queued):
            self._withdraw(queued)
        left = await finish_or_cancel(list(self._tasks), 0)
        if self._backend.remote:
            # Remote runs are not cancelled: they go on on their workers.
            if left:
                logger.info(
                    "stopping: %d run(s) still executing on workers; their outcomes are "
                    "applied when the dispatcher is back",
                    left,
                )
            left = 0
        cancelled += left
        if cancelled:
            logger.warning(
                "stopping: %d run(s) did not finish in %ss and were cancelled",
                cancelled,
                grace_period,
            )

    async def _gone(self) -> None:
        """The task was removed before its run was submitted: nothing to run or settle."""

    async def _run(self, queued: _Queued) -> None:
        """Open the granted run, execute it, give back its lane; resolve its outcome."""
        queued.started = True
        outcome = queued.outcome
        task_id = queued.task_id
        assert queued.waiter is not None
        try:
            try:
                request: RunRequest | None = None
                try:
                    if self.leading is None or self.leading():  # else no run starts
                        request = self._ledger.open(
                            task_id, queued.scheduled_at, queued.attempt, manual=queued.manual
                        )
                finally:
                    self._unwait(task_id)
                    if request is None:
                        self._settled(task_id)  # skipped: it never opened
                # Opened: its end (finished, cancelled or cut off) settles it.
                event = None if request is None else await self._execute(request)
            finally:
                self._lanes.release(queued.waiter.account)
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except BaseException as exc:
            if not outcome.done():
                outcome.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not outcome.done():
            outcome.set_result(event)

    async def _hold(self, request: RunRequest, held: bool) -> RunEvent | None:
        # The run is open (recovered from its record): its end settles it.
        if not held:
            await self._lanes.acquire(request.account_id, request.task_id)
        try:
            ended = self._ledger.ended(request.run_id)
            return None if ended is None else await ended
        finally:
            self._lanes.release(request.account_id)

    async def _execute(self, request: RunRequest) -> RunEvent:
        """Hand an opened run to the backend and return its finishing event: the one a
        backend executing in this task returns, else the one its inbox receives."""
        backend = self._backend
        ended = self._ledger.ended(request.run_id)
        assert ended is not None
        try:
            if backend.remote and not await self._store.save_async():
                # At most once: a run is sent only once it is on disk as sent.
                error = (
                    f"not sent: the run could not be saved ({self._store.save_health.last_error})"
                )
                self._ledger.apply(self._failed(request, error))
            elif backend.remote and self.leading is not None and not self.leading():
                # Asked again after the save (the lease may have gone meanwhile); a run
                # that executes here starts right after it was opened, asked just before.
                error = "not sent: this dispatcher no longer leads"
                self._ledger.apply(self._failed(request, error, {NOT_SENT: True}))
            else:
                if not backend.remote:
                    self._store.request_save()
                try:
                    event = await backend.submit(request)
                except BrokerUnavailableError as exc:
                    # The backend reports the outage (once, and how many runs it cost).
                    self._ledger.apply(
                        self._failed(request, f"could not be sent: {exc}", {NOT_SENT: True})
                    )
                except Exception as exc:
                    self._ledger.apply(
                        self._failed(request, f"could not be sent: {describe_error(exc)}")
                    )
                else:
                    if event is not None:  # executed in this task: it is applied
                        return event
            return await asyncio.shield(ended)
        except asyncio.CancelledError:
            if not backend.remote:
                self._ledger.abandon(request.run_id)
            raise

    def _failed(
        self, request: RunRequest, error: str, extra: dict[str, object] | None = None
    ) -> RunEvent:
        return RunEvent(
            request.run_id,
            request.task_id,
            RunEventKind.FAILED,
            at=self._store.now(),
            error=error,
            extra=extra or {},
        )

    def _settled(self, task_id: str) -> None:
        """A run of ``task_id`` that never opened is over."""
        if self._store.run_settled(task_id) and not self._store.closed:
            self._store.request_save()
