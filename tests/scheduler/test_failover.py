"""Leader and standby in one process, over a real PostgreSQL (a fresh database per test): the
lease gates every run, and losing it makes the dispatcher a standby at once."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from apscheduler.schedulers.base import STATE_PAUSED
from helpers import Recorder, at
from postgres_support import Databases, postgres_databases, url_of

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
    dispatcher = TaskDispatcher(
        tmp_path,
        task_manager_factory=recorder,
        timezone="Asia/Shanghai",
        store=f"{url_of(dsn)}?lease=1",
    )
    task_id = await dispatcher.add_task(**TASK)
    await dispatcher.start()
    try:
        assert dispatcher.role == "leader"
        assert dispatcher.standing is not None
        assert dispatcher.standing.describe()["epoch"] == 1
        with psycopg.connect(dsn, autocommit=True) as admin:  # another instance took over
            admin.execute(
                "UPDATE td_leases SET holder = 'other', epoch = epoch + 1, "
                "expires_at = now() + interval '1 minute'"
            )
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
