"""Failover with real ``task-dispatcher run`` processes on one PostgreSQL store (a fresh
database per test, a 2-second lease): a killed leader is replaced, a frozen one starts and
commits nothing once replaced, and two instances started together elect one leader."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from helpers import Running, add_shell_task, cli
from postgres_support import Databases, postgres_databases, url_of

__all__ = ["postgres_databases"]  # a fixture of every test here

LEASE = 2.0


@pytest.fixture
def store_url(postgres_databases: Databases) -> str:
    """A fresh database's URL, with the test's short lease."""
    return f"{url_of(postgres_databases.create())}?lease={LEASE:g}"


@pytest.fixture
def instances(tmp_path: Path, store_url: str) -> Iterator[Callable[[str], Running]]:
    """``instances(name)``: ``task-dispatcher run`` on the store, with a directory of its own
    (killed at the end if still running)."""
    started: list[Running] = []

    def start(name: str) -> Running:
        started.append(Running(tmp_path / name, env={"TASK_DISPATCHER_STORE": store_url}))
        return started[-1]

    yield start
    for process in started:
        with_stopped = process.process.poll() is None
        if with_stopped:
            os.kill(process.process.pid, signal.SIGCONT)
        process.close()


def seed(tmp_path: Path, store_url: str) -> None:
    """Import a tick every second (``tick``) and an hourly task (``hourly``) into the store."""
    seed_dir = tmp_path / "seed"
    add_shell_task(seed_dir, "tick", "1s", "command=echo tick")
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


def runs_started(lines: list[str]) -> int:
    return sum(" started" in line and "run " in line for line in lines)


@pytest.mark.timeout(120)
def test_a_killed_leader_is_replaced_within_lease_plus_5_seconds(
    tmp_path: Path, store_url: str, instances: Callable[[str], Running]
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
    assert status == {"tick": "pending", "hourly": "paused"}


@pytest.mark.timeout(120)
def test_two_instances_started_at_the_same_instant_elect_one_leader(
    instances: Callable[[str], Running],
) -> None:
    pair = [instances("a"), instances("b")]
    for process in pair:
        process.wait_for(lambda lines: leads(lines) or stands_by(lines))
    assert sorted(leads(process.seen) for process in pair) == [False, True]


@pytest.mark.timeout(120)
def test_a_frozen_leader_starts_and_commits_nothing_once_replaced(
    tmp_path: Path, store_url: str, instances: Callable[[str], Running]
) -> None:
    seed(tmp_path, store_url)
    first = instances("a")
    first.wait_for(leads)
    first.wait_for(lambda lines: runs_started(lines) >= 1)
    second = instances("b")
    second.wait_for(stands_by)

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
    after = [line for line in first.seen if stamp(line) >= took_over]
    assert runs_started(after) == 0, "".join(after)
    assert not any("finished in" in line for line in after), "".join(after)
    # Whatever it tried to write was refused by the fence: the new leader's state stands.
    listed = cli(tmp_path / "b", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {t["task_id"] for t in json.loads(listed.stdout)} == {"tick", "hourly"}
