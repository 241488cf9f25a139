"""The fleet's log lines say what happened, once: a dispatcher on real workers and Redis."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fleet_support import StartWorker, eventually, free_port

from scheduler import CeleryRunBackend, TaskDispatcher
from tasks import TaskStatus

pytestmark = pytest.mark.timeout(90)


def errors_about(caplog: pytest.LogCaptureFixture, task_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and task_id in r.getMessage()
    ]


async def test_a_run_never_sent_has_no_duration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    backend = CeleryRunBackend(f"redis://127.0.0.1:{free_port()}/0", lost_after=2.0)
    async with TaskDispatcher(tmp_path / "ops", run_backend=backend, timezone="UTC") as d:
        task_id = await d.add_task(
            sys_type="linux", task_type="probe", account_id="a", interval=3600
        )
        await eventually(lambda: d.get_task(task_id).run_count >= 1, 30, "the failed run")
    # One of many while the broker is down: said at INFO (the outage is the one ERROR),
    # without a duration, since it never ran.
    assert errors_about(caplog, task_id) == []
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO
        and task_id in r.getMessage()
        and " not sent: " in r.getMessage()
    ]
    assert f"of task {task_id} (account " in line
    assert " after " not in line
    assert "finished in" not in line


async def test_lost_expired_and_stop_are_said_once_and_rightly(
    start_worker: StartWorker, broker_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    worker = start_worker("busy", "linux", concurrency=1)
    backend = CeleryRunBackend(broker_url, lost_after=2.0, start_timeout=3.0)
    probe = str(tmp_path / "probe.jsonl")
    dispatcher = TaskDispatcher(tmp_path / "ops", run_backend=backend, timezone="UTC")
    await dispatcher.start()
    try:
        common: dict[str, Any] = {
            "sys_type": "linux",
            "task_type": "probe",
            "interval": 3600,
            "probe_log": probe,
        }
        holder = await dispatcher.add_task(account_id="a", seconds=60, **common)
        await eventually(
            lambda: dispatcher.get_task(holder).status is TaskStatus.RUNNING, 20, "the long run"
        )
        # Another account's run waits behind the busy worker past its start_timeout.
        waiting = await dispatcher.add_task(account_id="b", **common)
        await eventually(lambda: dispatcher.get_task(waiting).run_count >= 1, 20, "expiry")
        expired = dispatcher.get_task(waiting).last_error
        assert expired is not None
        assert "its worker(s) of sys_type 'linux' (busy) were busy" in expired
        assert "no worker for" not in expired
        worker.kill()
        await eventually(lambda: dispatcher.get_task(holder).run_count >= 1, 20, "the loss")
        again = await dispatcher.add_task(account_id="c", seconds=60, **common)
        start_worker("fresh", "linux")
        await eventually(
            lambda: dispatcher.get_task(again).status is TaskStatus.RUNNING, 20, "a new run"
        )
    finally:
        await dispatcher.stop(grace_period=0.5)
    assert len(errors_about(caplog, holder)) == 1, errors_about(caplog, holder)
    assert len(errors_about(caplog, waiting)) == 1, errors_about(caplog, waiting)
    said = [r.getMessage() for r in caplog.records]
    assert not any("were cancelled" in m for m in said), said
    assert any("1 run(s) still executing on workers" in m for m in said)
