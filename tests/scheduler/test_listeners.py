"""Listeners: every event, sync and async callbacks, a raising one, and the webhook."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from helpers import Recorder, at

from scheduler import (
    DispatcherEvent,
    RunFailed,
    RunRetried,
    RunTimedOut,
    SaveFailedError,
    TaskAdded,
    TaskCompleted,
    TaskDispatcher,
    TaskPaused,
    WebhookListener,
)
from scheduler.listeners import Listeners
from tasks.events import TaskEvent

MakeDispatcher = Callable[..., TaskDispatcher]


async def add(dispatcher: TaskDispatcher, **options: Any) -> str:
    options.setdefault("interval", 3600)
    options.setdefault("valid_time_range", [8, 22])
    return await dispatcher.add_task(
        sys_type="mac_intel", task_type="xhs_type", account_id="a", **options
    )


async def run_at(clock: Any, dispatcher: TaskDispatcher, *when: int) -> None:
    clock.move_to(at(*when))
    await asyncio.wait_for(dispatcher.run_pending(), 10)


class Collector:
    """A sync listener that keeps every event; ``wait_for(kind)`` waits (bounded) for one."""

    def __init__(self) -> None:
        self.events: list[DispatcherEvent] = []
        self._arrived = asyncio.Event()

    def __call__(self, event: DispatcherEvent) -> None:
        self.events.append(event)
        self._arrived.set()

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]

    async def wait_for(self, kind: str) -> DispatcherEvent:
        async def arrived() -> DispatcherEvent:
            while True:
                for event in self.events:
                    if event.kind == kind:
                        return event
                self._arrived.clear()
                await self._arrived.wait()

        return await asyncio.wait_for(arrived(), 5)


async def test_every_task_and_run_event_reaches_listeners_despite_raising_ones(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = make_dispatcher()
    seen = Collector()
    async_seen: list[str] = []

    def broken(event: DispatcherEvent) -> None:
        raise RuntimeError("listener bug")

    async def broken_async(event: DispatcherEvent) -> None:
        raise RuntimeError("async listener bug")

    async def async_listener(event: DispatcherEvent) -> None:
        async_seen.append(event.kind)

    dispatcher.add_listener(broken)
    dispatcher.add_listener(broken_async)
    dispatcher.add_listener(seen)
    dispatcher.add_listener(async_listener, events=["run_failed", TaskPaused])

    task_id = await add(dispatcher, run_policy={"retries": 1, "pause_after_failures": 1})
    dispatcher.pause_task(task_id)
    dispatcher.resume_task(task_id)
    recorder.fail.add(task_id)
    await dispatcher.start()
    with caplog.at_level(logging.ERROR, logger="scheduler.listeners"):
        await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
        await run_at(clock, dispatcher, 2026, 1, 8, 8, 1)
    dispatcher.remove_task(task_id)
    await dispatcher.stop()

    assert seen.kinds() == [
        "task_added",
        "task_paused",
        "task_resumed",
        "run_started",
        "run_failed",
        "run_retried",
        "run_started",
        "run_failed",
        "task_paused",
        "task_removed",
    ]
    first_failure, retried = seen.events[4], seen.events[5]
    assert isinstance(first_failure, RunFailed)
    assert (first_failure.attempt, first_failure.error) == (1, f"ValueError: boom in {task_id}")
    assert first_failure.retry_at == at(2026, 1, 8, 8, 1)
    assert isinstance(retried, RunRetried)
    assert (retried.attempt, retried.retry_at) == (2, at(2026, 1, 8, 8, 1))
    manual, automatic = seen.events[1], seen.events[8]
    assert isinstance(manual, TaskPaused)
    assert isinstance(automatic, TaskPaused)
    assert (manual.automatic, automatic.automatic) == (False, True)
    assert automatic.reason is not None
    assert automatic.reason.startswith("1 failed runs in a row")
    assert async_seen == ["task_paused", "run_failed", "run_failed", "task_paused"]
    bugs = [r for r in caplog.records if "failed on" in r.getMessage()]
    assert len(bugs) >= 2 * 6  # both broken listeners, for each event while the loop ran


async def test_timeout_and_completion_events(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    seen = Collector()
    dispatcher.add_listener(seen, events=[RunTimedOut, RunFailed, TaskCompleted])
    task_id = await add(
        dispatcher, task_end_time=at(2026, 1, 8, 8, 30), run_policy={"run_timeout": 0.1}
    )
    recorder.gates[task_id] = asyncio.Event()  # never set: the run hangs
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    completed = await seen.wait_for("task_completed")
    assert seen.kinds() == ["run_timed_out", "run_failed", "task_completed"]
    timed_out = seen.events[0]
    assert isinstance(timed_out, RunTimedOut)
    assert timed_out.timeout == 0.1
    assert completed.to_json() == {
        "event": "task_completed",
        "at": completed.at.isoformat(),
        "task_id": task_id,
        "account_id": "a",
    }
    await dispatcher.stop()


async def test_task_events_are_decided_where_the_change_is_made(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    """Each change announces what it did, once, stamped when it was made; a call that
    changes nothing says nothing."""
    dispatcher = make_dispatcher()
    seen = Collector()
    dispatcher.add_listener(seen)
    task_id = await add(dispatcher, task_end_time=at(2026, 1, 8, 9, 0))
    dispatcher.resume_task(task_id)  # not paused: nothing to say
    dispatcher.pause_task(task_id)
    dispatcher.pause_task(task_id)  # paused already
    clock.move_to(at(2026, 1, 8, 10, 0))
    dispatcher.resume_task(task_id)  # past its end: resumed, and completed
    dispatcher.pause_task(task_id)  # completed: stays so
    dispatcher.remove_task(task_id)
    assert seen.kinds() == [
        "task_added",
        "task_paused",
        "task_resumed",
        "task_completed",
        "task_removed",
    ]
    assert {event.task_id for event in seen.events} == {task_id}
    assert [event.at for event in seen.events] == [at(2026, 1, 8, 7, 0)] * 2 + [
        at(2026, 1, 8, 10, 0)
    ] * 3


async def test_save_failed_and_recovered_events(
    clock: Any, make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = make_dispatcher()
    seen = Collector()
    dispatcher.add_listener(seen, events=["save_failed", "save_recovered"])
    task_id = await add(dispatcher)
    await dispatcher.start()
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SaveFailedError):
        dispatcher.pause_task(task_id)
    failed = await seen.wait_for("save_failed")
    assert "No space left" in failed.to_json()["error"]
    monkeypatch.setattr(os, "write", real_write)
    dispatcher.resume_task(task_id)
    await seen.wait_for("save_recovered")
    assert seen.kinds() == ["save_failed", "save_recovered"]
    await dispatcher.stop()


def test_unknown_event_names_are_refused(make_dispatcher: MakeDispatcher) -> None:
    dispatcher = make_dispatcher()
    with pytest.raises(ValueError, match="unknown event 'run_exploded'"):
        dispatcher.add_listener(print, events=["run_exploded"])


# ---------------------------------------------------------------------- the webhook


class Hook(BaseHTTPRequestHandler):
    """Records POSTed JSON; answers 503 to the first ``failures`` requests."""

    received: list[dict[str, Any]]
    failures: list[int]
    arrived: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.failures[0] > 0:
            self.failures[0] -= 1
            self.send_response(503)
            self.end_headers()
            return
        assert self.headers["Content-Type"] == "application/json"
        self.received.append(json.loads(body))
        self.arrived.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP listener on a free loopback port with ``handler``; yields its hook URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def hook_server() -> Iterator[tuple[str, type[Hook]]]:
    handler = type(
        "TestHook", (Hook,), {"received": [], "failures": [1], "arrived": threading.Event()}
    )
    with serving(handler) as url:
        yield url, handler


async def test_the_webhook_posts_failures_and_pauses_with_a_retry(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    hook_server: tuple[str, type[Hook]],
) -> None:
    url, handler = hook_server
    dispatcher = make_dispatcher()
    dispatcher.add_listener(WebhookListener(url, backoff=0.01))
    task_id = await add(dispatcher, run_policy={"pause_after_failures": 1})
    recorder.fail.add(task_id)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    await dispatcher.stop()  # waits for the webhook's posts

    assert [event["event"] for event in handler.received] == ["run_failed", "task_paused"]
    failure = handler.received[0]
    assert failure["task_id"] == task_id
    assert failure["error"] == f"ValueError: boom in {task_id}"
    assert failure["attempt"] == 1
    assert failure["scheduled_at"] == at(2026, 1, 8, 8, 0).isoformat()
    assert handler.received[1]["automatic"] is True
    assert handler.failures == [0]  # the first POST got a 503 and was retried


def test_the_webhook_gives_up_after_its_retries(caplog: pytest.LogCaptureFixture) -> None:
    hook = WebhookListener("http://127.0.0.1:9/nothing", retries=1, backoff=0.01, timeout=1)
    with caplog.at_level(logging.WARNING, logger="scheduler.listeners"):
        assert not hook.post(b"{}", "run_failed")
    assert "run_failed not delivered" in caplog.text


class Gate(BaseHTTPRequestHandler):
    """Counts POSTs; answers each once ``open`` is set, 503 while ``failing`` is set."""

    posts: list[str]
    open: threading.Event
    failing: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.open.wait(10)
        self.posts.append(json.loads(body)["task_id"])
        self.send_response(503 if self.failing.is_set() else 204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gate_server() -> Iterator[tuple[str, type[Gate]]]:
    handler: type[Gate] = type(
        "TestGate",
        (Gate,),
        {"posts": [], "open": threading.Event(), "failing": threading.Event()},
    )
    with serving(handler) as url:
        try:
            yield url, handler
        finally:
            handler.open.set()  # no request hangs the listener's shutdown


def added(task_id: str) -> TaskAdded:
    return TaskAdded(at=at(2026, 1, 8, 8, 0), task_id=task_id, account_id="a")


async def test_the_webhook_holds_a_bounded_number_of_events(
    gate_server: tuple[str, type[Gate]], caplog: pytest.LogCaptureFixture
) -> None:
    # While the endpoint hangs, events wait their turn up to max_waiting; more are dropped
    # and counted, not queued without end.
    url, handler = gate_server
    hook = WebhookListener(url, events=None, max_waiting=3)
    with caplog.at_level(logging.WARNING, logger="scheduler.listeners"):
        sending = [asyncio.create_task(hook(added(f"t{i}"))) for i in range(5)]
        await asyncio.sleep(0)  # every call has begun: three wait, two are dropped
        assert hook.dropped == 2
        handler.open.set()
        await asyncio.wait_for(asyncio.gather(*sending), 10)
    assert handler.posts == ["t0", "t1", "t2"]
    assert "task_added dropped (1 so far)" in caplog.text


async def test_a_webhook_that_is_down_is_tried_once_an_event_until_it_answers(
    gate_server: tuple[str, type[Gate]],
) -> None:
    url, handler = gate_server
    handler.open.set()
    handler.failing.set()
    hook = WebhookListener(url, events=None, retries=2, backoff=0.01)
    await hook(added("first"))  # tried 1 + 2 times, then dropped: the endpoint is down
    await hook(added("second"))  # down: tried once
    handler.failing.clear()
    await hook(added("third"))  # once: it answers, so it is up again
    await hook(added("fourth"))
    assert handler.posts == ["first"] * 3 + ["second", "third", "fourth"]
    handler.failing.set()
    await hook(added("fifth"))  # up: retried again
    assert handler.posts[6:] == ["fifth"] * 3


def test_the_webhook_wants_an_http_url() -> None:
    with pytest.raises(ValueError, match="url"):
        WebhookListener("ftp://example.com")


async def test_observers_take_runs_from_the_event_stream_and_listeners_never_hear_them(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    """History, metrics and ``observe_runs`` subscribe to the one stream of events, where a
    run's event comes whole (its request, the backend's report); a listener, even one for a
    base class of every task event, hears only the typed events."""
    dispatcher = make_dispatcher()
    broad = Collector()
    dispatcher.add_listener(broad, events=[TaskEvent])
    reports: list[tuple[str, str]] = []
    dispatcher.observe_runs(lambda request, event: reports.append((request.run_id, event.kind)))
    task_id = await add(dispatcher)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    await dispatcher.stop()
    assert broad.kinds() == ["task_added", "run_started", "run_succeeded"]
    [run] = dispatcher.runs(task_id)
    assert reports == [(run.run_id, "started"), (run.run_id, "succeeded")]
    assert run.outcome == "succeeded"


async def test_events_queued_from_the_loop_arrive_as_from_another_thread() -> None:
    # From the loop's own thread an event is queued without waking the loop: it must still
    # arrive later (never inside the caller), in order, and exactly as one from a thread.
    now = datetime.now(UTC)
    heard: list[tuple[str, str]] = []
    listeners = Listeners()
    listeners.add(lambda event: heard.append((event.task_id or "", event.kind)))
    listeners.bind(asyncio.get_running_loop())

    def emit(prefix: str) -> None:
        for n in range(3):
            listeners.emit_soon(TaskPaused(at=now, task_id=f"{prefix}{n}", account_id="a"))

    emit("loop-")
    assert heard == []  # queued, not called here
    # The thread's events were queued before its end wakes this task: all are heard by then.
    await asyncio.to_thread(emit, "thread-")
    assert heard == [(f"{p}-{n}", "task_paused") for p in ("loop", "thread") for n in range(3)]
