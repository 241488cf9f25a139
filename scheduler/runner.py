"""From "APScheduler submitted a run" to "the outcome is on the task record"."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, tzinfo

from jobstores.jsonfile import JsonJobStore
from scheduler.lanes import AccountLanes
from scheduler.runs import RunBackend, RunOutcome, RunRequest, describe_error
from scheduler.triggers import end_instant, may_start
from tasks import runs as messages
from tasks.model import TaskStatus

__all__ = ["RunObserver", "TaskRunner"]

RunObserver = Callable[[messages.RunRequest, messages.RunEvent], None]
"""Told of every run event (on the event loop): must return quickly and not raise."""

logger = logging.getLogger(__name__)


class TaskRunner:
    """Runs submitted tasks through their account lane and records each outcome.

    A run starts only if, at the moment it gets its lane, the task is neither paused nor
    removed, its window is open and its end time not passed; otherwise it is skipped (this is
    what makes missed runs coalesce into at most one run, and only inside the window).
    """

    def __init__(
        self, store: JsonJobStore, backend: RunBackend, lanes: AccountLanes, zone: tzinfo
    ) -> None:
        self._store = store
        self._backend = backend
        self._lanes = lanes
        self._zone = zone
        self._tasks: set[asyncio.Task[RunOutcome | None]] = set()
        # Run ids: unique per process by the counter, across processes by the prefix.
        self._run_prefix = uuid.uuid4().hex[:12]
        self._run_numbers = itertools.count(1)
        self.observers: list[RunObserver] = []
        """Called with each run's events (the run history, metrics)."""
        self._messages: dict[str, messages.RunRequest] = {}

    @property
    def backend_name(self) -> str:
        """The class name of the run backend."""
        return type(self._backend).__name__

    def submit(self, task_id: str, scheduled_at: datetime) -> asyncio.Task[RunOutcome | None]:
        """Queue a run of ``task_id`` planned for ``scheduled_at``; call on the event loop."""
        self._store.run_submitted(task_id)
        task = asyncio.get_running_loop().create_task(
            self._run(task_id, scheduled_at), name=f"task-dispatcher run {task_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_idle(self) -> None:
        """Return when every run submitted so far has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def drain(self, grace_period: float | None) -> None:
        """Let runs finish for up to ``grace_period`` seconds, then cancel the rest and wait."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_period)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning(
                "stopping: %d run(s) did not finish in %ss and were cancelled",
                len(pending),
                grace_period,
            )
            await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self, task_id: str, scheduled_at: datetime) -> RunOutcome | None:
        try:
            record = self._store.find(task_id)
            if record is None:
                return None
            account = record.account_id
            await self._lanes.acquire(account, task_id)
            try:
                request = self._begin(task_id, scheduled_at)
                if request is None:
                    return None
                outcome: RunOutcome | None = None
                try:
                    outcome = await self._backend.execute(request)
                except asyncio.CancelledError:
                    self._interrupted(task_id)
                    raise
                except Exception as exc:
                    outcome = RunOutcome(request.run_id, error=describe_error(exc))
                finally:
                    self._observe_end(request, outcome)
                self._finish(request, outcome)
                return outcome
            finally:
                self._lanes.release(account)
        finally:
            self._store.run_settled(task_id)
            if not self._store.closed:
                self._store.request_save()

    def _begin(self, task_id: str, scheduled_at: datetime) -> RunRequest | None:
        store = self._store
        with store.lock:
            record = store.find(task_id)
            if record is None or store.closed:
                return None
            if record.status in (TaskStatus.PAUSED, TaskStatus.COMPLETED):
                logger.info(
                    "run of task %s (account %s) skipped: task is %s",
                    task_id,
                    record.account_id,
                    record.status.value,
                )
                return None
            now = store.now()
            end = end_instant(record.task_end_time, self._zone)
            if not may_start(now, record.valid_time_range, end, self._zone):
                logger.info(
                    "run of task %s (account %s) planned for %s skipped: outside hours %d-%d "
                    "or past its end time; next run %s",
                    task_id,
                    record.account_id,
                    scheduled_at.isoformat(),
                    *record.valid_time_range,
                    record.next_execution_time,
                )
                return None
            record = store.update_task(task_id, lambda r: r.run_started(now))
            store.run_executing(task_id, True)
        store.request_save()
        run_id = f"{self._run_prefix}-{next(self._run_numbers)}"
        message = messages.RunRequest(
            run_id=run_id,
            task_id=task_id,
            account_id=record.account_id,
            sys_type=record.sys_type,
            task_type=record.task_type,
            kwargs=record.kwargs,
            scheduled_at=scheduled_at,
            submitted_at=now,
        )
        self._messages[run_id] = message
        self._observe(
            message,
            messages.RunEvent(run_id, task_id, messages.RunEventKind.STARTED, now),
        )
        logger.info(
            "run %s of task %s (account %s, %s) started",
            run_id,
            task_id,
            record.account_id,
            record.task_type,
        )
        return RunRequest(
            run_id=run_id,
            task_id=task_id,
            account_id=record.account_id,
            sys_type=record.sys_type,
            task_type=record.task_type,
            scheduled_at=scheduled_at,
            started_at=now,
            manager=store.manager(task_id),
        )

    def _observe_end(self, request: RunRequest, outcome: RunOutcome | None) -> None:
        """Tell the observers how the run ended (no outcome: cancelled at stop, so lost)."""
        message = self._messages.pop(request.run_id)
        if outcome is None:
            kind, error = messages.RunEventKind.LOST, "cancelled: the dispatcher stopped"
        elif outcome.ok:
            kind, error = messages.RunEventKind.SUCCEEDED, None
        else:
            kind, error = messages.RunEventKind.FAILED, outcome.error
        event = messages.RunEvent(
            request.run_id,
            request.task_id,
            kind,
            self._store.now(),
            error=error,
            started_at=request.started_at,
        )
        self._observe(message, event)

    def _observe(self, request: messages.RunRequest, event: messages.RunEvent) -> None:
        for observer in self.observers:
            try:
                observer(request, event)
            except Exception:
                logger.exception(
                    "run %s of task %s: observer %r failed on %s; the run is unaffected",
                    event.run_id,
                    event.task_id,
                    observer,
                    event.kind.value,
                )

    def _finish(self, request: RunRequest, outcome: RunOutcome) -> None:
        store = self._store
        now = store.now()
        with store.lock:
            store.run_executing(request.task_id, False)
            if store.find(request.task_id) is None:
                logger.info(
                    "run %s of task %s finished after the task was removed",
                    request.run_id,
                    request.task_id,
                )
                return
            store.update_task(
                request.task_id, lambda r: r.run_finished(error=outcome.error, now=now)
            )
        seconds = (now - request.started_at).total_seconds()
        if outcome.ok:
            logger.info(
                "run %s of task %s (account %s) finished in %.3fs",
                request.run_id,
                request.task_id,
                request.account_id,
                seconds,
            )
        else:
            logger.error(
                "run %s of task %s (account %s) failed after %.3fs: %s",
                request.run_id,
                request.task_id,
                request.account_id,
                seconds,
                outcome.error,
            )

    def _interrupted(self, task_id: str) -> None:
        store = self._store
        with store.lock:
            store.run_executing(task_id, False)
            if store.find(task_id) is None or store.closed:
                return
            store.update_task(
                task_id,
                lambda r: (
                    r
                    if r.status is not TaskStatus.RUNNING
                    else r.replace(status=TaskStatus.PENDING, updated_at=store.now())
                ),
            )
        logger.warning(
            "run of task %s was cancelled before it finished; it stays runnable", task_id
        )
