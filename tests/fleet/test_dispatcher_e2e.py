"""The fleet end to end: a real TaskDispatcher, real worker processes, a real Redis."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
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
    wait_until,
)
from helpers import read_state

from scheduler.cli import main
from scheduler.fleet.wire import EVENTS_STREAM
from tasks import TaskRecord, TaskStatus
from tasks.runs import RunEvent, RunEventKind

pytestmark = pytest.mark.timeout(90)


def on_disk(directory: Path, task_id: str) -> dict[str, Any]:
    data = read_state(directory)
    record: dict[str, Any] = next(t for t in data["tasks"] if t["task_id"] == task_id)
    return record


async def test_routing_and_outcomes_in_the_file(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    start_worker("linux-1", "linux")
    start_worker("mac-1", "mac_intel")
    probe = tmp_path / "probe.jsonl"
    dispatcher = make()
    async with dispatcher:
        ok, bad, mac = await dispatcher.add_tasks(
            [
                probe_task(probe, "a"),
                probe_task(probe, "b", fail=True),
                probe_task(probe, "c", sys_type="mac_intel"),
            ]
        )
        await eventually(lambda: finished(dispatcher, ok, bad, mac), 30, "three outcomes")
        good: TaskRecord = dispatcher.get_task(ok)
        failed: TaskRecord = dispatcher.get_task(bad)
        other: TaskRecord = dispatcher.get_task(mac)
    assert (good.status, good.run_count, good.failure_count) == (TaskStatus.PENDING, 1, 0)
    assert good.last_worker == "linux-1"
    assert good.last_error is None
    assert (failed.status, failed.run_count, failed.failure_count) == (TaskStatus.ERROR, 1, 1)
    assert failed.consecutive_failures == 1
    assert failed.last_error == f"RuntimeError: probe {bad} failed on purpose"
    assert other.last_worker == "mac-1"
    # last_execution_time is the start the worker reported.
    starts = {line["task_id"]: line["at"] for line in read_probe(probe) if line["phase"] == "start"}
    assert good.last_execution_time is not None
    assert abs(good.last_execution_time.timestamp() - starts[ok]) < 0.5
    for line in read_probe(probe):
        assert line["worker"] == ("mac-1" if line["sys_type"] == "mac_intel" else "linux-1")
    saved = on_disk(tmp_path / "ops", bad)
    assert saved["last_worker"] == "linux-1"
    assert saved["failure_count"] == 1
    assert saved.get("active_run") is None


async def test_one_run_at_a_time_per_account_across_workers(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    start_worker("w1", "linux", concurrency=2)
    start_worker("w2", "linux", concurrency=2)
    probe = tmp_path / "probe.jsonl"
    dispatcher = make()
    async with dispatcher:
        ids = await dispatcher.add_tasks(
            [probe_task(probe, account, seconds=0.6) for account in ("a", "a", "a", "b", "b")]
        )
        await eventually(lambda: finished(dispatcher, *ids), 40, "five runs")
    spans: dict[str, list[tuple[float, float]]] = {}
    opened: dict[str, float] = {}
    for line in read_probe(probe):
        if line["phase"] == "start":
            opened[line["task_id"]] = line["at"]
        else:
            spans.setdefault(line["account_id"], []).append((opened[line["task_id"]], line["at"]))
    for account in ("a", "b"):
        runs = sorted(spans[account])
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(runs))
    # Accounts run concurrently: some run of b overlaps some run of a.
    assert any(s1 < e2 and s2 < e1 for s1, e1 in spans["a"] for s2, e2 in spans["b"])
    workers = {line["worker"] for line in read_probe(probe)}
    assert workers == {"w1", "w2"}


async def test_worker_killed_mid_run_counts_as_a_lost_failed_run(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    doomed = start_worker("doomed", "linux")
    probe = tmp_path / "probe.jsonl"
    dispatcher = make(lost_after=2.0)
    async with dispatcher:
        victim, after = await dispatcher.add_tasks(
            [probe_task(probe, "a", seconds=60), probe_task(probe, "a")]
        )
        await eventually(
            lambda: dispatcher.get_task(victim).status is TaskStatus.RUNNING, 20, "the run"
        )
        doomed.kill()
        await eventually(lambda: finished(dispatcher, victim), 10, "the run to be lost")
        record = dispatcher.get_task(victim)
        assert (record.status, record.run_count, record.failure_count) == (TaskStatus.ERROR, 1, 1)
        assert record.last_error is not None
        assert "'doomed'" in record.last_error
        assert "lost" in record.last_error
        # The lane is free: the account's next task runs on a live worker.
        start_worker("heir", "linux")
        await eventually(lambda: finished(dispatcher, after), 20, "the next task of the account")
        assert dispatcher.get_task(after).last_worker == "heir"
    starts = [line["task_id"] for line in read_probe(probe) if line["phase"] == "start"]
    assert starts == [victim, after]


async def test_run_longer_than_visibility_timeout_executes_once(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    # Redis redelivers an unacknowledged message after the visibility timeout (here 1s): a 4s
    # run is delivered again while it runs, to the other worker, which must not execute it.
    first = start_worker("w1", "linux", visibility_timeout=1)
    second = start_worker("w2", "linux", visibility_timeout=1)
    probe = tmp_path / "probe.jsonl"
    dispatcher = make(lost_after=10.0)
    async with dispatcher:
        (long,) = await dispatcher.add_tasks([probe_task(probe, "a", seconds=4)])
        await eventually(lambda: finished(dispatcher, long), 30, "the long run")
        record = dispatcher.get_task(long)
    assert (record.run_count, record.failure_count) == (1, 0)
    assert [line["phase"] for line in read_probe(probe)] == ["start", "end"]
    wait_until(
        lambda: "not executed here: already claimed" in first.log() + second.log(),
        10,
        "the redelivered message to be refused by its claim",
    )


async def test_no_worker_with_start_timeout(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    probe = tmp_path / "probe.jsonl"
    dispatcher = make(start_timeout=1.0)
    async with dispatcher:
        stale, other = await dispatcher.add_tasks(
            [probe_task(probe, "a", sys_type="windows"), probe_task(probe, "a")]
        )
        start_worker("linux-1", "linux")
        await eventually(lambda: finished(dispatcher, stale), 10, "the run to expire")
        record = dispatcher.get_task(stale)
        assert record.last_error is not None
        assert "sys_type 'windows'" in record.last_error
        assert (record.run_count, record.failure_count) == (1, 1)
        assert record.status is TaskStatus.ERROR
        assert record.next_execution_time is not None  # still scheduled
        await eventually(lambda: finished(dispatcher, other), 20, "the lane to be freed")
        # A worker that comes later never runs the stale run.
        start_worker("win-1", "windows")
    assert [line["task_id"] for line in read_probe(probe) if line["phase"] == "start"] == [other]


async def test_a_fleet_run_past_its_timeout_is_recorded_as_timed_out(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    start_worker("linux-1", "linux")
    probe = tmp_path / "probe.jsonl"
    dispatcher = make()
    async with dispatcher:
        (slow,) = await dispatcher.add_tasks(
            [probe_task(probe, "a", seconds=30.0, run_policy={"run_timeout": 1})]
        )
        await eventually(lambda: finished(dispatcher, slow), 15, "the timed-out run")
        record = dispatcher.get_task(slow)
    assert (record.status, record.failure_count) == (TaskStatus.ERROR, 1)
    assert record.last_error == "timed out after 1 s"
    assert record.last_worker == "linux-1"
    assert [line["phase"] for line in read_probe(probe)] == ["start"]  # never ran to its end


async def test_no_worker_without_start_timeout_waits_queued(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    probe = tmp_path / "probe.jsonl"
    dispatcher = make(lost_after=1.0)
    async with dispatcher:
        (waiting,) = await dispatcher.add_tasks([probe_task(probe, "a", sys_type="windows")])
        saved = await eventually(
            lambda: on_disk(tmp_path / "ops", waiting).get("active_run"), 10, "the run sent"
        )
        assert saved["started_at"] is None  # queued, on disk
        record = dispatcher.get_task(waiting)
        assert record.active_run is not None
        assert record.active_run.queued
        assert record.run_count == 0
        # `list` and `show` (read-only, beside the running dispatcher) say it is queued.
        runner = CliRunner()
        listed = runner.invoke(
            main, ["--dir", str(tmp_path / "ops"), "list"], env={"COLUMNS": "300"}
        )
        assert "pending (queued)" in listed.output, listed.output
        shown = runner.invoke(main, ["--dir", str(tmp_path / "ops"), "show", waiting])
        assert "waiting for a windows worker" in shown.output, shown.output
        start_worker("win-1", "windows")
        await eventually(lambda: finished(dispatcher, waiting), 20, "the run once a worker came")
        assert dispatcher.get_task(waiting).last_worker == "win-1"


async def test_duplicated_outcome_message_is_applied_once(
    start_worker: StartWorker, make: Make, tmp_path: Path, broker_url: str
) -> None:
    start_worker("w1", "linux")
    probe = tmp_path / "probe.jsonl"
    client = redis.Redis.from_url(broker_url)
    dispatcher = make()
    async with dispatcher:
        (task_id,) = await dispatcher.add_tasks([probe_task(probe, "a", seconds=1.0)])
        active = await eventually(lambda: dispatcher.get_task(task_id).active_run, 10, "a run")
        await eventually(lambda: finished(dispatcher, task_id), 20, "the run")
        await eventually(lambda: client.xlen(EVENTS_STREAM) == 0, 10, "events acknowledged")
        record = dispatcher.get_task(task_id)
        # The same outcome again (a redelivered message), and a conflicting one.
        for kind, error in (("succeeded", None), ("failed", "RuntimeError: late copy")):
            event = RunEvent(
                active.run_id,
                task_id,
                RunEventKind(kind),
                at=record.updated_at,
                worker="w1",
                error=error,
            )
            client.xadd(EVENTS_STREAM, {"event": json.dumps(event.to_json())})
        await eventually(lambda: client.xlen(EVENTS_STREAM) == 0, 10, "the copies consumed")
        again = dispatcher.get_task(task_id)
    assert (again.run_count, again.failure_count, again.last_error) == (1, 0, None)


async def test_broker_killed_and_restarted(
    own_redis: RedisServer,
    start_worker: StartWorker,
    make: Make,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = own_redis.url(0)
    start_worker("w1", "linux", broker=url)
    probe = tmp_path / "probe.jsonl"
    caplog.set_level(logging.INFO)
    dispatcher = make(broker_url=url, poll_interval=0.1)
    async with dispatcher:
        (first,) = await dispatcher.add_tasks([probe_task(probe, "a")])
        await eventually(lambda: finished(dispatcher, first), 20, "a run before the outage")
        own_redis.kill()
        # Runs due during the outage fail with a clear error; scheduling goes on.
        during = await dispatcher.add_tasks([probe_task(probe, f"x{i}") for i in range(3)])
        await eventually(lambda: finished(dispatcher, *during), 10, "runs during the outage")
        for task_id in during:
            record = dispatcher.get_task(task_id)
            assert record.last_error is not None
            assert "could not be sent" in record.last_error
            assert "unreachable" in record.last_error
            assert record.failure_count == 1
        own_redis.start()
        (after,) = await dispatcher.add_tasks([probe_task(probe, "b")])
        # The run after the restart: sent once the broker answers (or failed if too early).
        await eventually(lambda: finished(dispatcher, after), 30, "a run after the outage")
    outage = [
        r.getMessage()
        for r in caplog.records
        if r.name == "scheduler.backends.celery"
        and r.levelno >= logging.ERROR
        and "unreachable" in r.getMessage()
    ]
    assert len(outage) == 1, outage


def test_dispatcher_killed_while_runs_execute_then_restarted(
    start_worker: StartWorker, broker_url: str, tmp_path: Path
) -> None:
    """The dispatcher process is SIGKILLed; workers finish; a new one applies each outcome once."""
    start_worker("w1", "local", concurrency=3, factory="")
    directory = tmp_path / "ops"
    log = tmp_path / "shell.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    base = [sys.executable, "-m", "scheduler", "--dir", str(directory)]
    ids = []
    for account in ("a", "b", "c"):
        command = f"echo start >> {log}; sleep 3; echo end >> {log}"
        added = subprocess.run(
            [
                *(*base, "add", "--type", "shell", "--account", account, "--interval", "1h"),
                *("--kw", f"command={command}", "--kw", "shell=true"),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        ids.append(added.stdout.strip())

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*base, "run", "--no-live", "--broker", broker_url, "--lost-after", "10"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    first = serve()
    try:
        wait_until(lambda: log.exists() and log.read_text().count("start") == 3, 30, "runs")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    wait_until(lambda: log.read_text().count("end") == 3, 30, "the workers to finish")
    second = serve()
    try:
        wait_until(
            lambda: all(on_disk(directory, t)["run_count"] == 1 for t in ids), 30, "outcomes"
        )
        for task_id in ids:
            record = on_disk(directory, task_id)
            assert record["last_worker"] == "w1"
            assert record.get("active_run") is None
            assert record["failure_count"] == 0
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(30)
    assert log.read_text().count("start") == 3  # nothing was sent again
    for task_id in ids:
        assert on_disk(directory, task_id)["run_count"] == 1


async def test_a_remote_outcome_is_in_the_file_itself_once_applied(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    # The seed's host reads dispatch_config.json with json.load: once the dispatcher has
    # applied an outcome (and before the backend acknowledges it), the file itself holds it.
    start_worker("linux-1", "linux")
    probe = tmp_path / "probe.jsonl"
    dispatcher = make()
    state_file = tmp_path / "ops" / "dispatch_config.json"
    seen: dict[str, dict[str, Any]] = {}
    deliver = dispatcher._ledger.deliver_batch  # the backend hands it each read

    async def deliver_then_read(events: Sequence[RunEvent]) -> None:
        await deliver(events)
        with state_file.open(encoding="utf-8") as file:
            tasks = json.load(file)["tasks"]
        for event in events:
            if event.kind.finished:
                seen[event.task_id] = next(t for t in tasks if t["task_id"] == event.task_id)

    dispatcher._ledger.deliver_batch = deliver_then_read  # type: ignore[method-assign]
    async with dispatcher:
        ok, bad = await dispatcher.add_tasks(
            [probe_task(probe, "a"), probe_task(probe, "b", fail=True)]
        )
        await eventually(lambda: {ok, bad} <= seen.keys(), 30, "two outcomes applied")
    assert (seen[ok]["status"], seen[ok]["run_count"], seen[ok]["last_worker"]) == (
        "pending",
        1,
        "linux-1",
    )
    assert seen[ok].get("active_run") is None
    assert (seen[bad]["status"], seen[bad]["failure_count"]) == ("error", 1)
    assert seen[bad]["last_error"] == f"RuntimeError: probe {bad} failed on purpose"
