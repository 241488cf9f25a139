"""Executing one run request: the manager is called, bounded by the request's timeout, and the
result becomes the run's finishing event.

Written once, for every place a run executes: the local backend (on the dispatcher's event
loop) and a fleet worker (on an event loop of its pool thread). What differs between them is
passed in: how the manager is called, who may stop the call from outside, and what to do with
a manager running in a thread that outlives its timeout (which cannot be stopped).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from tasks.clock import SYSTEM_CLOCK, Clock
from tasks.errors import InvalidTaskError
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.runs import (
    TIMED_OUT,
    RunEvent,
    RunEventKind,
    RunRequest,
    describe_error,
    timed_out_error,
)
from tasks.schedule import utc_now

__all__ = ["Overrun", "call_manager", "create_manager", "execute", "finished_event"]

Overrun = Callable[[RunRequest, TaskManager, "asyncio.Future[object]"], Awaitable[None]]
"""What to do with a manager running in a thread past its timeout: ``(request, manager,
call)``; ``call`` resolves once the thread returns."""


def create_manager(
    factory: TaskManagerFactory, sys_type: str, kwargs: Mapping[str, Any]
) -> TaskManager:
    """``factory(sys_type=sys_type, **kwargs)``, checked to have a ``run()``.

    Raises :class:`InvalidTaskError` naming ``task_manager_factory`` if it cannot.
    """
    try:
        manager = factory(sys_type=sys_type, **kwargs)
    except InvalidTaskError:
        raise
    except Exception as exc:
        raise InvalidTaskError(
            "task_manager_factory", f"raised {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(manager, "run", None)):
        raise InvalidTaskError(
            "task_manager_factory", f"returned {type(manager).__name__}, which has no run()"
        )
    return manager


async def call_manager(manager: TaskManager) -> object:
    """Call ``manager.run()``: on the loop if it is a coroutine function, else in a thread."""
    run = manager.run
    if inspect.iscoroutinefunction(run):
        result = await run()
    else:
        result = await asyncio.to_thread(run)
        if inspect.isawaitable(result):
            result = await result
    return result


def finished_event(
    request: RunRequest,
    error: str | None,
    *,
    started: datetime | None,
    worker: str | None = None,
    extra: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> RunEvent:
    """The finishing event of ``request``: succeeded if ``error`` is None, else failed."""
    return RunEvent(
        run_id=request.run_id,
        task_id=request.task_id,
        kind=RunEventKind.SUCCEEDED if error is None else RunEventKind.FAILED,
        at=at or utc_now(),
        worker=worker,
        error=error,
        started_at=started,
        extra=dict(extra or {}),
    )


async def execute(
    request: RunRequest,
    manager: TaskManager,
    *,
    call: Callable[[TaskManager], Awaitable[object]] = call_manager,
    worker: str | None = None,
    started: datetime | None = None,
    watch: Callable[[asyncio.Future[object]], None] | None = None,
    stopped: Callable[[], str] | None = None,
    overrun: Overrun | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> RunEvent:
    """Execute ``request`` with ``manager`` in the calling task and return its finishing event.

    ``call`` calls the manager (:func:`call_manager`: a coroutine on the loop, a plain
    function in a thread). The call is bounded by ``request.timeout``: past it a coroutine is
    cancelled (a shell command's process group is killed on cancellation), a thread is handed
    to ``overrun`` (nothing: left to finish), and the run failed, "timed out after N s".
    ``watch`` is given the call's future once it exists (so that another thread may cancel
    it); a call cancelled from outside failed with ``stopped()``'s text (None: the
    cancellation described). ``worker`` names the reporter; ``started``: when the run started
    (None: now); ``clock`` tells "now", when the run starts and ends.

    Cancelling the calling task cancels the manager and raises: the run was cut off, it did
    not fail.
    """
    started = started or clock.now()
    error: str | None = None
    extra: dict[str, object] = {}
    if request.timeout is None and watch is None:
        # Nothing to bound nor to stop: await the manager in this task (no task of its own).
        try:
            await call(manager)
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this run is being cut off, not failing
            error = describe_error(cancelled)
        except Exception as raised:
            error = describe_error(raised)
        return finished_event(request, error, started=started, worker=worker, at=clock.now())
    future = asyncio.ensure_future(call(manager))
    if watch is not None:
        watch(future)
    try:
        done, _ = await asyncio.wait({future}, timeout=request.timeout)
    except asyncio.CancelledError:
        future.cancel()
        raise
    if done:
        if future.cancelled():
            error = stopped() if stopped is not None else describe_error(asyncio.CancelledError())
        elif (exc := future.exception()) is not None:
            error = describe_error(exc)
    else:
        assert request.timeout is not None
        error, extra[TIMED_OUT] = timed_out_error(request.timeout), request.timeout
        if inspect.iscoroutinefunction(manager.run):
            future.cancel()
            await asyncio.gather(future, return_exceptions=True)
        elif overrun is not None:
            await overrun(request, manager, future)
    return finished_event(
        request, error, started=started, worker=worker, extra=extra, at=clock.now()
    )
