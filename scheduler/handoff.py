"""``RunHandoff``: hands the runs the API asks for over to the runner on the dispatcher's loop.

The API may be called from any thread; the runner, its lanes and its runs belong to the event
loop the dispatcher was started on. Two things cross over here:

- a manual run asked for (``run_now``) is queued for its account's lane once, and queued again
  when a run of the task ends while it is still asked for (asked again while it ran, or it found
  another run of its task out when its lane came);
- the run a paused or removed task had sent but not started is withdrawn (a worker that holds
  it already lets it finish).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jobstores.jsonfile import JsonJobStore
from scheduler.engine import DispatchScheduler
from scheduler.runner import TaskRunner
from tasks.model import TaskRecord, TaskStatus
from tasks.runs import RunEvent, RunRequest

__all__ = ["RunHandoff"]

logger = logging.getLogger("scheduler.dispatcher")  # the dispatcher's log, as it always was


def _manual_done(outcome: asyncio.Future[RunEvent | None]) -> None:
    """Collect a manual run's outcome (its errors are logged where they happen)."""
    if not outcome.cancelled() and outcome.exception() is not None:
        logger.error("a manual run raised: %s", outcome.exception())


class RunHandoff:
    """Queues manual runs and withdraws sent runs, on the loop bound at start."""

    def __init__(
        self, store: JsonJobStore, runner: TaskRunner, scheduler: DispatchScheduler
    ) -> None:
        self._store = store
        self._runner = runner
        self._scheduler = scheduler
        self.loop: asyncio.AbstractEventLoop | None = None
        """The dispatcher's loop (None until it starts)."""
        self._manual_queued: set[str] = set()
        """Tasks whose manual run is queued for its lane (so it is queued once)."""

    def _running(self) -> bool:
        return bool(self._scheduler.running)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand runs over to ``loop`` from now on."""
        self.loop = loop

    def _call_on_loop(self, loop: asyncio.AbstractEventLoop, call: Callable[[], None]) -> None:
        """``call()`` at once on ``loop``'s own thread, else soon on ``loop``."""
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            call()
        else:
            loop.call_soon_threadsafe(call)

    def withdraw_sent(self, record: TaskRecord) -> None:
        """A paused or removed task's run that was sent but not started never starts (a
        worker that holds it already lets it finish)."""
        run = record.active_run
        loop = self.loop
        if run is None or not run.queued or loop is None or not self._running():
            return
        if record.status is not TaskStatus.PAUSED and self._store.table.find(record.task_id):
            return  # a settled task that stays: nothing changed for its run
        run_id = run.run_id
        self._call_on_loop(loop, lambda: self._runner.cancel_sent(run_id))

    def submit_manual(self, task_id: str) -> None:
        """Queue the manual run asked for ``task_id`` (from any thread; a no-op until the
        dispatcher starts, which queues every run asked for)."""
        loop = self.loop
        if loop is None or not self._running() or loop.is_closed():
            return

        def submit() -> None:
            record = self._store.table.find(task_id)
            if record is None or record.run_requested is None or not self._running():
                return
            if task_id in self._manual_queued:
                return
            self._manual_queued.add(task_id)
            outcome = self._runner.submit(task_id, record.run_requested, manual=True)
            outcome.add_done_callback(_manual_done)
            outcome.add_done_callback(lambda _: self._manual_queued.discard(task_id))

        # On the loop's thread it is queued at once, so that run_pending() sees it.
        self._call_on_loop(loop, submit)

    def take_up_manual(
        self,
        request: RunRequest,
        event: RunEvent,
        before: TaskRecord | None,
        after: TaskRecord | None,
    ) -> None:
        """A manual run that opened is no longer queued; when a run ends, a manual run still
        asked for is queued again (a watcher of the run ledger)."""
        if request.trigger == "manual":
            self._manual_queued.discard(request.task_id)
        if event.kind.finished and after is not None and after.run_requested is not None:
            self.submit_manual(after.task_id)
