"""Fleet takeover: a new leader of a cluster (a newer fencing epoch in PostgreSQL) takes the
broker from the one it replaced, and the outcomes that one left unapplied; across several
takeovers of real ``task-dispatcher run`` processes (killed, frozen, leading again) no planned
run starts twice, and every outcome is applied once.

Real PostgreSQL (a fresh database per test), real Redis, real worker processes.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fleet_probe import read_probe
from fleet_support import (
    FileInbox,
    OpenBackend,
    StartWorker,
    eventually,
    request,
    wait_until,
)
from helpers import Running
from postgres_support import Databases, postgres_databases, url_of

from jobstores.postgres.lease import Leadership
from scheduler import CeleryRunBackend, TaskDispatcher
from scheduler.errors import BrokerInUseError
from scheduler.fleet.wire import EVENTS_GROUP, EVENTS_STREAM
from tasks.runs import RunEvent

__all__ = ["postgres_databases"]  # a fixture of every test here

pytestmark = pytest.mark.timeout(90)


class LeaderInbox(FileInbox):
    """The inbox of a cluster's dispatcher: it names its lease (as a dispatcher's ledger does);
    ``refuse``: its commits are refused, as a deposed leader's are by the fence."""

    def __init__(self, path: Path, leadership: Leadership, *, refuse: bool = False) -> None:
        super().__init__(path)
        self.leadership = leadership
        self.refuse = refuse
        self.offered: list[str] = []

    async def deliver(self, event: RunEvent) -> None:
        self.offered.append(event.run_id)
        if self.refuse:
            raise OSError("commit refused: the cluster is at a newer epoch")
        await super().deliver(event)


def pending(client: redis.Redis) -> int:
    """Entries of the event stream delivered to the dispatchers' consumer and not acknowledged."""
    try:
        return int(client.xpending(EVENTS_STREAM, EVENTS_GROUP)["pending"])
    except redis.ResponseError:  # no group yet
        return 0


async def test_a_new_leader_takes_the_broker_and_the_outcomes_the_old_one_left(
    postgres_databases: Databases,
    open_backend: OpenBackend,
    start_worker: StartWorker,
    broker_url: str,
    tmp_path: Path,
) -> None:
    dsn = postgres_databases.create()
    old_lease = Leadership.for_url(dsn, lease=30)
    new_lease = Leadership.for_url(dsn, lease=30)
    client = redis.Redis.from_url(broker_url)
    probe = tmp_path / "probe.jsonl"
    try:
        assert old_lease.try_acquire()
        start_worker("w1", "linux")
        old_inbox = LeaderInbox(tmp_path / "old.json", old_lease, refuse=True)
        old = await open_backend(old_inbox)
        await old.submit(request("r1", sys_type="linux", probe_log=probe))
        # The old leader read the run's outcome but could not apply it: left pending.
        await eventually(lambda: "r1" in old_inbox.offered, 20, "the old leader to read r1")
        assert pending(client) >= 1

        # Its lease runs out by the database's clock (it froze, died, or lost the database)
        # and another instance takes over, while the old one still believes it leads (the
        # worst case: its Redis lease is renewed and its process alive).
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("UPDATE td_leases SET expires_at = now()")
        assert new_lease.try_acquire()
        assert (new_lease.epoch, old_lease.is_leader_now()) == (2, True)
        new_inbox = LeaderInbox(tmp_path / "new.json", new_lease)
        new = await open_backend(new_inbox)  # not refused: its epoch is newer

        await eventually(lambda: new_inbox.finished("r1"), 20, "r1's outcome at the new leader")
        assert new_inbox.kinds("r1") == ["started", "succeeded"]
        assert new_inbox.duplicates == 0
        await eventually(lambda: pending(client) == 0, 10, "every outcome acknowledged")

        # The old one finds the newer epoch on the broker: it neither sends nor reads again.
        fenced = await eventually(
            lambda: old.health()["in_use_by_another_dispatcher"], 10, "the old one fenced"
        )
        assert "epoch 2" in fenced
        with pytest.raises(BrokerInUseError):
            await old.submit(request("r2", sys_type="linux", probe_log=probe))
        offered = list(old_inbox.offered)
        await new.submit(request("r3", sys_type="linux", probe_log=probe))
        await eventually(lambda: new_inbox.finished("r3"), 20, "r3's outcome")
        assert old_inbox.offered == offered
        assert "r2" not in new_inbox.events

        # An instance of the older epoch cannot take the broker back.
        with pytest.raises(BrokerInUseError, match="at epoch 2"):
            await open_backend(LeaderInbox(tmp_path / "late.json", old_lease))
    finally:
        old_lease.stop(release=False)
        new_lease.stop()


LEASE = 2.0
LOST_AFTER = 4.0
TAKEOVERS = 3
RUNS_BETWEEN = 8
"""Runs started on the workers between two takeovers."""


def cluster_tasks(probe: Path) -> list[dict[str, Any]]:
    """Three accounts of two tasks each, every two seconds, runs of 0.4 s and 1.2 s."""
    return [
        {
            "sys_type": "linux",
            "task_type": "probe",
            "interval": 2,
            "account_id": f"acct-{number}",
            "probe_log": str(probe),
            "seconds": seconds,
            "asynchronous": True,
        }
        for number in range(3)
        for seconds in (0.4, 1.2)
    ]


def in_flight(probe: Path) -> set[str]:
    """Ids of the runs started on a worker and not ended yet."""
    started: set[str] = set()
    for line in read_probe(probe):
        (started.add if line["phase"] == "start" else started.discard)(line["run_id"])
    return started


def leads(lines: list[str]) -> bool:
    return any("leading cluster" in line for line in lines)


def stands_by(lines: list[str]) -> bool:
    return any("standing by:" in line for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_no_planned_run_starts_twice_across_takeovers_and_outcomes_apply_once(
    postgres_databases: Databases, start_worker: StartWorker, broker_url: str, tmp_path: Path
) -> None:
    store_url = f"{url_of(postgres_databases.create())}?lease={LEASE:g}"
    probe = tmp_path / "probe.jsonl"
    setup = TaskDispatcher(
        tmp_path / "setup", run_backend=CeleryRunBackend(broker_url), store=store_url
    )
    ids = await setup.add_tasks(cluster_tasks(probe))
    setup.close()
    start_worker("linux-1", "linux", concurrency=4)
    start_worker("linux-2", "linux", concurrency=4)

    env = {"TASK_DISPATCHER_STORE": store_url, "TASK_DISPATCHER_TOKEN": "takeover-token"}
    started: list[Running] = []

    def instance(name: str) -> Running:
        started.append(
            Running(
                tmp_path / name, "--broker", broker_url, "--lost-after", f"{LOST_AFTER:g}", env=env
            )
        )
        return started[-1]

    def runs_started() -> int:
        return sum(line["phase"] == "start" for line in read_probe(probe))

    def more_runs(wanted: int) -> Callable[[], bool]:
        return lambda: runs_started() >= wanted

    caught: list[set[str]] = []
    try:
        leader, standby = instance("a"), None
        leader.wait_for(leads, 30)
        standby = instance("b")
        standby.wait_for(stands_by, 30)
        wait_until(lambda: runs_started() >= RUNS_BETWEEN, 60, "the fleet to get going")
        names = {id(leader): "a", id(standby): "b"}
        for _ in range(TAKEOVERS):
            # SIGKILL the leader while runs it sent execute on the workers.
            caught.append(wait_until(lambda: in_flight(probe), 30, "a run in flight"))
            leader.process.send_signal(signal.SIGKILL)
            leader.process.wait(10)
            standby.wait_for(leads, LEASE + 15)
            replacement = instance(names[id(leader)])
            names[id(replacement)] = names[id(leader)]
            replacement.wait_for(stands_by, 30)
            wait_until(more_runs(runs_started() + RUNS_BETWEEN), 60, "runs after a takeover")
            leader, standby = standby, replacement
        # Once more with a frozen leader: its lease on the broker, renewed until it froze
        # and held by a live process, must not keep its successor out; woken, it stands by.
        caught.append(wait_until(lambda: in_flight(probe), 30, "a run in flight"))
        os.kill(leader.process.pid, signal.SIGSTOP)
        try:
            standby.wait_for(leads, LEASE + 15)
            wait_until(more_runs(runs_started() + RUNS_BETWEEN), 60, "runs after a takeover")
        finally:
            os.kill(leader.process.pid, signal.SIGCONT)
        woke = len(leader.seen)
        leader.wait_for(lambda lines: stands_by(lines[woke:]), 30)
        # And the woken instance leads again, in the same process, once its successor dies.
        caught.append(wait_until(lambda: in_flight(probe), 30, "a run in flight"))
        standby.process.send_signal(signal.SIGKILL)
        standby.process.wait(10)
        leader.wait_for(lambda lines: leads(lines[woke:]), LEASE + 15)
        wait_until(more_runs(runs_started() + RUNS_BETWEEN), 60, "runs after a takeover")
        leader.process.send_signal(signal.SIGTERM)
        assert leader.process.wait(60) == 0, "".join(leader.seen[-20:])
    finally:
        for process in started:
            process.close()

    # One more instance takes the outcomes still out in, with every task paused so that
    # nothing new starts, and waits until every run is closed.
    final = TaskDispatcher(
        tmp_path / "final",
        run_backend=CeleryRunBackend(broker_url, lost_after=LOST_AFTER),
        store=store_url,
    )
    for task_id in ids:
        final.pause_task(task_id)
    await final.start()
    try:
        await eventually(
            lambda: all(final.get_task(t).active_run is None for t in ids),
            60,
            "every run out to be closed",
        )
        records = {task_id: final.get_task(task_id) for task_id in ids}
    finally:
        await final.stop()

    lines = read_probe(probe)
    starts = [line for line in lines if line["phase"] == "start"]
    ended = {line["run_id"] for line in lines if line["phase"] == "end"}
    assert len(starts) >= (TAKEOVERS + 3) * RUNS_BETWEEN, len(starts)
    assert all(line["scheduled_at"] != "?" for line in starts), "a run without its planned time"
    twice = [run for run, n in Counter(line["run_id"] for line in starts).items() if n > 1]
    assert not twice, f"runs executed twice: {twice}"
    planned = Counter((line["task_id"], line["scheduled_at"]) for line in starts)
    doubled = [run for run, n in planned.items() if n > 1]
    assert not doubled, f"planned runs started twice: {doubled}"
    # The workers were never stopped: every run ended, those caught by a takeover included.
    assert {line["run_id"] for line in starts} <= ended
    assert all(runs and runs <= ended for runs in caught), caught
    # Each outcome applied exactly once: a task counts exactly the runs its workers executed.
    executed = Counter(line["task_id"] for line in starts)
    counts = {task_id: (r.run_count, r.failure_count) for task_id, r in records.items()}
    assert counts == {task_id: (executed[task_id], 0) for task_id in ids}
