"""The per-run short cuts of the fleet equal the paths they skip.

- a worker calls a plain ``run()`` without a timeout before any event loop is involved: the
  outcome equals the one the loop path gives, for every way a run can end;
- the heartbeat thread is woken only for a run due before its own next wake-up, and every
  run is still renewed on time;
- a run's message names the run in Celery's ``argsrepr`` (what Celery logs and monitors
  show), not a repr of the request and its arguments.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from fleet_support import wait_until

from scheduler.fleet import BROKER_ENV_VAR, alive_key, claim_key, queue_name, worker
from scheduler.fleet.openruns import OpenRun
from scheduler.fleet.publish import RunPublisher, message_repr
from tasks.runs import RunEvent, RunRequest


def _request(run_id: str = "run-1", **changes: Any) -> RunRequest:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "run_id": run_id,
        "task_id": "task-1",
        "account_id": "account-1",
        "sys_type": "linux",
        "task_type": "noop",
        "kwargs": {"task_id": "task-1", "task_type": "noop", "token": "s3cret-token"},
        "scheduled_at": now,
        "submitted_at": now,
        **changes,
    }
    return RunRequest(**fields)


class _Manager:
    """A plain ``run()`` doing what it is given."""

    def __init__(self, run: Callable[[], object]) -> None:
        self._run = run

    def run(self) -> object:
        return self._run()


def _fails() -> object:
    raise ValueError("disk full")


def _cancelled() -> object:
    raise asyncio.CancelledError()


async def _succeeds_later() -> str:
    await asyncio.sleep(0)
    return "done"


async def _fails_later() -> str:
    await asyncio.sleep(0)
    raise RuntimeError("remote said no")


RUNS: dict[str, Callable[[], object]] = {
    "returns": lambda: None,
    "returns a value": lambda: {"rows": 3},
    "raises": _fails,
    "raises CancelledError": _cancelled,
    "returns an awaitable that succeeds": _succeeds_later,
    "returns an awaitable that fails": _fails_later,
}


def _shape(event: RunEvent) -> tuple[object, ...]:
    return (event.run_id, event.kind, event.error, event.worker, event.started_at, event.extra)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_plain_run_ends_as_on_the_loop(name: str) -> None:
    # The loop path is what every plain run() took before (and a run with a timeout takes).
    started = datetime.now(UTC)
    request = _request()
    quick = worker._Execution(request, "w1").run(_Manager(RUNS[name]), started)
    execution = worker._Execution(request, "w1")
    plain = execution._on_loop(_Manager(RUNS[name]), started, execution._call_here)
    assert _shape(quick) == _shape(plain)
    assert quick.at >= started


def test_a_plain_run_is_called_outside_any_event_loop() -> None:
    # As on the local backend (a plain run() in a thread): it may run a loop of its own.
    def run() -> object:
        return asyncio.run(_succeeds_later())

    event = worker._Execution(_request(), "w1").run(_Manager(run), datetime.now(UTC))
    assert (event.kind.value, event.error) == ("succeeded", None)


def test_a_plain_run_with_a_timeout_still_goes_through_the_loop() -> None:
    def run() -> object:
        time.sleep(0.5)
        return None

    request = _request(timeout=0.05)
    event = worker._Execution(request, "w1").run(_Manager(run), datetime.now(UTC))
    assert event.kind.value == "failed"
    assert "timed out after" in str(event.error)


# ---------------------------------------------------------------------- heartbeats


@pytest.fixture
def heartbeats(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    """The worker's process state on the test's database (module state put back after)."""
    monkeypatch.setenv(BROKER_ENV_VAR, broker_url)
    monkeypatch.setattr(worker.app.conf, "broker_url", None)
    state = worker._ProcessState()
    monkeypatch.setattr(worker, "_state", state)
    scripts = worker._Scripts()
    monkeypatch.setattr(worker, "_scripts", scripts)
    client = state.client()
    scripts.bind(client)
    return client


def _beat(client: redis.Redis, run_id: str, interval: float, stopped: list[str]) -> worker._Beat:
    value = json.dumps({"state": "running", "worker": "w1", "at": "now"})
    client.set(claim_key(run_id), value, ex=60)
    return worker._Beat(run_id, value, interval, 10_000, 30.0, stopped.append)


def test_heartbeats_wake_only_for_an_earlier_run(heartbeats: redis.Redis) -> None:
    client = heartbeats
    beats = worker._Heartbeats()
    stopped: list[str] = []
    try:
        _renewed_on_time(client, beats, stopped)
    finally:
        for run_id in ("slow", "later", "soon"):
            beats.remove(run_id)


def _renewed_on_time(client: redis.Redis, beats: worker._Heartbeats, stopped: list[str]) -> None:
    beats.add("slow", _beat(client, "slow", 2.0, stopped))
    # The thread waits for the slow run's renewal, two seconds away.
    wait_until(lambda: beats._until > 0 and not beats._wake.is_set(), 5, "the thread to wait")
    later = _beat(client, "later", 3.0, stopped)
    beats.add("later", later)
    assert not beats._wake.is_set(), "a run due after the thread's wake-up woke it"
    soon = _beat(client, "soon", 0.1, stopped)
    beats.add("soon", soon)
    # The run due first is renewed on time (well before the slow one's wake-up) ...
    wait_until(lambda: client.exists(alive_key("soon")), 1.5, "the early run's renewal")
    # ... and the one that did not wake the thread at its own time.
    wait_until(lambda: client.exists(alive_key("later")), 6, "the later run's renewal")
    assert client.exists(alive_key("slow"))
    assert stopped == []


# ---------------------------------------------------------------------- the message


def test_the_message_names_the_run_not_its_arguments(broker_url: str) -> None:
    publisher = RunPublisher(30.0)
    publisher.open(broker_url)
    request = _request("run-7")
    try:
        publisher.publish(OpenRun(request, None), queue_name(request.sys_type))
    finally:
        asyncio.run(publisher.close())
    raw = redis.Redis.from_url(broker_url).lrange(queue_name(request.sys_type), 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    headers = message["headers"]
    assert headers["id"] == "run-7"
    assert headers["argsrepr"] == message_repr(request) == "[run run-7 of task task-1 (noop)]"
    assert headers["kwargsrepr"] == "{}"
    assert "s3cret-token" not in json.dumps(headers)
