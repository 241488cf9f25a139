"""What the log says when runs wait for their lanes: normal, so no warning."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from scheduler import TaskDispatcher

pytestmark = pytest.mark.timeout(60)

SKIPPED = "maximum number of running instances reached"


class Held:
    """An async manager that runs until the test lets it go."""

    release: asyncio.Event

    def __init__(self, **kwargs: Any) -> None:
        pass

    async def run(self) -> None:
        await Held.release.wait()


async def test_a_run_waiting_its_lane_is_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Held.release = asyncio.Event()
    caplog.set_level(logging.DEBUG, logger="apscheduler")
    dispatcher = TaskDispatcher(tmp_path / "ops", task_manager_factory=Held, timezone="UTC")
    await dispatcher.add_task(sys_type="linux", task_type="held", account_id="a", interval=1)
    await dispatcher.start()
    try:
        deadline = time.monotonic() + 20
        # The run goes on past its next due time: APScheduler skips that one.
        while not any(SKIPPED in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the task never came due while running"
            await asyncio.sleep(0.05)
    finally:
        Held.release.set()
        await dispatcher.stop()
    skipped = [r for r in caplog.records if SKIPPED in r.getMessage()]
    assert {r.levelno for r in skipped} == {logging.DEBUG}
    # The host's own settings for APScheduler's loggers still apply (a child logger).
    assert skipped[0].name.startswith("apscheduler.scheduler")
