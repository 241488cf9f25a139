"""The worker under faults, with real worker processes and Redis servers of the tests' own:
a broker whose persistence cannot keep claims, a broker killed right after a claim, a worker
frozen past ``lost_after``, a partition, messages of another format, deployment mistakes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet_probe import read_probe
from fleet_support import (
    ROOT,
    TESTS,
    FileInbox,
    OpenBackend,
    RedisServer,
    StartWorker,
    eventually,
    redis_with_waitaof,
    request,
    wait_until,
)

from scheduler.errors import BrokerNotDurableError
from scheduler.fleet.wire import (
    CLAIM_PREFIX,
    CLAIM_SCRIPT,
    MESSAGE_FORMAT,
    TASK_NAME,
    broker_durability,
    queue_name,
)
from scheduler.fleet.worker import make_app
from tasks.runs import RunRequest

pytestmark = pytest.mark.timeout(90)

DURABLE = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
EVERYSEC = {**DURABLE, "appendfsync": "everysec"}


# ---------------------------------------------------------------------- the rule, as a table


@pytest.mark.parametrize(
    ("version", "settings", "expected"),
    [
        ("7.0.15", DURABLE, "fsync"),
        ("7.2.4", DURABLE, "waitaof"),
        ("7.2.0", {**DURABLE, "appendfsync": "everysec"}, "waitaof"),
        ("8.0.1", {**DURABLE, "appendfsync": "everysec"}, "waitaof"),
        ("8.0.1", {**DURABLE, "appendfsync": "no"}, "appendfsync no"),
        ("7.2.4", {**DURABLE, "appendfsync": " No "}, "appendfsync no"),
        ("7.2.4", {**DURABLE, "appendfsync": None}, "waitaof"),  # CONFIG off, INFO enough
        ("7.0.15", {**DURABLE, "appendfsync": "everysec"}, "appendfsync everysec"),
        ("6.2.14", {**DURABLE, "appendfsync": "no"}, "appendfsync no"),
        ("7.0.15", {**DURABLE, "appendonly": "no"}, "appendonly no"),
        ("7.4.0", {**DURABLE, "appendonly": "no"}, "appendonly no"),
        ("7.0.15", {**DURABLE, "maxmemory-policy": "allkeys-lru"}, "maxmemory-policy"),
        ("7.2.4", {**DURABLE, "maxmemory-policy": "volatile-ttl"}, "maxmemory-policy"),
        ("7.0.15", {**DURABLE, "appendfsync": None}, "CONFIG GET"),
        ("7.0.15", dict.fromkeys(DURABLE), "CONFIG GET"),
    ],
)
def test_which_broker_keeps_claims(
    version: str, settings: dict[str, str | None], expected: str
) -> None:
    if expected in ("fsync", "waitaof"):
        assert broker_durability(version, settings) == expected
        return
    with pytest.raises(BrokerNotDurableError) as caught:
        broker_durability(version, settings)
    assert expected in str(caught.value)
    assert "--allow-non-durable-broker" in str(caught.value)
    assert "run them again" in str(caught.value)


# ---------------------------------------------------------------------- starting a worker


def worker_command(url: str, *extra: str, factory: str | None = "fleet_probe:factory") -> list[str]:
    command = [sys.executable, "-m", "scheduler", "worker", "--broker", url, "--sys-type", "linux"]
    if factory:
        command += ["--factory", factory]
    return [*command, *extra]


def worker_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop("TASK_DISPATCHER_BROKER", None)
    env.pop("TASK_DISPATCHER_FACTORY", None)
    env.pop("TASK_DISPATCHER_ALLOW_NON_DURABLE_BROKER", None)
    return env


def refused(command: list[str], cwd: Path = ROOT) -> str:
    """Run a worker command that must refuse to start; its error output."""
    done = subprocess.run(
        command, cwd=cwd, env=worker_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


def started(url: str, name: str, *extra: str) -> str:
    """Start a worker named ``name`` that must start; once it serves, stop it: its output."""
    process = subprocess.Popen(
        [*worker_command(url, "--hostname", name), *extra],
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = redis.Redis.from_url(url)
        wait_until(lambda: client.exists(f"td:worker:{name}"), 30, f"worker {name} to start")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
    return output


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"appendonly": "no"}, "appendonly no"),
        ({"appendonly": "yes", "appendfsync": "everysec"}, "appendfsync everysec"),
        (
            {**DURABLE, "maxmemory": "100mb", "maxmemory-policy": "allkeys-lru"},
            "maxmemory-policy allkeys-lru",
        ),
        ({**DURABLE, "rename-command": 'CONFIG ""'}, "CONFIG GET"),
    ],
)
def test_worker_refuses_a_broker_that_cannot_keep_claims(
    tmp_path: Path, config: dict[str, str], named: str
) -> None:
    if "rename-command" in config:
        # A renamed command goes in a config file (it takes two words).
        conf = tmp_path / "redis.conf"
        conf.write_text(f"rename-command {config.pop('rename-command')}\n")
    server = RedisServer(tmp_path, config=config)
    if (tmp_path / "redis.conf").exists():
        server.config = {"include": str(tmp_path / "redis.conf"), **server.config}
    server.start()
    try:
        error = refused(worker_command(server.url()))
        assert "task-dispatcher: error: --broker redis://127.0.0.1:" in error
        assert named in error
        assert "--allow-non-durable-broker" in error
        # Knowingly: the flag starts it anyway, with a warning.
        output = started(server.url(), "knowingly", "--allow-non-durable-broker")
        assert "persistence not verified (--allow-non-durable-broker)" in output
    finally:
        server.kill()


def test_factory_beside_the_current_directory_and_a_missing_one(
    tmp_path: Path, broker_url: str, open_backend: OpenBackend
) -> None:
    (tmp_path / "mymgr.py").write_text(
        "import pathlib\n"
        "class M:\n"
        "    def __init__(self, **kwargs):\n"
        "        self.out = kwargs['probe_log']\n"
        "    def run(self):\n"
        "        pathlib.Path(self.out).write_text('ran')\n"
    )
    error = refused(
        worker_command(broker_url, "--allow-non-durable-broker", factory="nomgr:M"), tmp_path
    )
    assert "--factory: cannot load 'nomgr:M': No module named 'nomgr'" in error
    assert f"current directory {tmp_path}" in error

    env = {**worker_env(), "PYTHONPATH": str(ROOT)}  # mymgr is found from the cwd only
    command = worker_command(broker_url, "--allow-non-durable-broker", factory="mymgr:M")
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = redis.Redis.from_url(broker_url)
    # No --hostname: a unique default, with the pid.
    key = f"td:worker:worker-{process.pid}@{socket.gethostname()}"
    try:
        wait_until(lambda: client.exists(key), 30, f"{key} to be registered")
        app = make_app(broker_url)
        out = tmp_path / "out.txt"
        run = request("beside", sys_type="linux", probe_log=out)
        app.send_task(
            TASK_NAME,
            args=[{"format": MESSAGE_FORMAT, "request": run.to_json()}],
            queue=queue_name("linux"),
        )
        wait_until(out.exists, 30, "the run of the factory from the current directory")
        app.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=20)


async def test_a_message_of_another_format_is_refused_and_recorded(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path, broker_url: str
) -> None:
    worker = start_worker("w1", "linux")
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox)
    probe = tmp_path / "probe.jsonl"
    run = request("future", sys_type="linux", probe_log=probe)
    await backend.recover([run])
    app = make_app(broker_url)
    app.send_task(
        TASK_NAME, args=[{"format": 99, "request": run.to_json()}], queue=queue_name("linux")
    )
    await eventually(lambda: inbox.finished("future"), 20, "the refusal to be recorded")
    app.close()
    failed = inbox.last("future")
    assert failed is not None
    assert failed["kind"] == "failed"
    assert "MessageFormatError: the run message has format 99" in failed["error"]
    assert "same release" in failed["error"]
    assert read_probe(probe) == []
    assert "run future of task task-future refused: MessageFormatError" in worker.log()


# ---------------------------------------------------------------------- a broker crash


@pytest.mark.parametrize("durability", ["fsync", "waitaof"])
async def test_broker_killed_right_after_a_claim_never_runs_it_twice(
    tmp_path: Path, start_worker: StartWorker, open_backend: OpenBackend, durability: str
) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    if durability == "fsync":  # appendfsync always, on the machine's Redis
        server = RedisServer(data, config=DURABLE).start()
    else:  # Redis's default appendfsync everysec; each claim waits for its fsync
        server = RedisServer(data, config=EVERYSEC, binary=redis_with_waitaof()).start()
    try:
        url = server.url()
        worker = start_worker(
            "w1", "linux", broker=url, concurrency=2, visibility_timeout=1, check_broker=True
        )
        inbox = FileInbox(tmp_path / "inbox.json")
        backend = await open_backend(inbox, broker_url=url, lost_after=20.0)
        probe = tmp_path / "probe.jsonl"
        run = request("crash", sys_type="linux", probe_log=probe, seconds=3)
        await backend.submit(run)
        client = redis.Redis.from_url(url)
        await eventually(lambda: client.exists(CLAIM_PREFIX + "crash"), 20, "the claim")
        server.kill()  # a power loss just after the claim was answered
        server.start()
        # The claim survived; a message that comes back (restored after its visibility
        # timeout, or its acknowledgement lost with the crash) finds it.
        assert client.exists(CLAIM_PREFIX + "crash")
        await eventually(lambda: inbox.finished("crash"), 30, "the outcome")
        await eventually(lambda: backend.health()["connected"], 20, "the broker to be back")
        heir = start_worker("w2", "linux", broker=url, check_broker=True)
        await backend.submit(run)
        await eventually(
            lambda: (
                "run crash of task task-crash not executed here: already claimed"
                in heir.log() + worker.log()
            ),
            20,
            "the message that came back to be refused",
        )
        assert inbox.kinds("crash") == ["started", "succeeded"]
        assert [line["phase"] for line in read_probe(probe)] == ["start", "end"]
        assert ("each claim waits for its fsync (WAITAOF)" in worker.log()) == (
            durability == "waitaof"
        )
    finally:
        server.kill()


# ---------------------------------------------------------------------- WAITAOF (Redis >= 7.2)


def monitor(url: str) -> tuple[list[dict[str, Any]], Callable[[], None]]:
    """Every command the server executes, as MONITOR reports it, until the returned stop."""
    seen: list[dict[str, Any]] = []
    done = threading.Event()
    ready = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(url).monitor() as watching:  # type: ignore[no-untyped-call]
            ready.set()
            with contextlib.suppress(redis.ConnectionError):  # the server killed
                for command in watching.listen():
                    seen.append(command)
                    if done.is_set():
                        return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    wait_until(ready.is_set, 10, "MONITOR to start")

    def stop() -> None:
        done.set()
        redis.Redis.from_url(url).ping()  # one more command wakes the watcher
        thread.join(10)

    return seen, stop


async def test_each_claim_waits_for_its_own_fsync_on_its_own_connection(
    tmp_path: Path, start_worker: StartWorker, open_backend: OpenBackend
) -> None:
    """WAITAOF waits for the writes of the connection it is sent on: sent on another
    connection of the pool (another thread's claim, a heartbeat), it answers at once and the
    run starts before its claim is on disk."""
    server = RedisServer(tmp_path, config=EVERYSEC, binary=redis_with_waitaof()).start()
    try:
        url = server.url()
        seen, stop = monitor(url)
        worker = start_worker("w1", "linux", broker=url, concurrency=4, check_broker=True)
        assert "each claim waits for its fsync (WAITAOF)" in worker.log()
        inbox = FileInbox(tmp_path / "inbox.json")
        backend = await open_backend(inbox, broker_url=url)
        probe = tmp_path / "probe.jsonl"
        runs = [
            request(f"r{i}", sys_type="linux", probe_log=probe, account_id=f"a{i}", seconds=0.3)
            for i in range(16)
        ]
        for run in runs:
            await backend.submit(run)
        await eventually(
            lambda: all(inbox.finished(run.run_id) for run in runs), 30, "every outcome"
        )
        stop()
        started = [line["run_id"] for line in read_probe(probe) if line["phase"] == "start"]
        assert sorted(started) == sorted(run.run_id for run in runs)
        claim_sha = hashlib.sha1(CLAIM_SCRIPT.encode()).hexdigest()
        by_connection: dict[str, list[tuple[float, str]]] = {}
        for seen_command in seen:
            by_connection.setdefault(seen_command["client_port"], []).append(
                (float(seen_command["time"]), seen_command["command"])
            )
        # What followed each run's last claim on the claim's own connection (an earlier one
        # may have met a server that did not know the script yet).
        followed_by: dict[str, tuple[float, str]] = {}
        for commands in by_connection.values():
            for (at, command), (_, after) in zip(commands, [*commands[1:], (0, "")], strict=True):
                if command.startswith(f"EVALSHA {claim_sha} 3 {CLAIM_PREFIX}"):
                    run_id = command.split()[3].removeprefix(CLAIM_PREFIX)
                    if at >= followed_by.get(run_id, (0.0, ""))[0]:
                        followed_by[run_id] = (at, after.split(" ", 1)[0])
        assert {run_id: after for run_id, (_, after) in followed_by.items()} == {
            run.run_id: "WAITAOF" for run in runs
        }
    finally:
        server.kill()


def test_a_newer_redis_without_fsyncs_is_refused(tmp_path: Path) -> None:
    """``appendfsync no``: WAITAOF would never confirm a claim, so each run would wait and fail."""
    config = {**EVERYSEC, "appendfsync": "no"}
    server = RedisServer(tmp_path, config=config, binary=redis_with_waitaof()).start()
    try:
        error = refused(worker_command(server.url()))
        assert "appendfsync no" in error
        assert "WAITAOF never confirms a claim" in error
    finally:
        server.kill()


@pytest.mark.parametrize("appendfsync", ["everysec", "no"])
def test_with_config_disabled_a_first_waitaof_tells(tmp_path: Path, appendfsync: str) -> None:
    """Where CONFIG is disabled, ``appendfsync`` cannot be read: the worker writes a test key
    and asks WAITAOF whether the broker confirms its fsync."""
    conf = tmp_path / "redis.conf"
    conf.write_text('rename-command CONFIG ""\n')
    config = {"include": str(conf), **EVERYSEC, "appendfsync": appendfsync}
    server = RedisServer(tmp_path, config=config, binary=redis_with_waitaof()).start()
    try:
        if appendfsync == "no":
            error = refused(worker_command(server.url()))
            assert "did not write a test key to disk within 3000ms (appendfsync no?)" in error
            return
        output = started(server.url(), "probed")
        assert "each claim waits for its fsync (WAITAOF)" in output
    finally:
        server.kill()


async def test_a_claim_the_broker_cannot_fsync_is_not_run(
    tmp_path: Path, start_worker: StartWorker, open_backend: OpenBackend
) -> None:
    """The append-only file switched off while the worker serves: WAITAOF refuses, and the run
    fails without executing instead of leaving its run open."""
    server = RedisServer(tmp_path, config=EVERYSEC, binary=redis_with_waitaof()).start()
    try:
        url = server.url()
        worker = start_worker("w1", "linux", broker=url, check_broker=True)
        inbox = FileInbox(tmp_path / "inbox.json")
        backend = await open_backend(inbox, broker_url=url)
        redis.Redis.from_url(url).config_set("appendonly", "no")
        probe = tmp_path / "probe.jsonl"
        await backend.submit(request("nofsync", sys_type="linux", probe_log=probe))
        await eventually(lambda: inbox.finished("nofsync"), 30, "the refusal to be recorded")
        failed = inbox.last("nofsync")
        assert failed is not None
        assert failed["kind"] == "failed"
        assert failed["error"].startswith(
            "BrokerNotDurableError: the broker refused to confirm that the run's claim is on "
            "disk (WAITAOF cannot be used when numlocal is set but appendonly is disabled"
        )
        assert failed["error"].endswith("the run was not executed")
        assert read_probe(probe) == []
        assert "run nofsync of task task-nofsync failed" in worker.log()
    finally:
        server.kill()


# ---------------------------------------------------------------------- zombies, partitions


def shell_run(run_id: str, directory: Path) -> RunRequest:
    """A shell run that records its process group and ticks until it is killed."""
    ticks = directory / "ticks"
    script = f"echo $$ > {directory / 'pgid'}; while :; do echo x >> {ticks}; sleep 0.1; done"
    now = datetime.now(UTC)
    return RunRequest(
        run_id=run_id,
        task_id=f"task-{run_id}",
        account_id="acct",
        sys_type="linux",
        task_type="shell",
        kwargs={"task_id": f"task-{run_id}", "task_type": "shell", "command": ["sh", "-c", script]},
        scheduled_at=now,
        submitted_at=now,
    )


@pytest.fixture
def shells() -> Iterator[list[int]]:
    """Process groups of shell runs, killed at the end whatever the test found."""
    groups: list[int] = []
    yield groups
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_worker_frozen_past_lost_after_stops_its_run(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path, shells: list[int]
) -> None:
    worker = start_worker("zombie", "linux", factory=None)
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, lost_after=2.0)
    await backend.submit(shell_run("frozen", tmp_path))
    await eventually(lambda: inbox.kinds("frozen") == ["started"], 20, "the run to start")
    pgid = int(
        await eventually(
            lambda: (tmp_path / "pgid").read_text().strip() if (tmp_path / "pgid").exists() else "",
            10,
            "the shell",
        )
    )
    shells.append(pgid)
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        await eventually(lambda: inbox.finished("frozen"), 15, "the run to be declared lost")
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
    assert inbox.kinds("frozen") == ["started", "lost"]
    # Back from its freeze, the worker learns its claim was taken and kills the command.
    await eventually(lambda: group_gone(pgid), 10, "the shell's process group to be killed")
    await eventually(lambda: "too late" in worker.log(), 10, "the late outcome to be dropped")
    log = worker.log()
    assert (
        "run frozen of task task-frozen (account acct) stopped on zombie: it the dispatcher" in log
    )
    assert "declared it lost (at " in log
    assert "b'" not in log
    ticks = (tmp_path / "ticks").read_text().count("x")
    await asyncio.sleep(0.5)  # a window in which a live command would have ticked 5 times
    assert (tmp_path / "ticks").read_text().count("x") == ticks
    assert inbox.kinds("frozen") == ["started", "lost"]


LOST_AFTER = 5.0
"""The cut-off test's ``lost_after``: half of it is the worker's patience."""


@pytest.mark.parametrize("cut", ["killed", "frozen"])
async def test_a_worker_cut_off_from_the_broker_stops_its_run(
    tmp_path: Path,
    start_worker: StartWorker,
    open_backend: OpenBackend,
    shells: list[int],
    cut: str,
) -> None:
    """The broker dies (connections refused) or freezes (requests hang unanswered)."""
    server = RedisServer(tmp_path).start()
    try:
        worker = start_worker("cut", "linux", factory=None, broker=server.url())
        inbox = FileInbox(tmp_path / "inbox.json")
        backend = await open_backend(inbox, broker_url=server.url(), lost_after=LOST_AFTER)
        await backend.submit(shell_run("partitioned", tmp_path))
        await eventually(lambda: inbox.kinds("partitioned") == ["started"], 20, "the start")
        pgid = int(
            await eventually(
                lambda: (
                    (tmp_path / "pgid").read_text().strip() if (tmp_path / "pgid").exists() else ""
                ),
                10,
                "the shell",
            )
        )
        shells.append(pgid)
        assert server.process is not None
        frozen = server.process.pid
        if cut == "killed":
            server.kill()
        else:
            os.kill(frozen, signal.SIGSTOP)
        cut_at = time.monotonic()
        # Half of lost_after without renewing: stopped before the dispatcher declares the run
        # lost, so before anyone could run the account's next run elsewhere (1 s of slack for
        # a loaded machine).
        await eventually(lambda: group_gone(pgid), 10, "the shell's process group to be killed")
        assert time.monotonic() - cut_at < LOST_AFTER + 1.0
        assert (
            f"could not renew its heartbeat for {LOST_AFTER / 2:g}s (broker unreachable"
            in worker.log()
        )
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.kill()


async def test_a_frozen_sync_manager_is_reported_and_keeps_its_slot(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path
) -> None:
    worker = start_worker("stuck", "linux", concurrency=1)
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, lost_after=2.0)
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("sync", sys_type="linux", probe_log=probe, seconds=8))
    await eventually(lambda: inbox.kinds("sync") == ["started"], 20, "the run to start")
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        await eventually(lambda: inbox.finished("sync"), 15, "the run to be declared lost")
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
    await eventually(lambda: "cannot be stopped" in worker.log(), 10, "the report")
    assert "this worker slot stays taken until it returns" in worker.log()
    # The slot is withheld: the next run starts only once the stuck one returned.
    await backend.submit(request("after", sys_type="linux", probe_log=probe))
    await eventually(lambda: inbox.finished("after"), 20, "the next run")
    phases = [(line["task_id"], line["phase"]) for line in read_probe(probe)]
    assert phases == [
        ("task-sync", "start"),
        ("task-sync", "end"),
        ("task-after", "start"),
        ("task-after", "end"),
    ]
    assert inbox.kinds("sync") == ["started", "lost"]


async def test_sigterm_lets_the_running_run_finish_and_record_its_outcome(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path
) -> None:
    worker = start_worker("leaving", "linux")
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox)
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("last", sys_type="linux", probe_log=probe, seconds=2))
    await eventually(lambda: inbox.kinds("last") == ["started"], 20, "the run to start")
    os.killpg(worker.process.pid, signal.SIGTERM)  # a warm shutdown
    await eventually(lambda: inbox.finished("last"), 20, "the outcome")
    assert inbox.kinds("last") == ["started", "succeeded"]
    await eventually(lambda: worker.process.poll() is not None, 20, "the worker to exit")
    assert [line["phase"] for line in read_probe(probe)] == ["start", "end"]
