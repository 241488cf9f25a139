"""Failover with real ``task-dispatcher run`` processes on one PostgreSQL store (a fresh
database per test, a 2-second lease): a killed leader is replaced, a frozen one starts and
commits nothing once replaced, and two instances started together elect one leader."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from helpers import Running, add_shell_task, cli
from postgres_support import ADMIN_DSN, Databases, postgres_databases, url_of
from psycopg import sql

__all__ = ["postgres_databases"]  # a fixture of every test here

LEASE = 2.0
TOKEN = "failover-test-token"


@pytest.fixture
def store_url(postgres_databases: Databases) -> str:
    """A fresh database's URL, with the test's short lease."""
    return f"{url_of(postgres_databases.create())}?lease={LEASE:g}"


@pytest.fixture
def instances(tmp_path: Path, store_url: str) -> Iterator[Callable[..., Running]]:
    """``instances(name, *run_args)``: ``task-dispatcher run`` on the store, with a directory
    of its own and the token :data:`TOKEN` (killed at the end if still running)."""
    started: list[Running] = []
    env = {"TASK_DISPATCHER_STORE": store_url, "TASK_DISPATCHER_TOKEN": TOKEN}

    def start(name: str, *args: str) -> Running:
        started.append(Running(tmp_path / name, *args, env=env))
        return started[-1]

    yield start
    for process in started:
        with_stopped = process.process.poll() is None
        if with_stopped:
            os.kill(process.process.pid, signal.SIGCONT)
        process.close()


def seed(tmp_path: Path, store_url: str, tick: str = "echo tick") -> None:
    """Import a tick every second (``tick``, running the command ``tick``) and an hourly task
    (``hourly``) into the store."""
    seed_dir = tmp_path / "seed"
    add_shell_task(seed_dir, "tick", "1s", f"command={tick}")
    add_shell_task(seed_dir, "hourly", "1h", "command=echo hourly")
    imported = cli(seed_dir, "--store", store_url, "import", str(seed_dir / "dispatch_config.json"))
    assert imported.returncode == 0, imported.stderr


def leads(lines: list[str]) -> bool:
    return any("leading cluster" in line for line in lines)


def stands_by(lines: list[str]) -> bool:
    return any("standing by:" in line for line in lines)


def stamp(line: str) -> datetime:
    """When a log line was written (its first field, as ``run`` logs without a terminal)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def logged_after(lines: list[str], when: datetime) -> list[str]:
    """The log lines written at or after ``when``."""
    return [line for line in lines if line[:4].isdigit() and stamp(line) >= when]


def runs_started(lines: list[str]) -> int:
    return sum(" started" in line and "run " in line for line in lines)


RUN_ID = re.compile(r"\brun (\S+) of task ")


def run_ids(lines: list[str], words: str) -> set[str]:
    """The ids of the runs whose log lines in ``lines`` contain ``words``."""
    found = (RUN_ID.search(line) for line in lines if words in line)
    return {match.group(1) for match in found if match is not None}


@pytest.mark.timeout(120)
def test_a_killed_leader_is_replaced_within_lease_plus_5_seconds(
    tmp_path: Path, store_url: str, instances: Callable[..., Running]
) -> None:
    seed(tmp_path, store_url)
    first = instances("a")
    first.wait_for(leads)
    first.wait_for(lambda lines: runs_started(lines) >= 1)
    second = instances("b")
    second.wait_for(stands_by)
    # An acknowledged change, through the leader's control socket.
    paused = cli(tmp_path / "a", "pause", "hourly")
    assert (paused.returncode, paused.stdout) == (0, "hourly: paused\n"), paused.stderr

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    killed = time.monotonic()
    second.wait_for(lambda lines: leads(lines) and runs_started(lines) >= 1, LEASE + 5)
    assert time.monotonic() - killed <= LEASE + 5

    listed = cli(tmp_path / "b", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    status = {task["task_id"]: task["status"] for task in json.loads(listed.stdout)}
    # The acknowledged change is there; the tick (every second) may be running right now.
    assert status["hourly"] == "paused"
    assert status["tick"] in ("pending", "running")
    assert set(status) == {"tick", "hourly"}


@pytest.mark.timeout(120)
def test_two_instances_started_at_the_same_instant_elect_one_leader(
    instances: Callable[..., Running],
) -> None:
    pair = [instances("a"), instances("b")]
    for process in pair:
        process.wait_for(lambda lines: leads(lines) or stands_by(lines))
    assert sorted(leads(process.seen) for process in pair) == [False, True]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mid_run", [False, True], ids=["between-runs", "mid-run"])
def test_a_frozen_leader_starts_and_commits_nothing_once_replaced(
    tmp_path: Path, store_url: str, instances: Callable[..., Running], mid_run: bool
) -> None:
    # Mid-run: each tick lasts most of its second, and the leader freezes while one runs.
    seed(tmp_path, store_url, "sleep 0.7" if mid_run else "echo tick")
    first = instances("a")
    first.wait_for(leads)
    first.wait_for(lambda lines: runs_started(lines) >= 1)
    second = instances("b")
    second.wait_for(stands_by)

    if mid_run:  # right after a tick's start logged now: the run goes on for 0.7 s
        now = first.caught_up()
        first.wait_for(
            lambda lines: bool(run_ids(lines[now:], "task tick (account me, shell) started"))
        )
    os.kill(first.process.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    second.wait_for(lambda lines: leads(lines) and runs_started(lines) >= 1, LEASE + 5)
    # The freeze is the scenario: three leases long, then the leader wakes.
    time.sleep(max(0.0, frozen + 3 * LEASE - time.monotonic()))
    before = len(first.seen)
    os.kill(first.process.pid, signal.SIGCONT)
    woke = time.monotonic()
    first.wait_for(lambda lines: any("stops leading" in line for line in lines[before:]), LEASE)
    assert time.monotonic() - woke <= LEASE
    first.wait_for(lambda lines: stands_by(lines[before:]))
    took_over = stamp(next(line for line in second.seen if "leading cluster" in line))
    after = logged_after(first.seen, took_over)
    assert runs_started(after) == 0, "".join(after)
    # A run in progress when the leader froze ends once it wakes, cut off (or finished
    # just before), and the fence refuses to commit its outcome; no run it started after
    # the takeover ends there.
    started_before = run_ids([line for line in first.seen if line not in after], ") started")
    ends = (" finished in ", ") failed", " was cut off")
    ended_after = {run_id for words in ends for run_id in run_ids(after, words)}
    assert ended_after <= started_before, "".join(after)
    if mid_run:
        assert ended_after, "".join(first.seen)  # the run in flight at the freeze ended
    # Whatever it tried to write was refused by the fence: the new leader's state stands.
    listed = cli(tmp_path / "b", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {t["task_id"] for t in json.loads(listed.stdout)} == {"tick", "hourly"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.timeout(120)
def test_a_standby_reports_the_leader_and_sends_changes_there(
    tmp_path: Path, store_url: str, instances: Callable[..., Running]
) -> None:
    seed(tmp_path, store_url)
    ports = free_port(), free_port()
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    first = instances("a", "--listen", f"127.0.0.1:{ports[0]}", "--advertise-url", urls[0])
    first.wait_for(leads)
    second = instances("b", "--listen", f"127.0.0.1:{ports[1]}", "--advertise-url", urls[1])
    second.wait_for(stands_by)
    second.wait_for_line("control API on http")
    auth = {"Authorization": f"Bearer {TOKEN}"}

    leader = httpx.get(f"{urls[0]}/api/v1/health", headers=auth, timeout=10).json()
    assert leader["role"] == "leader"
    assert leader["leader"]["url"] == urls[0]
    standby = httpx.get(f"{urls[1]}/api/v1/health", headers=auth, timeout=10).json()
    assert (standby["role"], standby["epoch"]) == ("standby", leader["epoch"])
    assert standby["leader"] == leader["leader"]

    change = httpx.post(f"{urls[1]}/api/v1/tasks/hourly/pause?x=1", headers=auth, timeout=10)
    assert change.status_code == 307
    assert change.headers["location"] == f"{urls[0]}/api/v1/tasks/hourly/pause?x=1"
    refused = httpx.post(f"{urls[1]}/api/v1/tasks/hourly/pause", timeout=10)
    assert refused.status_code == 401  # the standby's API needs the token too

    # The command line, on the standby's directory, follows to the leader with the token.
    paused = cli(tmp_path / "b", "pause", "hourly", env={"TASK_DISPATCHER_TOKEN": TOKEN})
    assert (paused.returncode, paused.stdout) == (0, "hourly: paused\n"), paused.stderr
    listed = cli(tmp_path / "a", "list", "--json")
    status = {task["task_id"]: task["status"] for task in json.loads(listed.stdout)}
    assert status["hourly"] == "paused"


@pytest.fixture
def own_role(postgres_databases: Databases, store_url: str) -> Iterator[tuple[str, str]]:
    """A login role owning the test's database: ``(its store URL, its name)``; a leader that
    connects as it loses the database when the role may no longer log in."""
    role = f"td_role_{uuid.uuid4().hex[:10]}"
    database = store_url.split("/")[-1].split("?")[0]
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    yield store_url.replace("://postgres@", f"://{role}@"), role
    with psycopg.connect(psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=database)) as inside:
        inside.execute(sql.SQL("REASSIGN OWNED BY {} TO postgres").format(sql.Identifier(role)))
        inside.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        inside.commit()
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO postgres").format(sql.Identifier(database))
        )
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.timeout(120)
def test_a_leader_cut_off_from_the_database_stops_within_one_lease_and_is_replaced(
    tmp_path: Path, own_role: tuple[str, str], store_url: str
) -> None:
    role_url, role = own_role
    seed(tmp_path, role_url)
    env = {"TASK_DISPATCHER_TOKEN": TOKEN}
    first = Running(tmp_path / "a", env={**env, "TASK_DISPATCHER_STORE": role_url})
    started = [first]
    try:
        first.wait_for(leads)
        first.wait_for(lambda lines: runs_started(lines) >= 1)
        second = Running(tmp_path / "b", env={**env, "TASK_DISPATCHER_STORE": store_url})
        started.append(second)
        second.wait_for(stands_by)
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:  # only the leader's role
            admin.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
            cut = datetime.now()
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
        first.wait_for(lambda lines: any("stops leading" in line for line in lines), LEASE + 5)
        second.wait_for(lambda lines: leads(lines) and runs_started(lines) >= 1, LEASE + 5)
        late = logged_after(first.seen, cut + timedelta(seconds=LEASE))
        assert runs_started(late) == 0, "".join(late)
    finally:
        for process in started:
            process.close()


@pytest.mark.timeout(120)
def test_a_leader_stopped_with_sigterm_gives_the_lease_up(
    tmp_path: Path, postgres_databases: Databases
) -> None:
    dsn = postgres_databases.create()
    env = {"TASK_DISPATCHER_STORE": f"{url_of(dsn)}?lease=30", "TASK_DISPATCHER_TOKEN": TOKEN}
    first = Running(tmp_path / "a", env=env)
    started = [first]
    try:
        first.wait_for(leads)
        second = Running(tmp_path / "b", env=env)
        started.append(second)
        second.wait_for(stands_by)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(30) == 0
        # Released, not left to run out (30 s): free, or taken by the standby already.
        holder = re.search(r"cluster 'default': (\S+) leads", "".join(first.seen))
        assert holder is not None
        with psycopg.connect(dsn) as connection:
            row = connection.execute("SELECT holder FROM td_leases").fetchone()
        assert row is not None
        assert row[0] != holder.group(1)
        second.wait_for(leads, 30 / 3 + 5)
    finally:
        for process in started:
            process.close()


@pytest.mark.timeout(120)
def test_the_leader_after_a_takeover_lists_the_runs_the_killed_one_recorded(
    tmp_path: Path, store_url: str, instances: Callable[..., Running]
) -> None:
    seed(tmp_path, store_url)
    first = instances("a")
    first.wait_for(leads)

    def recorded() -> set[str]:
        with psycopg.connect(store_url.partition("?")[0], autocommit=True) as admin:
            rows = admin.execute("SELECT run_id FROM td_runs WHERE outcome = 'succeeded'")
            return {run_id for (run_id,) in rows.fetchall()}

    deadline = time.monotonic() + 30
    while not (by_first := recorded()):
        assert time.monotonic() < deadline, "the first leader recorded no run in 30 s"
        time.sleep(0.1)
    second = instances("b")
    second.wait_for(stands_by)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    second.wait_for(lambda lines: leads(lines) and runs_started(lines) >= 1, LEASE + 5)

    shown = cli(tmp_path / "b", "runs", "--json", "--limit", "1000")  # through b's socket
    assert shown.returncode == 0, shown.stderr
    listed = {entry["run_id"]: entry for entry in json.loads(shown.stdout)}
    assert by_first <= set(listed)
    for name in ("a", "b"):  # the history is the cluster's, in neither directory
        assert not (tmp_path / name / "history.sqlite3").exists()
