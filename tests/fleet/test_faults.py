"""The fleet under faults: restarts, lost messages, lost replies, pauses, a second dispatcher.

Real Redis (a server of the test's own where it is killed or proxied), real worker processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from fleet_probe import read_probe
from fleet_support import (
    ROOT,
    TESTS,
    Make,
    RedisServer,
    StartWorker,
    eventually,
    finished,
    probe_task,
)
from helpers import read_state

from scheduler.cli import main
from scheduler.control.waits import wait_context
from scheduler.errors import BrokerInUseError
from scheduler.fleet import LEASE_KEY
from tasks import TaskStatus

pytestmark = pytest.mark.timeout(90)


def spans(probe: Path) -> dict[str, tuple[float, float | None]]:
    """Task id -> (start, end) from the workers' own lines."""
    found: dict[str, tuple[float, float | None]] = {}
    for line in read_probe(probe):
        if line["phase"] == "start":
            found[line["task_id"]] = (line["at"], None)
        else:
            found[line["task_id"]] = (found[line["task_id"]][0], line["at"])
    return found


async def test_a_run_on_a_worker_holds_its_lane_across_a_dispatcher_restart(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    start_worker("w1", "linux", concurrency=2)
    probe = tmp_path / "probe.jsonl"
    first = make()
    await first.start()
    (long,) = await first.add_tasks([probe_task(probe, "a", seconds=5)])
    await eventually(lambda: first.get_task(long).status is TaskStatus.RUNNING, 20, "the run")
    await first.stop(grace_period=0)
    # The run goes on on its worker; the restarted dispatcher finds a task of the same
    # account due and earlier in its order.
    second = make()
    (urgent,) = await second.add_tasks([probe_task(probe, "a")])
    second.reorder_task(urgent, 0)
    async with second:
        await eventually(lambda: finished(second, long, urgent), 30, "both runs")
    found = spans(probe)
    end = found[long][1]
    assert end is not None
    assert found[urgent][0] >= end, "a due task started beside the recovered run"
    assert second.get_task(long).run_count == 1


async def test_a_second_dispatcher_on_the_same_database_is_refused(
    make: Make, tmp_path: Path, broker_url: str
) -> None:
    first = make(tmp_path / "first")
    await first.start()
    second = make(tmp_path / "second")
    with pytest.raises(BrokerInUseError) as refused:
        await second.start()
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message
    assert repr(str((tmp_path / "first").resolve())) in message
    assert socket.gethostname() in message
    assert not second.running
    await second.stop()
    # Freed when the first stops.
    await first.stop()
    third = make(tmp_path / "third")
    await third.start()
    assert third.running


async def test_the_lease_of_a_dispatcher_that_died_elsewhere_expires(
    make: Make, tmp_path: Path, broker_url: str
) -> None:
    client = redis.Redis.from_url(broker_url)
    holder = {"id": "x", "host": "elsewhere", "pid": 1, "directory": "/srv/ops", "since": "?"}
    client.set(LEASE_KEY, json.dumps(holder), px=1500)
    refused = make(tmp_path / "a")
    with pytest.raises(BrokerInUseError, match=r"'elsewhere'.*'/srv/ops'"):
        await refused.start()
    await refused.stop()
    await eventually(lambda: not client.exists(LEASE_KEY), 5, "the lease to expire")
    taker = make(tmp_path / "b")
    await taker.start()
    assert json.loads(client.get(LEASE_KEY) or b"{}")["directory"] == str(
        (tmp_path / "b").resolve()
    )


async def test_a_killed_dispatcher_on_this_host_does_not_keep_others_out(
    make: Make, broker_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    client = redis.Redis.from_url(broker_url)
    command = [sys.executable, "-m", "scheduler", "--dir", str(tmp_path / "gone"), "run"]
    process = await asyncio.create_subprocess_exec(
        *command,
        "--no-live",
        "--broker",
        broker_url,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await eventually(lambda: client.exists(LEASE_KEY), 30, "the first dispatcher's lease")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)
    assert json.loads(client.get(LEASE_KEY) or b"{}")["pid"] == process.pid
    # Its process is gone: another dispatcher of this host takes the lease at once.
    successor = make(tmp_path / "next")
    await successor.start()
    assert json.loads(client.get(LEASE_KEY) or b"{}")["pid"] == os.getpid()


async def test_a_broker_outage_logs_once_counts_unsent_runs_and_recovers_fast(
    aof_redis: RedisServer,
    start_worker: StartWorker,
    make: Make,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = aof_redis.url(0)
    start_worker("w1", "linux", broker=url)
    probe = tmp_path / "probe.jsonl"
    caplog.set_level(logging.INFO)
    dispatcher = make(broker_url=url, poll_interval=0.1)
    backend = dispatcher.run_backend
    async with dispatcher:
        (first,) = await dispatcher.add_tasks([probe_task(probe, "a")])
        await eventually(lambda: finished(dispatcher, first), 20, "a run before the outage")
        aof_redis.kill()
        during = await dispatcher.add_tasks(
            [probe_task(probe, f"x{i}", run_policy={"pause_after_failures": 1}) for i in range(4)]
        )
        await eventually(lambda: finished(dispatcher, *during), 10, "runs during the outage")
        for task_id in during:
            record = dispatcher.get_task(task_id)
            assert record.failure_count == 1
            assert record.last_error is not None
            assert "unreachable" in record.last_error
            # An outage is not the task's fault: no automatic pause.
            assert record.status is TaskStatus.ERROR
            assert record.consecutive_failures == 0
        # Why a task waits names the outage, with the broker's URL as health gives it.
        outage = wait_context(dispatcher)
        assert outage.broker_down_since is not None
        assert outage.broker == backend.health()["broker"]
        # The outage lasts a while (the scenario, not a wait for something): long enough for
        # a doubling backoff to have grown far past a few seconds.
        await asyncio.sleep(8)
        aof_redis.start()
        await eventually(lambda: backend.health()["connected"], 4, "the broker seen back")
        assert wait_context(dispatcher).broker_down_since is None
        (after,) = await dispatcher.add_tasks([probe_task(probe, "b")])
        await eventually(lambda: finished(dispatcher, after), 20, "a run after the outage")
        assert dispatcher.get_task(after).failure_count == 0
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("scheduler")
    ]
    assert len(errors) == 1, errors
    assert "unreachable" in errors[0]
    counts = [r.getMessage() for r in caplog.records if "not sent during the outage" in r.message]
    assert len(counts) == 1, counts
    assert counts[0].startswith("4 run(s) not sent")


def on_disk(directory: Path, task_id: str) -> dict[str, Any]:
    data = read_state(directory)
    record: dict[str, Any] = next(t for t in data["tasks"] if t["task_id"] == task_id)
    return record


async def test_a_run_whose_message_never_reached_a_worker_is_sent_again(
    start_worker: StartWorker,
    make: Make,
    tmp_path: Path,
    broker_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The state says "sent" but the queue holds no message: what a dispatcher killed between
    # saving a run as sent and publishing it leaves, or a broker that lost its last writes,
    # or a worker killed holding the message it had popped.
    probe = tmp_path / "probe.jsonl"
    first = make()
    await first.start()
    (task_id,) = await first.add_tasks([probe_task(probe, "a")])
    await eventually(
        lambda: on_disk(tmp_path / "ops", task_id).get("active_run"), 10, "the run sent"
    )
    await first.stop(grace_period=0)  # the run stays out
    client = redis.Redis.from_url(broker_url)
    assert client.delete("td.sys.linux") == 1
    start_worker("w1", "linux")
    caplog.set_level(logging.WARNING)
    second = make(resend_after=1.0)
    async with second:
        await eventually(lambda: finished(second, task_id), 20, "the run sent again")
        record = second.get_task(task_id)
    assert (record.run_count, record.failure_count, record.last_worker) == (1, 0, "w1")
    assert [line["phase"] for line in read_probe(probe)] == ["start", "end"]
    assert any("sent again" in r.getMessage() for r in caplog.records)


async def test_a_queued_run_survives_a_broker_restart_that_lost_its_message(
    own_redis: RedisServer, start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    url = own_redis.url(0)
    probe = tmp_path / "probe.jsonl"
    dispatcher = make(broker_url=url, poll_interval=0.1, resend_after=1.0)
    async with dispatcher:
        (task_id,) = await dispatcher.add_tasks([probe_task(probe, "a")])
        client = redis.Redis.from_url(url)
        await eventually(lambda: client.llen("td.sys.linux") == 1, 10, "the run's message")
        client.close()
        own_redis.kill()
        own_redis.start()  # without persistence: the queued message is gone
        start_worker("w1", "linux", broker=url)
        await eventually(lambda: finished(dispatcher, task_id), 30, "the run after the restart")
        record = dispatcher.get_task(task_id)
    assert (record.run_count, record.failure_count, record.last_worker) == (1, 0, "w1"), (
        record.last_error
    )
    assert [line["phase"] for line in read_probe(probe)] == ["start", "end"]


async def test_pause_or_remove_withdraws_a_run_sent_but_not_started(
    start_worker: StartWorker, make: Make, tmp_path: Path, broker_url: str
) -> None:
    probe = tmp_path / "probe.jsonl"
    client = redis.Redis.from_url(broker_url)
    dispatcher = make()
    async with dispatcher:
        paused, removed, kept = await dispatcher.add_tasks(
            [probe_task(probe, account) for account in ("a", "b", "c")]
        )
        await eventually(lambda: client.llen("td.sys.linux") == 3, 10, "three runs queued")
        active = dispatcher.get_task(paused).active_run
        assert active is not None
        dispatcher.pause_task(paused)
        dispatcher.remove_task(removed)
        await eventually(
            lambda: dispatcher.get_task(paused).active_run is None, 10, "the run withdrawn"
        )
        record = dispatcher.get_task(paused)
        assert (record.status, record.run_count, record.failure_count) == (
            TaskStatus.PAUSED,
            0,
            0,
        )
        assert record.last_error is None
        await eventually(lambda: dispatcher.run_backend.health()["open_runs"] == 1, 10, "closed")
        # The worker that comes later runs only the task still active.
        start_worker("w1", "linux")
        await eventually(lambda: finished(dispatcher, kept), 20, "the kept task's run")
        await eventually(lambda: client.llen("td.sys.linux") == 0, 10, "the queue drained")
        entries = dispatcher.runs(paused)
        assert [entry.outcome for entry in entries] == ["cancelled"]
        # A run a worker already holds finishes as before.
        (busy,) = await dispatcher.add_tasks([probe_task(probe, "d", seconds=1.5)])
        await eventually(lambda: dispatcher.get_task(busy).status is TaskStatus.RUNNING, 20, "run")
        dispatcher.pause_task(busy)
        await eventually(lambda: finished(dispatcher, busy), 20, "the held run's end")
        assert dispatcher.get_task(busy).status is TaskStatus.PAUSED
    started = [line["task_id"] for line in read_probe(probe) if line["phase"] == "start"]
    assert sorted(started) == sorted([kept, busy])
    claim = json.loads(client.get(f"td:claim:{active.run_id}") or b"{}")
    assert claim["state"] == "cancelled"


async def test_pausing_an_account_withdraws_its_runs_sent_but_not_started(
    start_worker: StartWorker, make: Make, tmp_path: Path, broker_url: str
) -> None:
    probe = tmp_path / "probe.jsonl"
    client = redis.Redis.from_url(broker_url)
    dispatcher = make()
    async with dispatcher:
        first, second, kept = await dispatcher.add_tasks(
            [probe_task(probe, account) for account in ("banned", "banned-too", "c")]
        )
        # Three accounts with a run queued each; one account is paused as a whole.
        await eventually(lambda: client.llen("td.sys.linux") == 3, 10, "three runs queued")
        active = dispatcher.get_task(first).active_run
        assert active is not None
        report = dispatcher.pause_account("banned")
        assert [(change.task_id, change.changed) for change in report] == [(first, True)]
        await eventually(
            lambda: dispatcher.get_task(first).active_run is None, 10, "the run withdrawn"
        )
        record = dispatcher.get_task(first)
        assert (record.status, record.run_count, record.failure_count) == (
            TaskStatus.PAUSED,
            0,
            0,
        )
        start_worker("w1", "linux")
        await eventually(lambda: finished(dispatcher, second, kept), 20, "the other runs")
        assert [entry.outcome for entry in dispatcher.runs(first)] == ["cancelled"]
    started = [line["task_id"] for line in read_probe(probe) if line["phase"] == "start"]
    assert sorted(started) == sorted([second, kept])
    claim = json.loads(client.get(f"td:claim:{active.run_id}") or b"{}")
    assert claim["state"] == "cancelled"


async def test_why_a_queued_run_waits_is_logged_and_shown(
    make: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probe = tmp_path / "probe.jsonl"
    caplog.set_level(logging.INFO)
    dispatcher = make()
    await dispatcher.start()
    await dispatcher.serve_control()
    (waiting,) = await dispatcher.add_tasks([probe_task(probe, "a", sys_type="windows")])
    await eventually(
        lambda: any("no worker for it is registered" in r.message for r in caplog.records),
        15,
        "the warning that no windows worker is registered",
    )
    health = dispatcher.run_backend.health()["waiting_for_workers"]
    assert health == {"windows": {"runs": 1, "workers": []}}
    shown = await asyncio.to_thread(
        CliRunner().invoke, main, ["--dir", str(tmp_path / "ops"), "show", waiting]
    )
    assert "waiting for a windows worker: none is registered" in shown.output, shown.output
    assert "[no_worker]" in shown.output, shown.output
    await dispatcher.stop(grace_period=0)
