"""The local run backend: task managers run in this process, on its event loop or threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from scheduler.backends.execution import call_manager, create_manager, execute
from tasks.clock import Clock, resolve_clock
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.registry import default_registry
from tasks.runs import RunBackend, RunEvent, RunInbox, RunRequest, describe_error

__all__ = ["LocalRunBackend", "call_manager", "create_manager", "finish_or_cancel"]

logger = logging.getLogger(__name__)


async def finish_or_cancel(tasks: Collection[asyncio.Task[Any]], grace_period: float | None) -> int:
    """Let ``tasks`` finish for up to ``grace_period`` seconds (None: no limit), then cancel
    the rest and wait for them; returns how many were cancelled."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(set(tasks), timeout=grace_period)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


class LocalRunBackend(RunBackend):
    """Runs each request's task manager in this process.

    Managers are created once per task with the factory (the task type registry by default)
    and re-created when the task's kwargs change.
    """

    name = "local"
    remote = False
    """Runs end with this process: a run cut off by a restart is not recovered."""

    def __init__(
        self, task_manager_factory: TaskManagerFactory | None = None, clock: Clock | None = None
    ) -> None:
        self.factory: TaskManagerFactory = task_manager_factory or default_registry
        self._clock = resolve_clock(clock)
        """Stamps when runs start and end (the dispatcher's clock)."""
        self._managers: dict[str, TaskManager] = {}
        self._inbox: RunInbox | None = None
        self._lingering: dict[str, asyncio.Future[object]] = {}
        self._inline = 0  # runs executing through run(), in their callers' tasks

    def manager(
        self, task_id: str, sys_type: str, kwargs: Mapping[str, Any], *, renew: bool = False
    ) -> TaskManager:
        """The manager of ``task_id``, created at its first use (or anew with ``renew``).

        Only the manager is kept (a task's kwargs are not held twice): whoever edits a task's
        kwargs or sys_type renews its manager (:meth:`TaskDispatcher.update_task` does).
        """
        manager = None if renew else self._managers.get(task_id)
        if manager is None:
            manager = create_manager(self.factory, sys_type, kwargs)
            self._managers[task_id] = manager
        return manager

    def forget(self, task_id: str) -> None:
        """Drop ``task_id``'s manager (the task was removed)."""
        self._managers.pop(task_id, None)

    async def open(self, inbox: RunInbox) -> None:
        """Deliver outcomes to ``inbox`` from now on."""
        self._inbox = inbox

    def prepare(
        self, task_id: str, sys_type: str, kwargs: Mapping[str, Any], *, renew: bool = False
    ) -> None:
        """Create ``task_id``'s manager now (anew with ``renew``): a task whose manager
        cannot be created is refused when added and kept unrestored when loaded."""
        if renew or task_id not in self._managers:  # called for every task at load
            self._managers[task_id] = create_manager(self.factory, sys_type, kwargs)

    async def submit(self, request: RunRequest) -> RunEvent:
        """Execute the run in the calling task (see :meth:`run`) with the task's manager and
        return its finishing event.

        Raises :class:`~tasks.errors.InvalidTaskError` if the manager cannot be created
        (nothing ran).
        """
        manager = self.manager(request.task_id, request.sys_type, request.kwargs)
        return await self.run(request, manager)

    async def run(self, request: RunRequest, manager: TaskManager) -> RunEvent:
        """Execute ``request`` in the calling task, deliver its outcome to the inbox and
        return it, once the run no longer executes here (see :meth:`finished`).

        Cancelling the caller cancels the manager and nothing is delivered.
        """
        self._inline += 1
        try:
            event = await self._outcome(request, manager)
        finally:
            self._inline -= 1
        assert self._inbox is not None
        await self._inbox.deliver(event)
        if self._lingering:
            # A timed-out manager in a thread cannot be stopped: the caller (holding the
            # account's lane) waits until the thread returns.
            await self.finished(request.run_id)
        return event

    async def _outcome(self, request: RunRequest, manager: TaskManager) -> RunEvent:
        """Call the manager (bounded by the request's timeout) and say how it went."""
        return await execute(request, manager, overrun=self._linger, clock=self._clock)

    async def _linger(
        self, request: RunRequest, manager: TaskManager, call: asyncio.Future[object]
    ) -> None:
        """A manager in a thread past its timeout cannot be stopped: it is left to finish,
        and :meth:`finished` waits for it."""
        logger.warning(
            "run %s of task %s (account %s) timed out after %gs, but its manager runs in a "
            "thread, which cannot be stopped: the account's runs wait until it returns",
            request.run_id,
            request.task_id,
            request.account_id,
            request.timeout,
        )
        self._lingering[request.run_id] = call

        def returned(future: asyncio.Future[object]) -> None:
            self._lingering.pop(request.run_id, None)
            raised = None if future.cancelled() else future.exception()
            if raised is not None:
                logger.debug(
                    "run %s raised after its timeout: %s", request.run_id, describe_error(raised)
                )
            logger.warning(
                "run %s of task %s: the timed-out thread returned; the account's lane is free",
                request.run_id,
                request.task_id,
            )

        call.add_done_callback(returned)

    async def finished(self, run_id: str) -> None:
        """Return once ``run_id`` no longer executes here (a timed-out thread has returned)."""
        call = self._lingering.get(run_id)
        if call is not None:
            await asyncio.gather(asyncio.shield(call), return_exceptions=True)

    async def cancel(self, run_id: str) -> bool:
        """A local run starts as soon as it is opened: there is nothing to withdraw."""
        return False

    async def recover(self, requests: Sequence[RunRequest]) -> None:
        """Nothing to recover: local runs end with the process that ran them."""

    async def close(self, grace_period: float | None) -> None:
        """Nothing to stop: runs execute in their callers' tasks, which the dispatcher lets
        finish for its grace period and then cancels."""

    def health(self) -> Mapping[str, Any]:
        """Runs executing in this process."""
        return {"backend": self.name, "running": self._inline}
