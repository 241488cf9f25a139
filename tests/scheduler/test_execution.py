"""Executing one run request into its finishing event (the local backend's and the worker's)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from scheduler.backends.execution import execute
from tasks.manager import TaskManager
from tasks.runs import TIMED_OUT, RunEventKind, RunRequest

pytestmark = pytest.mark.timeout(30)

STARTED = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _request(timeout: float | None = None) -> RunRequest:
    return RunRequest(
        run_id="r-1",
        task_id="t-1",
        account_id="a",
        sys_type="linux",
        task_type="probe",
        kwargs={},
        scheduled_at=STARTED,
        submitted_at=STARTED,
        timeout=timeout,
    )


class _Async:
    def __init__(self, fail: bool = False, forever: bool = False) -> None:
        self.fail, self.forever = fail, forever
        self.cancelled = False
        self.entered = asyncio.Event()

    async def run(self) -> None:
        self.entered.set()
        if self.forever:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if self.fail:
            raise RuntimeError("boom with password=hunter2")


class _Thread:
    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def run(self) -> None:
        self.release.wait(10)


@pytest.mark.parametrize("run_timeout", [None, 5.0])
async def test_success_and_failure_become_finishing_events(run_timeout: float | None) -> None:
    ok = await execute(_request(run_timeout), _Async(), worker="w1", started=STARTED)
    assert (ok.kind, ok.error, ok.worker, ok.started_at) == (
        RunEventKind.SUCCEEDED,
        None,
        "w1",
        STARTED,
    )
    assert (ok.run_id, ok.task_id) == ("r-1", "t-1")
    failed = await execute(_request(run_timeout), _Async(fail=True))
    assert failed.kind is RunEventKind.FAILED
    assert failed.error == "RuntimeError: boom with password=***"
    assert failed.worker is None


async def test_a_coroutine_past_its_timeout_is_cancelled_and_failed() -> None:
    manager = _Async(forever=True)
    event = await execute(_request(0.05), manager)
    assert manager.cancelled
    assert (event.kind, event.error) == (RunEventKind.FAILED, "timed out after 0.05 s")
    assert event.extra == {TIMED_OUT: 0.05}


async def test_a_thread_past_its_timeout_is_handed_to_overrun() -> None:
    release = threading.Event()
    overran: list[asyncio.Future[object]] = []

    async def overrun(request: RunRequest, manager: TaskManager, call: Any) -> None:
        overran.append(call)

    event = await execute(_request(0.05), _Thread(release), overrun=overrun)
    assert event.error == "timed out after 0.05 s"
    (call,) = overran
    assert not call.done()  # a thread cannot be stopped: it is left to finish
    release.set()
    await asyncio.wait_for(call, 10)


async def test_a_call_stopped_from_outside_fails_with_the_stop_reason() -> None:
    manager = _Async(forever=True)

    def watch(call: asyncio.Future[object]) -> None:
        asyncio.get_running_loop().call_soon(call.cancel)

    event = await execute(
        _request(), manager, watch=watch, stopped=lambda: "RunStoppedError: it lost its claim"
    )
    assert manager.cancelled
    assert (event.kind, event.error) == (RunEventKind.FAILED, "RunStoppedError: it lost its claim")


@pytest.mark.parametrize("run_timeout", [None, 5.0])
async def test_cancelling_the_caller_cuts_the_run_off(run_timeout: float | None) -> None:
    manager = _Async(forever=True)
    task = asyncio.ensure_future(execute(_request(run_timeout), manager))
    await asyncio.wait_for(manager.entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager.cancelled


def test_the_local_backend_prepares_a_manager_once_per_task_and_anew_when_renewed() -> None:
    from scheduler.backends.local import LocalRunBackend
    from tasks.errors import InvalidTaskError

    made: list[dict[str, Any]] = []

    def factory(**kwargs: Any) -> _Async:
        if kwargs.get("broken"):
            raise RuntimeError("cannot log in")
        made.append(kwargs)
        return _Async()

    backend = LocalRunBackend(factory)
    backend.prepare("t-1", "linux", {"n": 1})
    first = backend.manager("t-1", "linux", {"n": 1})
    backend.prepare("t-1", "linux", {"n": 1})  # prepared already: kept
    assert made == [{"sys_type": "linux", "n": 1}]
    backend.prepare("t-1", "linux", {"n": 2}, renew=True)
    assert made[-1] == {"sys_type": "linux", "n": 2}
    assert backend.manager("t-1", "linux", {"n": 2}) is not first
    with pytest.raises(InvalidTaskError, match="task_manager_factory"):
        backend.prepare("t-2", "linux", {"broken": True})
    made.clear()
    backend.manager("t-2", "linux", {"n": 3})  # nothing was kept for the refused task
    assert made == [{"sys_type": "linux", "n": 3}]
