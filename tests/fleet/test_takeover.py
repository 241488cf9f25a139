"""Fleet takeover: a new leader of a cluster (a newer fencing epoch in PostgreSQL) takes the
broker from the one it replaced, and the outcomes that one left unapplied.

Real PostgreSQL (a fresh database: the leases), real Redis, real worker processes.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis
from fleet_support import FileInbox, OpenBackend, StartWorker, eventually, request
from postgres_support import Databases, postgres_databases

from jobstores.postgres.lease import Leadership
from scheduler.errors import BrokerInUseError
from scheduler.fleet import EVENTS_GROUP, EVENTS_STREAM
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
