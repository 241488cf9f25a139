"""The run backend contract (tests/run_backend_contract.py) over the Celery backend: real
Redis, a real worker process."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_support import PROBE, StartWorker
from run_backend_contract import (
    Harness,
    test_a_run_enters_the_core_when_it_opens_and_when_it_ends,
    test_a_run_in_flight_at_a_restart_is_recovered_and_its_outcome_applied_once,
    test_an_outcome_after_the_run_was_declared_lost_is_dropped,
    test_an_outcome_is_applied_once_and_a_duplicate_changes_nothing,
    test_finished_before_started_ends_finished,
)

from scheduler.fleet.backend import CeleryRunBackend

__all__ = [
    "test_a_run_enters_the_core_when_it_opens_and_when_it_ends",
    "test_a_run_in_flight_at_a_restart_is_recovered_and_its_outcome_applied_once",
    "test_an_outcome_after_the_run_was_declared_lost_is_dropped",
    "test_an_outcome_is_applied_once_and_a_duplicate_changes_nothing",
    "test_finished_before_started_ends_finished",
]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def harness(start_worker: StartWorker, broker_url: str, tmp_path: Path) -> Harness:
    start_worker("w1", "linux", factory=PROBE)
    return Harness(
        "celery", lambda: CeleryRunBackend(broker_url, lost_after=3.0), tmp_path / "probe.jsonl"
    )
