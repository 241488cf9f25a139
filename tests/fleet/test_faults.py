"""The fleet under faults: restarts, lost messages, lost replies, pauses, a second dispatcher.

Real Redis (a server of the test's own where it is killed or proxied), real worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fleet_probe import read_probe
from fleet_support import StartWorker, eventually

from scheduler import CeleryRunBackend, TaskDispatcher
from tasks import TaskStatus

pytestmark = pytest.mark.timeout(90)

Make = Callable[..., TaskDispatcher]


@pytest.fixture
async def make(broker_url: str, tmp_path: Path) -> AsyncIterator[Make]:
    """Build dispatchers on the test's broker (stopped at the end)."""
    made: list[TaskDispatcher] = []

    def build(directory: Path | None = None, **options: Any) -> TaskDispatcher:
        backend = CeleryRunBackend(
            options.pop("broker_url", broker_url),
            lost_after=options.pop("lost_after", 3.0),
            start_timeout=options.pop("start_timeout", None),
            poll_interval=options.pop("poll_interval", None),
            **{k: options.pop(k) for k in ("resend_after",) if k in options},
        )
        dispatcher = TaskDispatcher(
            directory or tmp_path / "ops", run_backend=backend, timezone="UTC", **options
        )
        made.append(dispatcher)
        return dispatcher

    yield build
    for dispatcher in made:
        await dispatcher.stop(grace_period=0)


def probe_task(
    probe: Path, account: str, *, sys_type: str = "linux", seconds: float = 0.0, **extra: Any
) -> dict[str, Any]:
    return {
        "sys_type": sys_type,
        "task_type": "probe",
        "interval": 3600,
        "account_id": account,
        "probe_log": str(probe),
        "seconds": seconds,
        **extra,
    }


def finished(dispatcher: TaskDispatcher, *task_ids: str) -> bool:
    return all(dispatcher.get_task(t).run_count >= 1 for t in task_ids)


def spans(probe: Path) -> dict[str, tuple[float, float | None]]:
    """Task id -> (start, end) from the workers' own lines."""
    found: dict[str, tuple[float, float | None]] = {}
    for line in read_probe(probe):
        if line["phase"] == "start":
            found[line["task_id"]] = (line["at"], None)
        else:
            found[line["task_id"]] = (found[line["task_id"]][0], line["at"])
    return found


async def test_a_run_on_a_worker_holds_its_lane_across_a_dispatcher_restart(
    start_worker: StartWorker, make: Make, tmp_path: Path
) -> None:
    start_worker("w1", "linux", concurrency=2)
    probe = tmp_path / "probe.jsonl"
    first = make()
    await first.start()
    (long,) = await first.add_tasks([probe_task(probe, "a", seconds=5)])
    await eventually(lambda: first.get_task(long).status is TaskStatus.RUNNING, 20, "the run")
    await first.stop(grace_period=0)
    # The run goes on on its worker; the restarted dispatcher finds a task of the same
    # account due and earlier in its order.
    second = make()
    (urgent,) = await second.add_tasks([probe_task(probe, "a")])
    second.reorder_task(urgent, 0)
    async with second:
        await eventually(lambda: finished(second, long, urgent), 30, "both runs")
    found = spans(probe)
    end = found[long][1]
    assert end is not None
    assert found[urgent][0] >= end, "a due task started beside the recovered run"
    assert second.get_task(long).run_count == 1
