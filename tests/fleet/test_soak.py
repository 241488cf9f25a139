"""A soak of the fleet under faults: two sys_types with two workers each, several accounts of
several tasks, runs of a second or so, while a worker is killed mid-run, the dispatcher is
killed and restarted, Redis restarts (append-only file) and a worker is frozen past
``lost_after``. Then the workers' own lines are held against the dispatcher's state and
history.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fleet_probe import read_probe
from fleet_support import ROOT, TESTS, RedisServer, StartWorker, Worker, eventually

from scheduler import CeleryRunBackend, TaskDispatcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

LOST_AFTER = 4.0
ACCOUNTS = 6
TASKS_PER_ACCOUNT = 3
RUNS_BETWEEN = 30
"""Runs started between two faults."""
LONG = "acct-z"
"""The account whose long run is on the worker that is frozen."""


@dataclass
class Faults:
    """When each fault happened (wall-clock seconds, as the probe lines are)."""

    killed: dict[str, float] = field(default_factory=dict)
    """Worker name -> when it was SIGKILLed."""
    frozen: tuple[str, float, float] | None = None
    """(worker, SIGSTOP at, SIGCONT at)."""
    last: float = 0.0


class DispatcherProcess:
    """``task-dispatcher run`` in a process of its own, to kill and restart."""

    def __init__(self, directory: Path, broker: str, log: Path) -> None:
        self.command = [
            *(sys.executable, "-m", "scheduler", "--dir", str(directory), "run", "--no-live"),
            *("--broker", broker, "--lost-after", str(LOST_AFTER)),
            *("--max-concurrent-runs", "100"),
        ]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture
def dispatcher_process(tmp_path: Path) -> Iterator[list[DispatcherProcess]]:
    made: list[DispatcherProcess] = []
    yield made
    for process in made:
        process.signal(signal.SIGKILL)
        if process.process is not None:
            process.process.wait(10)


def tasks(probe: Path) -> list[dict[str, Any]]:
    specs = []
    for number in range(ACCOUNTS):
        account = f"acct-{number}"
        for index in range(TASKS_PER_ACCOUNT):
            specs.append(
                {
                    "sys_type": ("mac", "win")[(number + index) % 2],
                    "task_type": "probe",
                    "interval": 4,
                    "account_id": account,
                    "probe_log": str(probe),
                    "seconds": 0.3 + 0.3 * index,
                    "asynchronous": True,
                }
            )
    # One account with a short task first in its order and a long one on win: the
    # dispatcher is killed while the long one runs (the short one must wait for it), and the
    # worker running it is the one frozen.
    for sys_type, seconds in (("mac", 0.3), ("win", 20.0)):
        specs.append(
            {
                "sys_type": sys_type,
                "task_type": "probe",
                "interval": 4,
                "account_id": LONG,
                "probe_log": str(probe),
                "seconds": seconds,
                "asynchronous": True,
            }
        )
    return specs


def open_runs(probe: Path) -> dict[str, dict[str, Any]]:
    """Run id -> its start line, for runs whose end was not written yet."""
    started: dict[str, dict[str, Any]] = {}
    for line in read_probe(probe):
        if line["phase"] == "start":
            started[line["run_id"]] = line
        else:
            started.pop(line["run_id"], None)
    return started


async def test_soak_under_faults(
    aof_redis: RedisServer,
    start_worker: StartWorker,
    dispatcher_process: list[DispatcherProcess],
    tmp_path: Path,
) -> None:
    url = aof_redis.url(0)
    probe = tmp_path / "probe.jsonl"
    directory = tmp_path / "ops"

    # The tasks, added before the dispatcher process owns the directory.
    setup = TaskDispatcher(directory, run_backend=CeleryRunBackend(url), timezone="UTC")
    ids = await setup.add_tasks(tasks(probe))
    setup.close()

    workers: dict[str, Worker] = {}
    for name, sys_type in (("mac-1", "mac"), ("mac-2", "mac"), ("win-1", "win"), ("win-2", "win")):
        workers[name] = start_worker(name, sys_type, broker=url, concurrency=2)
    dispatcher = DispatcherProcess(directory, url, tmp_path / "dispatcher.log")
    dispatcher_process.append(dispatcher)
    dispatcher.start()
    faults = Faults()

    def runs_started() -> int:
        return sum(line["phase"] == "start" for line in read_probe(probe))

    await eventually(lambda: runs_started() >= 20, 60, "the fleet to get going")

    # 1. A worker killed mid-run (and replaced).
    def busy(worker: str) -> bool:
        return any(line["worker"] == worker for line in open_runs(probe).values())

    await eventually(lambda: busy("mac-1"), 30, "mac-1 to be running something")
    workers["mac-1"].kill()
    faults.killed["mac-1"] = time.time()
    workers["mac-3"] = start_worker("mac-3", "mac", broker=url, concurrency=2)
    mark = runs_started()
    await eventually(
        lambda: runs_started() >= mark + RUNS_BETWEEN, 60, "runs after the worker died"
    )

    # 2. The dispatcher killed while the long run executes (it must hold its account's lane
    # when the dispatcher is back), and restarted.
    def long_run() -> dict[str, Any] | None:
        for line in open_runs(probe).values():
            if line["account_id"] == LONG and line["sys_type"] == "win":
                return line
        return None

    def long_run_worker() -> str | None:
        line = long_run()
        return None if line is None else str(line["worker"])

    def long_run_past(seconds: float) -> bool:
        line = long_run()
        return line is not None and time.time() - line["at"] > seconds

    await eventually(lambda: long_run_past(2.5), 60, "the long run under way")
    dispatcher.signal(signal.SIGKILL)
    assert dispatcher.process is not None
    dispatcher.process.wait(10)
    dispatcher.start()
    mark = runs_started()
    await eventually(lambda: runs_started() >= mark + RUNS_BETWEEN, 60, "runs after the restart")

    # 3. Redis restarted (its append-only file keeps what it acknowledged).
    aof_redis.stop()
    aof_redis.start()
    mark = runs_started()
    await eventually(
        lambda: runs_started() >= mark + RUNS_BETWEEN, 60, "runs after Redis came back"
    )

    # 4. The worker running the long run frozen past lost_after, then thawed.
    frozen = await eventually(long_run_worker, 60, "the long run to start")
    os.killpg(workers[frozen].process.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        # The freeze is the fault itself: it must outlast lost_after.
        await asyncio.sleep(LOST_AFTER + 3)
    finally:
        os.killpg(workers[frozen].process.pid, signal.SIGCONT)
    faults.frozen = (frozen, stopped_at, time.time())
    faults.last = time.time()

    # Every account runs again after the last fault.
    accounts = {f"acct-{n}" for n in range(ACCOUNTS)} | {LONG}

    def all_running_again() -> bool:
        again = {
            line["account_id"]
            for line in read_probe(probe)
            if line["phase"] == "start" and line["at"] > faults.last
        }
        return again >= accounts

    await eventually(all_running_again, 60, "every account to run after the last fault")

    # The end: the dispatcher stops (runs out go on), then one more takes the outcomes in
    # with every task paused, so nothing new starts, and waits for every run to be closed.
    dispatcher.stop()
    final = TaskDispatcher(
        directory, run_backend=CeleryRunBackend(url, lost_after=LOST_AFTER), timezone="UTC"
    )
    for task_id in ids:
        final.pause_task(task_id)
    await final.start()
    try:
        await eventually(
            lambda: all(final.get_task(t).active_run is None for t in ids),
            90,
            "every run out to be closed",
        )
        records = {task_id: final.get_task(task_id) for task_id in ids}
        history = {task_id: final.runs(task_id, limit=10_000) for task_id in ids}
    finally:
        await final.stop()
    check(probe, records, history, faults)


def check(probe: Path, records: dict[str, Any], history: dict[str, Any], faults: Faults) -> None:
    lines = read_probe(probe)
    starts = [line for line in lines if line["phase"] == "start"]
    ends = {line["run_id"]: line for line in lines if line["phase"] != "start"}
    assert all(line["run_id"] != "?" for line in starts), "the probe could not name its run"
    assert len(starts) >= 4 * RUNS_BETWEEN, len(starts)

    # No run executed twice.
    twice = [run_id for run_id, n in Counter(line["run_id"] for line in starts).items() if n > 1]
    assert not twice, f"runs executed twice: {twice}"

    # Every run on a worker of its sys_type.
    for line in starts:
        assert line["worker"].startswith(line["sys_type"] + "-"), line

    # State and history equal to what the workers did.
    entries = {entry.run_id: entry for runs in history.values() for entry in runs}
    for line in starts:
        entry = entries.get(line["run_id"])
        assert entry is not None, f"run {line['run_id']} executed but not in the history"
        assert entry.worker == line["worker"], (line, entry)
        if entry.outcome == "succeeded":
            assert ends.get(line["run_id"], {}).get("phase") == "end", (line, entry)
    started_ids = {line["run_id"] for line in starts}
    for entry in entries.values():
        assert entry.outcome != "running", entry
        if entry.worker is not None and entry.outcome in ("succeeded", "failed"):
            assert entry.run_id in started_ids, f"{entry} has no run on its worker"
        if entry.outcome == "succeeded":
            assert entry.run_id in started_ids, entry
    # The faults did what they should: the killed worker's run and the frozen one's are lost.
    lost = {entry.worker for entry in entries.values() if entry.outcome == "lost"}
    assert set(faults.killed) <= lost, (faults.killed, lost)
    assert faults.frozen is not None
    assert faults.frozen[0] in lost, (faults.frozen, lost)
    for task_id, record in records.items():
        counted = [e for e in history[task_id] if e.outcome not in ("cancelled", "running")]
        assert record.run_count == len(counted), (task_id, record, counted)
        failed = [e for e in counted if e.outcome != "succeeded"]
        assert record.failure_count == len(failed), (task_id, record, failed)

    # No overlap within an account. A killed worker's runs end when it died; a frozen
    # worker's runs that were declared lost end, for this check, when it was frozen.
    zombies: list[tuple[str, float]] = []
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for line in starts:
        run_id, worker = line["run_id"], line["worker"]
        end_line = ends.get(run_id)
        end = end_line["at"] if end_line is not None else faults.killed.get(worker)
        if faults.frozen is not None and worker == faults.frozen[0]:
            _, stopped, thawed = faults.frozen
            if line["at"] < stopped < (end or time.time()) and entries[run_id].outcome == "lost":
                zombies.append((run_id, (end or time.time()) - thawed))
                end = stopped
        assert end is not None, f"run {run_id} on {worker} never ended"
        spans.setdefault(line["account_id"], []).append((line["at"], end, run_id))
    for account, runs in spans.items():
        runs.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(runs):
            assert end <= start, f"account {account}: {second} started before {first} ended"

    # A frozen worker that comes back stops the run it was told it lost at once (its
    # heartbeat finds the claim taken), instead of going on beside the account's next runs.
    late = [(run_id, round(after, 1)) for run_id, after in zombies if after > 1.5]
    assert not late, f"a resumed worker went on with runs declared lost for seconds: {late}"
