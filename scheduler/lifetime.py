"""``Lifetime``: starts the dispatcher's machinery, drives it for tests, and stops it in order.

Starting binds the listeners and the run handoff to the running loop, opens the run backend,
lets the runs still out on workers take their lanes before the first scheduler pass, starts
the scheduler and the retry timer and queues the manual runs asked for; a shared store's
standing is told to stand by (plan nothing more) once its lease is lost. Stopping undoes it in
order: planning, runs in progress, the backend, the listeners, the saves, the history, then
the store is released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from jobstores.jsonfile import JsonJobStore
from scheduler.history import RunHistory
from scheduler.leadership import Standing
from scheduler.listeners import Listeners
from scheduler.runpath import RunPath
from tasks.errors import DispatcherNotRunningError
from tasks.runs import RunBackend

__all__ = ["Lifetime"]

logger = logging.getLogger("scheduler.dispatcher")  # the dispatcher's log, as it always was

_LISTENER_GRACE = 10.0
"""Seconds :meth:`Lifetime.stop` waits for coroutine listeners (webhooks) to finish."""


class Lifetime:
    """Start, one pass (``run_pending``), stop and close of one dispatcher's parts."""

    def __init__(
        self,
        *,
        store: JsonJobStore,
        path: RunPath,
        backend: RunBackend,
        listeners: Listeners,
        history: RunHistory | None,
        standing: Callable[[], Standing | None],
        on_stand_by: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self.on_stand_by = on_stand_by
        """Called (on the loop) once planning stopped because the lease was lost."""
        self._scheduler = path.scheduler
        self._runner = path.runner
        self._retries = path.retries
        self._ledger = path.ledger
        self._handoff = path.handoff
        self._backend = backend
        self._listeners = listeners
        self._history = history
        self._standing = standing
        self._started_at: float | None = None

    def detach_history(self) -> None:
        """Leave the run history open when stopping (another lifetime uses it on)."""
        self._history = None

    @property
    def running(self) -> bool:
        """Whether it was started and not stopped yet."""
        return bool(self._scheduler.running)

    @property
    def uptime(self) -> float | None:
        """Seconds since it started (None if not started or stopped)."""
        if self._started_at is None or not self.running:
            return None
        return time.monotonic() - self._started_at

    async def start(self) -> None:
        """Start scheduling on the running event loop (a no-op if already started)."""
        if self._scheduler.running:
            return
        loop = asyncio.get_running_loop()
        self._handoff.bind(loop)
        self._listeners.bind(loop)
        await self._backend.open(self._ledger)
        recovered = self._ledger.recover() if self._backend.remote else []
        # Runs still out (on workers) hold their lanes before the first scheduler pass.
        for request in recovered:
            self._runner.resume(request)
        if recovered:
            await self._backend.recover(recovered)
        self._scheduler.start()
        self._started_at = time.monotonic()
        self._retries.start()
        for record in self._store.table.records():
            if record.run_requested is not None:
                self._handoff.submit_manual(record.task_id)
        planned = self._store.calls.first()
        directory = self._store.directory
        if planned is not None:
            task_id, when = planned
            logger.info("dispatcher on %s started; next run %s (task %s)", directory, when, task_id)
        else:
            logger.info("dispatcher on %s started; no run planned", directory)
        standing = self._standing()
        if standing is not None:
            standing.bind(loop, self._stand_by)

    def _stand_by(self) -> None:
        """The lease is lost: plan nothing more (runs are refused by the runner's gate), and
        cut off the local runs in progress (see :meth:`~scheduler.runner.TaskRunner.cut_off`)."""
        if self._scheduler.running:
            self._scheduler.pause()
            self._retries.stop()
            cut = self._runner.cut_off()
            if cut:
                logger.warning(
                    "%d local run(s) cut off: this dispatcher leads no more, and the instance "
                    "that takes over records them as lost",
                    cut,
                )
            if self.on_stand_by is not None:
                self.on_stand_by()

    async def run_pending(self) -> None:
        """Run every task due now and return when all runs in progress have finished and
        the state is saved."""
        if not self._scheduler.running:
            raise DispatcherNotRunningError(
                "run_pending() needs a started dispatcher: await start()"
            )
        self._scheduler.process_due()
        self._retries.fire_due()
        await self._runner.wait_idle()
        await self._store.save_async()
        if self._history is not None:
            await asyncio.to_thread(self._history.flush)

    async def stop(self, grace_period: float | None) -> None:
        """Stop scheduling, let runs in progress finish (cancelled after ``grace_period``
        seconds), save, and release the store. Idempotent."""
        if self._store.closed:
            return
        if self._scheduler.running:
            self._scheduler.pause()
            self._retries.stop()
            await self._runner.drain(grace_period)
            await self._backend.close(0)
            self._scheduler.shutdown(wait=False)
            await self._listeners.drain(_LISTENER_GRACE)
        await self._store.saver.drain()
        self._store.table.touch()  # the final save happens even if nothing changed
        await self._store.save_async()
        if self._history is not None:
            await asyncio.to_thread(self._history.close)
        self._store.close()
        logger.info("dispatcher on %s stopped", self._store.directory)

    def close(self, save: bool) -> None:
        """Save (unless not ``save``) and release the store of a dispatcher not running."""
        if self._store.closed:
            return
        if self._scheduler.running:
            raise DispatcherNotRunningError("the dispatcher is running: use 'await stop()'")
        if save:
            self._store.save()
        if self._history is not None:
            self._history.close()
        self._store.close()
