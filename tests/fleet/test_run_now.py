"""Run now on the fleet: the manual run goes to a worker of the task's sys_type, like any run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fleet_probe import read_probe
from fleet_support import StartWorker, eventually

from scheduler import CeleryRunBackend, TaskDispatcher

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def dispatcher(broker_url: str, tmp_path: Path) -> AsyncIterator[TaskDispatcher]:
    backend = CeleryRunBackend(broker_url, lost_after=3.0)
    made = TaskDispatcher(tmp_path / "ops", run_backend=backend, timezone="UTC")
    yield made
    await made.stop(grace_period=0)


async def test_a_manual_run_goes_to_its_sys_type_and_keeps_the_grid(
    start_worker: StartWorker, dispatcher: TaskDispatcher, tmp_path: Path
) -> None:
    start_worker("linux-1", "linux")
    start_worker("mac-1", "mac_intel")
    probe = tmp_path / "probe.jsonl"
    hour = datetime.now(UTC).hour
    closed = [(hour + 2) % 24, (hour + 4) % 24]
    async with dispatcher:
        task_id = await dispatcher.add_task(
            sys_type="mac_intel",
            task_type="probe",
            interval=3600,
            valid_time_range=closed,
            account_id="a",
            probe_log=str(probe),
            seconds=0.0,
        )
        planned = dispatcher.get_task(task_id).next_execution_time
        dispatcher.run_now(task_id)
        await eventually(
            lambda: dispatcher.get_task(task_id).run_count == 1, 30, "the manual run's outcome"
        )
        record = dispatcher.get_task(task_id)
        assert record.last_worker == "mac-1"
        assert record.next_execution_time == planned
        assert record.last_execution_time is None
        assert record.run_requested is None
        assert dispatcher.history is not None
        dispatcher.history.flush()
        (entry,) = dispatcher.runs(task_id)
        assert (entry.trigger, entry.outcome, entry.worker) == ("manual", "succeeded", "mac-1")
    assert [line["worker"] for line in read_probe(probe)] == ["mac-1", "mac-1"]
