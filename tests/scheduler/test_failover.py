"""Leader and standby in one process, over a real PostgreSQL (a fresh database per test): the
lease gates every run, and losing it makes the dispatcher a standby at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from apscheduler.schedulers.base import STATE_PAUSED
from fleet_support import eventually, wait_until
from helpers import Recorder, at
from postgres_support import Databases, postgres_databases, url_of
from stub_backend import StubRunBackend

from jobstores.postgres import PostgresStorage
from scheduler import NotLeaderError, TaskDispatcher

__all__ = ["postgres_databases"]  # a fixture of every test here

TASK: dict[str, Any] = {
    "sys_type": "mac_intel",
    "task_type": "xhs_type",
    "xhs_account_id": "account_1",
    "interval": 3600,
    "valid_time_range": [8, 22],
}


class LeaseClock:
    """The lease's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leader_on(dsn: str, directory: Path, recorder: Recorder) -> TaskDispatcher:
    """A dispatcher on the database ``dsn`` with a 1-second lease, running ``recorder``'s
    managers."""
    return TaskDispatcher(
        directory,
        task_manager_factory=recorder,
        timezone="Asia/Shanghai",
        store=f"{url_of(dsn)}?lease=1",
    )


def take_over(dsn: str) -> None:
    """Another instance takes the lease of the database ``dsn``: a newer epoch, for a minute."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "UPDATE td_leases SET holder = 'other', epoch = epoch + 1, "
            "expires_at = now() + interval '1 minute'"
        )


async def test_a_leader_whose_lease_ran_out_starts_no_run(
    clock: Any, recorder: Recorder, tmp_path: Path, postgres_databases: Databases
) -> None:
    lease_clock = LeaseClock()
    store = PostgresStorage.for_url(
        url_of(postgres_databases.create()), lease=30, clock=lease_clock
    )
    reasons: list[str] = []
    store.leadership.on_step_down = reasons.append  # the dispatcher keeps a callback there
    dispatcher = TaskDispatcher(
        tmp_path, task_manager_factory=recorder, timezone="Asia/Shanghai", store=store
    )
    task_id = await dispatcher.add_task(**TASK)
    await dispatcher.start()
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        await dispatcher.run_pending()
        assert recorder.count(task_id) == 1
        assert dispatcher.role == "leader"
        lease_clock.now += 31  # its own deadline passed: it leads no more, at this instant
        assert dispatcher.role == "standby"
        clock.move_to(at(2026, 1, 8, 9, 0))
        await dispatcher.run_pending()
        assert recorder.count(task_id) == 1  # the run due at 9:00 did not start
        assert reasons == ["its lease ran out before it could be renewed"]
        with pytest.raises(NotLeaderError, match="does not lead"):
            dispatcher.pause_task(task_id)
    finally:
        await dispatcher.stop()


async def test_a_leader_taken_over_stands_by_at_once_and_logs_one_error(
    recorder: Recorder,
    tmp_path: Path,
    postgres_databases: Databases,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = postgres_databases.create()
    dispatcher = leader_on(dsn, tmp_path, recorder)
    task_id = await dispatcher.add_task(**TASK)
    await dispatcher.start()
    try:
        assert dispatcher.role == "leader"
        assert dispatcher.standing is not None
        assert dispatcher.standing.describe()["epoch"] == 1
        take_over(dsn)  # another instance took over
        caplog.clear()
        await asyncio.wait_for(dispatcher.standing.stepped_down.wait(), 10)
        assert dispatcher.role == "standby"
        assert dispatcher.scheduler.state == STATE_PAUSED  # it plans nothing more
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert "newer epoch" in errors[0].getMessage()
        with pytest.raises(NotLeaderError, match="does not lead"):
            dispatcher.pause_task(task_id)
        with pytest.raises(NotLeaderError):
            await dispatcher.add_task(**TASK)
    finally:
        await dispatcher.stop()


async def test_a_leader_taken_over_cuts_off_its_local_runs_in_progress_at_once(
    clock: Any,
    recorder: Recorder,
    tmp_path: Path,
    postgres_databases: Databases,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = postgres_databases.create()
    dispatcher = leader_on(dsn, tmp_path, recorder)
    task_id = await dispatcher.add_task(**TASK)
    recorder.gates[task_id] = asyncio.Event()  # the run goes on until it is cut off
    recorder.started[task_id] = asyncio.Event()
    await dispatcher.start()
    pending = None
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        pending = asyncio.create_task(dispatcher.run_pending())
        await asyncio.wait_for(recorder.started[task_id].wait(), 10)
        assert dispatcher.standing is not None
        take_over(dsn)  # another instance took over
        await asyncio.wait_for(dispatcher.standing.stepped_down.wait(), 10)
        # Cut off at once, not left to run beside what the new leader starts.
        await asyncio.wait_for(pending, 10)
        assert recorder.active["account_1"] == 0
        assert not recorder.gates[task_id].is_set()
        assert any("1 local run(s) cut off" in r.getMessage() for r in caplog.records)
    finally:
        recorder.gates[task_id].set()
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        await dispatcher.stop(grace_period=0)


async def test_health_reports_the_role_epoch_and_leader(
    recorder: Recorder, tmp_path: Path, postgres_databases: Databases
) -> None:
    from httpx import ASGITransport, AsyncClient

    store = PostgresStorage.for_url(
        url_of(postgres_databases.create()), advertise_url="http://leader.example:8080"
    )
    dispatcher = TaskDispatcher(tmp_path, task_manager_factory=recorder, store=store)
    await dispatcher.start()
    try:
        app = dispatcher.control_app(token="t")
        async with AsyncClient(transport=ASGITransport(app), base_url="http://127.0.0.1") as api:
            health = (await api.get("/api/v1/health", headers={"Authorization": "Bearer t"})).json()
        assert health["role"] == "leader"
        assert health["epoch"] == store.leadership.epoch == 1
        assert health["leader"] == {
            "id": store.leadership.holder,
            "url": "http://leader.example:8080",
        }
    finally:
        await dispatcher.stop()


@pytest.mark.parametrize("retries", [0, 1])
async def test_a_run_in_progress_in_a_leader_taken_over_is_lost_and_retried_only_by_policy(
    clock: Any, tmp_path: Path, postgres_databases: Databases, retries: int
) -> None:
    url = f"{url_of(postgres_databases.create())}?lease=30"
    old_recorder, new_recorder = Recorder(), Recorder()
    old_store = PostgresStorage.for_url(url, clock=LeaseClock())
    old = TaskDispatcher(
        tmp_path / "old",
        task_manager_factory=old_recorder,
        timezone="Asia/Shanghai",
        store=old_store,
    )
    task_id = await old.add_task(**TASK, run_policy={"retries": retries, "retry_delay": 60})
    old_recorder.gates[task_id] = asyncio.Event()
    old_recorder.started[task_id] = asyncio.Event()
    await old.start()
    new: TaskDispatcher | None = None
    pending = None
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        pending = asyncio.create_task(old.run_pending())
        await asyncio.wait_for(old_recorder.started[task_id].wait(), 10)

        def running_in_the_store() -> bool:
            stored = PostgresStorage.for_url(url).read()
            return any(r.task_id == task_id and r.active_run for r in stored.records)

        for _ in range(200):  # the run's start is committed (in the background)
            if await asyncio.to_thread(running_in_the_store):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the run's start was never committed")
        # The old leader stops renewing (frozen, killed: its lease runs out by the database's
        # clock) and another instance takes over while the run is in progress there.
        with psycopg.connect(url.split("?")[0], autocommit=True) as admin:
            admin.execute("UPDATE td_leases SET expires_at = now()")
        new = TaskDispatcher(
            tmp_path / "new",
            task_manager_factory=new_recorder,
            timezone="Asia/Shanghai",
            store=PostgresStorage.for_url(url, clock=LeaseClock()),
        )
        record = new.get_task(task_id)
        assert record.active_run is None
        # It counts as a run; as a failed one unless a retry follows (the last attempt's
        # failure counts).
        assert (record.run_count, record.failure_count) == (1, 1 - retries)
        assert [entry.outcome for entry in new.runs(task_id)] == ["lost"]
        assert "RunLostError" in (new.runs(task_id)[0].error or "")
        assert (record.retry is not None) == bool(retries)
        await new.start()
        await new.run_pending()  # 8:00: the lost run is not run again
        assert new_recorder.count(task_id) == 0
        clock.move_to(at(2026, 1, 8, 8, 2))
        await new.run_pending()  # its retry, if its policy has one
        assert new_recorder.count(task_id) == retries
    finally:
        old_recorder.gates[task_id].set()
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        await old.stop(grace_period=0)
        if new is not None:
            await new.stop()


def test_a_leader_frozen_inside_a_commit_does_not_keep_a_standby_out(
    postgres_databases: Databases,
) -> None:
    """A leader frozen in the middle of a commit holds the fencing lock every takeover waits
    for: its session must end on its own (idle in a transaction), or it keeps the cluster
    leaderless for as long as it is frozen."""
    from jobstores.postgres.lease import check_fence

    url = url_of(postgres_databases.create())
    old = PostgresStorage.for_url(url, lease=1.5)
    old.acquire()
    frozen = old.state._conn()  # the connection its commits use
    frozen.execute("BEGIN")  # a commit begun: the fencing lock taken, then nothing more
    check_fence(frozen, old.leadership.fence())
    old.leadership.stop(release=False)  # and no renewal: the process is frozen
    new = PostgresStorage.for_url(url, lease=1.5)
    try:
        wait_until(new.leadership.try_acquire, 15, "a standby to take the lease over")
        assert new.leadership.epoch == 2
    finally:
        new.release()
        with contextlib.suppress(psycopg.Error):
            frozen.close()
        old.state.close()


async def test_a_dispatcher_taken_over_campaigns_and_leads_again_with_the_state_reloaded(
    recorder: Recorder,
    tmp_path: Path,
    postgres_databases: Databases,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = postgres_databases.create()
    reasons: list[str] = []
    store = PostgresStorage.for_url(f"{url_of(dsn)}?lease=1")
    store.leadership.on_step_down = reasons.append  # the host's callback: kept on every lease
    dispatcher = TaskDispatcher(
        tmp_path, task_manager_factory=recorder, timezone="Asia/Shanghai", store=store
    )
    seen: list[str] = []
    dispatcher.observe_runs(lambda request, event: seen.append(request.task_id))
    task_id = await dispatcher.add_task(**TASK)
    await dispatcher.start()
    try:
        standing = dispatcher.standing
        assert standing is not None
        assert standing.describe()["epoch"] == 1
        take_over(dsn)  # another instance takes over
        caplog.clear()
        await asyncio.wait_for(standing.stepped_down.wait(), 10)
        assert dispatcher.role == "standby"
        with pytest.raises(NotLeaderError):
            dispatcher.pause_task(task_id)
        # The other leader pauses the task, then its lease ends (released).
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                "UPDATE td_tasks SET record = jsonb_set(record, '{status}', '\"paused\"')"
            )
            admin.execute("UPDATE td_leases SET holder = NULL, expires_at = now()")
        # This dispatcher takes the lease again: a new epoch, the state as the other left it.
        await eventually(lambda: dispatcher.role == "leader", 10, "leading again")
        again = dispatcher.standing
        assert again is not None
        assert again is not standing
        assert again.describe()["epoch"] == 3
        assert dispatcher.running
        assert dispatcher.get_task(task_id).status == "paused"
        # Runs start again (a manual one, the task being paused), and the host's run
        # observer is told of them.
        dispatcher.run_now(task_id)
        await eventually(lambda: len(seen) >= 2, 10, "the run's two events")
        assert seen[:2] == [task_id, task_id]
        assert recorder.count(task_id) == 1
        dispatcher.resume_task(task_id)  # changes are taken, and saved, again
        assert dispatcher.save_health.ok
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors  # the step-down, once
        assert len(reasons) == 1
        assert "newer epoch" in reasons[0]
        # Taken over again: it steps down again, and the host hears of it again.
        take_over(dsn)
        await asyncio.wait_for(again.stepped_down.wait(), 10)
        assert dispatcher.role == "standby"
        assert len(reasons) == 2
    finally:
        await dispatcher.stop()
    stored = PostgresStorage.for_url(url_of(dsn)).read()
    assert [r.status for r in stored.records] == ["pending"]


async def test_a_dispatcher_on_a_fleets_backend_taken_over_does_not_campaign(
    recorder: Recorder, tmp_path: Path, postgres_databases: Databases
) -> None:
    # A fleet's backend serves one leader only: a new dispatcher (with a new one) must lead.
    dsn = postgres_databases.create()
    dispatcher = TaskDispatcher(
        tmp_path,
        timezone="Asia/Shanghai",
        store=f"{url_of(dsn)}?lease=1",
        run_backend=StubRunBackend(),
    )
    await dispatcher.start()
    try:
        standing = dispatcher.standing
        assert standing is not None
        take_over(dsn)
        await asyncio.wait_for(standing.stepped_down.wait(), 10)
        assert not dispatcher._campaign.active
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("UPDATE td_leases SET holder = NULL, expires_at = now()")
        assert dispatcher.role == "standby"
    finally:
        await dispatcher.stop()


async def test_lead_again_false_keeps_a_dispatcher_taken_over_standing_by(
    recorder: Recorder, tmp_path: Path, postgres_databases: Databases
) -> None:
    dsn = postgres_databases.create()
    dispatcher = leader_on(dsn, tmp_path, recorder)
    dispatcher.lead_again = False
    await dispatcher.start()
    try:
        standing = dispatcher.standing
        assert standing is not None
        take_over(dsn)
        await asyncio.wait_for(standing.stepped_down.wait(), 10)
        assert not dispatcher._campaign.active
    finally:
        await dispatcher.stop()
