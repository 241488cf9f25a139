"""Leadership of a cluster: one leader at a time, a fencing epoch, the leader's own deadline."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from jobstores.postgres import (
    Leadership,
    NotLeadingError,
    PostgresState,
    StaleLeaderError,
    connector,
    read_lease,
)
from jobstores.postgres.lease import check_fence

from .conftest import FakeClock


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (polled), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def lease_of(connect: Callable[[], psycopg.Connection[Any]], cluster: str) -> Any:
    with connect() as connection:
        return read_lease(connection, cluster)


def expired(connect: Callable[[], psycopg.Connection[Any]], cluster: str) -> Callable[[], bool]:
    """Whether the cluster's lease has run out by the database's clock."""
    return lambda: not lease_of(connect, cluster).valid


def test_two_contenders_started_at_the_same_instant_on_an_empty_database_one_leads(
    empty_database: str,
) -> None:
    # Each on its own connection, on a database without tables: both create the schema
    # and campaign at once; exactly one leads, every round.
    contenders = 4
    for round_ in range(5):
        cluster = f"race-{round_}"
        barrier = threading.Barrier(contenders)
        leaderships = [
            Leadership(connector(empty_database, timeout=5), cluster, holder=f"c{i}")
            for i in range(contenders)
        ]

        def campaign(leadership: Leadership, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait(timeout=10)
            return leadership.try_acquire()

        with ThreadPoolExecutor(contenders) as pool:
            won = list(pool.map(campaign, leaderships))
        assert won.count(True) == 1, won
        leader = leaderships[won.index(True)]
        assert leader.epoch == 1
        assert lease_of(connector(empty_database), cluster).holder == leader.holder
        for leadership in leaderships:
            leadership.stop(release=False)


def test_the_leader_stops_leading_when_its_own_deadline_passes(
    make_leadership: Callable[..., Leadership],
) -> None:
    clock = FakeClock()
    reasons: list[str] = []
    leader = make_leadership(clock=clock, lease=10, on_step_down=reasons.append)
    assert not leader.is_leader_now()
    assert leader.try_acquire()
    assert leader.is_leader_now()
    assert leader.role == "leader"
    clock.advance(9.99)
    assert leader.is_leader_now()
    clock.advance(0.01)
    assert not leader.is_leader_now()  # by its own clock, whatever the database says
    assert leader.role == "standby"
    with pytest.raises(NotLeadingError):
        leader.fence()
    assert reasons == ["its lease ran out before it could be renewed"]
    assert leader.epoch is None
    assert not leader.check()
    assert len(reasons) == 1  # told once


def test_a_renewal_moves_the_deadline_from_the_instant_it_was_sent(
    make_leadership: Callable[..., Leadership],
) -> None:
    clock = FakeClock()
    leader = make_leadership(clock=clock, lease=10)
    assert leader.try_acquire()
    start = clock()
    assert leader.deadline == start + 10
    clock.advance(3.3)
    assert leader.renew()
    assert leader.deadline == start + 13.3
    clock.advance(9.0)
    assert leader.is_leader_now()  # past the first deadline, within the renewed one


def test_a_renewal_sent_after_the_deadline_does_not_revive_the_lease(
    make_leadership: Callable[..., Leadership],
) -> None:
    clock = FakeClock()
    reasons: list[str] = []
    leader = make_leadership(clock=clock, lease=10, on_step_down=reasons.append)
    assert leader.try_acquire()
    clock.advance(10.5)
    assert not leader.renew()
    assert leader.epoch is None
    assert reasons == ["its lease ran out before it could be renewed"]


def test_an_unreachable_database_keeps_the_deadline_until_it_passes(
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    clock = FakeClock()
    reachable = [True]
    unreachable = connector("postgresql://postgres@127.0.0.1:1/postgres", timeout=1)

    def switching() -> psycopg.Connection[Any]:
        return connect() if reachable[0] else unreachable()

    leader = make_leadership(clock=clock, lease=10, connect=switching)
    assert leader.try_acquire()
    # Its connection dies and the database cannot be reached any more.
    assert leader._connection is not None
    with connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (leader._connection.info.backend_pid,))
    reachable[0] = False
    clock.advance(4)
    assert leader.renew()  # failed, but the lease it holds is still valid by its clock
    assert leader.last_error is not None
    assert leader.is_leader_now()
    clock.advance(6)
    assert not leader.renew()
    assert not leader.is_leader_now()


def test_epochs_rise_at_every_takeover(
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    a = make_leadership(holder="a", lease=0.3)
    b = make_leadership(holder="b", lease=0.3)
    epochs = []
    assert a.try_acquire()
    epochs.append(a.epoch)
    assert not b.try_acquire()  # a's lease is valid
    a.release()  # given up: b takes it at once
    assert b.try_acquire()
    epochs.append(b.epoch)
    # b goes silent: once its lease ran out by the database's clock, a takes over.
    wait_for(expired(connect, cluster))
    assert a.try_acquire()
    epochs.append(a.epoch)
    # Even the same instance taking it again gets a new epoch.
    wait_for(expired(connect, cluster))
    a._epoch = None  # it forgot it led (a restart)
    assert a.try_acquire()
    epochs.append(a.epoch)
    assert epochs == [1, 2, 3, 4]
    assert lease_of(connect, cluster).epoch == 4


def test_a_stale_leaders_commit_is_refused_and_changes_nothing(
    make_leadership: Callable[..., Leadership],
    state: PostgresState,
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    old = make_leadership(holder="old", lease=0.3)
    assert old.try_acquire()
    stale = old.fence()
    state.commit(stale, saved_at="2026-01-08T08:00:00+08:00", timezone=None, extra={"n": 1})
    before = state.load()
    # It freezes (its own clock stands still, so it still believes it leads) ...
    wait_for(expired(connect, cluster))
    new = make_leadership(holder="new", lease=10)
    assert new.try_acquire()
    assert old.is_leader_now()
    # ... and its commit, made after the takeover, is refused.
    with pytest.raises(StaleLeaderError, match=r"epoch 1 refused.*epoch 2 by 'new'") as raised:
        state.commit(
            old.fence(), saved_at="2026-01-08T09:00:00+08:00", timezone=None, extra={"n": 2}
        )
    assert isinstance(raised.value, OSError)
    assert state.load() == before
    # The new leader commits.
    state.commit(new.fence(), saved_at="2026-01-08T09:00:00+08:00", timezone=None, extra={"n": 3})
    loaded = state.load()
    assert loaded is not None
    assert loaded.extra == {"n": 3}


def test_a_leader_that_finds_a_newer_epoch_steps_down_with_one_error(
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reasons: list[str] = []
    leader = make_leadership(holder="a", on_step_down=reasons.append)
    assert leader.try_acquire()
    with connect() as admin:  # another instance took over (as after a freeze)
        admin.execute(
            "UPDATE td_leases SET epoch = epoch + 1, holder = 'b' WHERE cluster = %s", (cluster,)
        )
    with caplog.at_level(logging.ERROR, logger="jobstores.postgres.lease"):
        assert not leader.renew()
        assert not leader.renew()
    assert reasons == ["another instance took over (a newer epoch)"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "stops leading (epoch 1)" in errors[0].getMessage()
    assert leader.epoch is None


def test_the_lease_thread_renews_and_a_standby_takes_over_when_it_stops(
    connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    lease = 1.5  # generous: a busy machine must not starve the renewals
    a = Leadership(connect, cluster, holder="a", lease=lease)
    b = Leadership(connect, cluster, holder="b", lease=lease)
    try:
        a.start()
        wait_for(a.is_leader_now)
        b.start()
        # a renews every lease / 3: b never leads while a's thread runs (several leases).
        first, start = a.epoch, a.deadline
        wait_for(lambda: a.deadline > start + 3 * lease, timeout=lease * 10)
        assert a.is_leader_now()
        assert not b.is_leader_now()
        assert lease_of(connect, cluster).epoch == first
        # a dies without releasing: b takes over once the lease runs out.
        a.stop(release=False)
        wait_for(b.is_leader_now, timeout=lease * 10)
        assert b.epoch is not None
        assert first is not None
        assert b.epoch > first
    finally:
        a.stop(release=False)
        b.stop()
    # b released on stop: the lease is free.
    assert lease_of(connect, cluster).holder is None


def test_the_lease_thread_steps_down_when_another_took_over(
    connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    stepped_down = threading.Event()
    a = Leadership(
        connect, cluster, holder="a", lease=0.6, on_step_down=lambda _: stepped_down.set()
    )
    try:
        a.start()
        wait_for(a.is_leader_now)
        with connect() as admin:
            admin.execute(
                "UPDATE td_leases SET epoch = epoch + 1, holder = 'b', "
                "expires_at = now() + interval '1 hour' WHERE cluster = %s",
                (cluster,),
            )
        assert stepped_down.wait(10)
        assert not a.is_leader_now()
    finally:
        a.stop(release=False)


def test_a_takeover_waits_for_a_commit_in_flight_and_the_commit_is_ordered_before_it(
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    old = make_leadership(holder="old", lease=0.3)
    assert old.try_acquire()
    fence = old.fence()
    wait_for(expired(connect, cluster))
    new = make_leadership(holder="new")
    pool = ThreadPoolExecutor(1)
    try:
        with connect() as committing:
            with committing.transaction():
                check_fence(committing, fence)  # the commit's check passed: it is under way
                takeover = pool.submit(new.try_acquire)
                # The takeover waits for the fencing lock the commit holds.
                wait_for(lambda: waiting_for_advisory_lock(connect))
                assert not takeover.done()
            # The commit is over: the takeover goes on, and the epoch rises after it.
            assert takeover.result(timeout=10)
    finally:
        pool.shutdown()
    assert new.epoch == 2
    with pytest.raises(StaleLeaderError), connect() as late, late.transaction():
        check_fence(late, fence)


def waiting_for_advisory_lock(connect: Callable[[], psycopg.Connection[Any]]) -> bool:
    with connect() as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    return row is not None and row[0] > 0


def test_a_leadership_for_a_url_bounds_its_statements_and_tells_when_it_leads(
    postgres_dsn: str, cluster: str
) -> None:
    led: list[int] = []
    leadership = Leadership.for_url(postgres_dsn, cluster, lease=3, on_lead=led.append)
    try:
        assert leadership.try_acquire()
        assert led == [1]
        assert leadership._connection is not None
        row = leadership._connection.execute("SHOW statement_timeout").fetchone()
        assert row == ("1s",)
    finally:
        leadership.stop()
    again = Leadership.for_url(postgres_dsn, cluster, on_lead=led.append)
    try:
        assert again.try_acquire()
    finally:
        again.stop()
    assert led == [1, 2]


def test_the_leader_steps_down_on_time_while_its_renewal_hangs(
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    clock = FakeClock()
    reasons: list[str] = []
    leader = make_leadership(clock=clock, lease=10, on_step_down=reasons.append)
    assert leader.try_acquire()
    with ThreadPoolExecutor(2) as pool, connect() as blocker:
        with blocker.transaction():
            # Another transaction holds the lease row: the renewal waits for it.
            blocker.execute("SELECT * FROM td_leases WHERE cluster = %s FOR UPDATE", (cluster,))
            renewal = pool.submit(leader.renew)
            wait_for(lambda: waiting_on_a_lock(connect))
            clock.advance(10)
            # The deadline passed: asking answers at once, though the renewal still hangs.
            assert pool.submit(leader.check).result(timeout=5) is False
            assert reasons == ["its lease ran out before it could be renewed"]
            with pytest.raises(NotLeadingError):
                pool.submit(leader.fence).result(timeout=5)
            assert not renewal.done()
        # The renewal got through, too late: it does not revive the lease.
        assert renewal.result(timeout=10) is False
    assert not leader.is_leader_now()


def waiting_on_a_lock(connect: Callable[[], psycopg.Connection[Any]]) -> bool:
    with connect() as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        ).fetchone()
    return row is not None and row[0] > 0


CONTENDER = """
import sys
from jobstores.postgres import Leadership
leadership = Leadership.for_url(sys.argv[1], "default", holder=sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
print(leadership.try_acquire(), leadership.epoch, flush=True)
sys.stdin.read()
"""


def test_two_processes_started_at_the_same_instant_on_an_empty_database_one_leads(
    postgres_databases: Any,
) -> None:
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(3):
        database = postgres_databases.create()
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", CONTENDER, database, f"p{i}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(2)
        ]
        try:
            for process in processes:
                assert process.stdout is not None
                assert process.stdout.readline() == "ready\n"
            for process in processes:  # go: both at once, each on a connection of its own
                assert process.stdin is not None
                process.stdin.write("go\n")
                process.stdin.flush()
            answers = []
            for process in processes:
                assert process.stdout is not None
                answers.append(process.stdout.readline().split())
        finally:
            for process in processes:
                process.kill()
                process.wait(timeout=10)
                for stream in (process.stdin, process.stdout):
                    if stream is not None:
                        stream.close()
        assert sorted(answers) == [["False", "None"], ["True", "1"]], answers


def test_the_lease_thread_steps_down_within_a_lease_when_the_database_is_unreachable(
    connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    lease = 1.5
    reachable = [True]
    unreachable = connector("postgresql://postgres@127.0.0.1:1/postgres", timeout=0.5)
    stepped_down = threading.Event()

    def switching() -> psycopg.Connection[Any]:
        return connect() if reachable[0] else unreachable()

    leader = Leadership(switching, cluster, lease=lease, on_step_down=lambda _: stepped_down.set())
    try:
        leader.start()
        wait_for(leader.is_leader_now)
        # The database goes away: the lease's connection is killed and cannot be made again.
        reachable[0] = False
        assert leader._connection is not None
        with connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (leader._connection.info.backend_pid,))
        cut, deadline = time.monotonic(), leader.deadline
        # It stops leading by its own deadline, which no renewal moves any more: at most one
        # lease after the last renewal, so within one lease of the cut.
        assert deadline <= cut + lease
        assert stepped_down.wait(lease * 4)
        assert not leader.is_leader_now()
        assert leader.last_error is not None
    finally:
        leader.stop(release=False)
