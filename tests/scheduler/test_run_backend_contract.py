"""The run backend contract (tests/run_backend_contract.py) over the local backend and the stub.

The Celery backend keeps it too: tests/fleet/test_run_backend_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from fleet_probe import factory as probe_factory
from run_backend_contract import (
    Harness,
    test_a_run_enters_the_core_when_it_opens_and_when_it_ends,
    test_a_run_in_flight_at_a_restart_is_recovered_and_its_outcome_applied_once,
    test_an_outcome_after_the_run_was_declared_lost_is_dropped,
    test_an_outcome_is_applied_once_and_a_duplicate_changes_nothing,
    test_finished_before_started_ends_finished,
)
from stub_backend import StubRunBackend, StubWorld

from scheduler import LocalRunBackend, TaskDispatcher
from tasks.errors import InvalidTaskError
from tasks.runs import RunBackend

__all__ = [
    "test_a_run_enters_the_core_when_it_opens_and_when_it_ends",
    "test_a_run_in_flight_at_a_restart_is_recovered_and_its_outcome_applied_once",
    "test_an_outcome_after_the_run_was_declared_lost_is_dropped",
    "test_an_outcome_is_applied_once_and_a_duplicate_changes_nothing",
    "test_finished_before_started_ends_finished",
]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["local", "stub"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    probe = tmp_path / "probe.jsonl"
    world = StubWorld()
    make: Callable[[], RunBackend] = (
        (lambda: LocalRunBackend(probe_factory))
        if request.param == "local"
        else (lambda: StubRunBackend(world))
    )
    return Harness(request.param, make, probe, world)


class _Preparing(StubRunBackend):
    """A backend that checks the tasks it is to run (and keeps something per task)."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[tuple[str, bool]] = []
        self.forgotten: list[str] = []

    def prepare(
        self, task_id: str, sys_type: str, kwargs: Mapping[str, Any], *, renew: bool = False
    ) -> None:
        if sys_type == "nowhere":
            raise InvalidTaskError("sys_type", "no worker runs 'nowhere'")
        self.prepared.append((task_id, renew))

    def forget(self, task_id: str) -> None:
        self.forgotten.append(task_id)


async def test_any_backend_prepares_and_forgets_tasks_through_the_protocol(
    tmp_path: Path,
) -> None:
    backend = _Preparing()
    dispatcher = TaskDispatcher(tmp_path / "ops", run_backend=backend, timezone="UTC")
    task: dict[str, Any] = {"task_type": "probe", "account_id": "a", "interval": 3600}
    task_id = await dispatcher.add_task(sys_type="linux", **task)
    with pytest.raises(InvalidTaskError, match="sys_type"):
        await dispatcher.add_task(sys_type="nowhere", **task)
    assert dispatcher.list_tasks() == [dispatcher.get_task(task_id)]
    edited = {**dispatcher.get_task(task_id).kwargs, "seconds": 1}
    dispatcher.update_task(task_id, kwargs=edited)
    dispatcher.update_task(task_id, interval=60)  # the kwargs stay: nothing to renew
    dispatcher.remove_task(task_id)
    assert backend.prepared == [(task_id, False), (task_id, True), (task_id, False)]
    assert backend.forgotten == [task_id]
