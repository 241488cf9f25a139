"""Regression: a background save racing APScheduler's own job calls must not deadlock.

APScheduler's ``pause_job``/``resume_job``/``modify_job``/``remove_job`` hold the job store
lock (the task table's lock) while they call back into the store. If those callbacks wrote to
disk, a background save holding the write lock and waiting for the table lock would wait for
them forever. They only request a save; this test holds a save in the middle of its write
while APScheduler pauses a job from another thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import read_state

import jobstores.durable
import jobstores.snapshot_write
import jobstores.storage
from scheduler import TaskDispatcher


@pytest.mark.parametrize("call", ["pause_job", "resume_job", "modify_job", "remove_job"])
async def test_a_save_in_progress_and_a_scheduler_job_call_both_finish(
    make_dispatcher: Callable[..., TaskDispatcher],
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
) -> None:
    dispatcher = make_dispatcher()
    await dispatcher.start()
    task_id = await dispatcher.add_task(
        sys_type="s", task_type="t", account_id="a", interval=3600, valid_time_range=[0, 24]
    )
    writing, release = threading.Event(), threading.Event()
    real_write = jobstores.durable.write_atomic

    def slow_write(*args: Any, **kwargs: Any) -> None:
        writing.set()
        release.wait(10)  # held mid-write until the job call below has returned
        real_write(*args, **kwargs)

    monkeypatch.setattr(jobstores.storage, "write_atomic", slow_write)
    monkeypatch.setattr(jobstores.snapshot_write, "write_atomic", slow_write)
    store = dispatcher._store
    store.table.touch()
    store.request_save()  # a background save, now stuck in its write
    assert await asyncio.to_thread(writing.wait, 5)

    scheduler = dispatcher.scheduler
    arguments: dict[str, Any] = {"next_run_time": None} if call == "modify_job" else {}
    job_call = asyncio.to_thread(getattr(scheduler, call), task_id, **arguments)
    await asyncio.wait_for(job_call, 5)  # returns while the save is still writing
    release.set()
    await asyncio.wait_for(store.saver.drain(), 5)
    await asyncio.wait_for(dispatcher.stop(), 10)
    expected = {"pause_job": "paused", "modify_job": "paused", "remove_job": "completed"}
    assert read_state(state_dir)["tasks"][0]["status"] == expected.get(call, "pending")
