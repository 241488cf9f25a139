"""A dispatcher whose saves fail keeps scheduling, reports it, and catches up when saves work."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Recorder, at, read_state

from scheduler import TaskDispatcher

MakeDispatcher = Callable[..., TaskDispatcher]


async def test_runs_go_on_while_saves_fail_and_the_next_save_catches_up(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = make_dispatcher()
    task_id = await dispatcher.add_task(sys_type="s", task_type="t", account_id="a", interval=3600)
    await dispatcher.start()
    before = (state_dir / "dispatch_config.json").read_bytes()
    real_replace = os.replace
    faults = {"count": 0}

    def full_disk(src: Any, dst: Any) -> None:
        faults["count"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    with caplog.at_level(logging.ERROR):
        for hour in (8, 9, 10):
            clock.move_to(at(2026, 1, 8, hour, 0))
            await dispatcher.run_pending()
        dispatcher.pause_task(task_id)  # acknowledged in memory; the save failed and says so
    assert recorder.count(task_id) == 3
    assert (state_dir / "dispatch_config.json").read_bytes() == before
    health = dispatcher.save_health
    assert not health.ok
    assert "No space left" in (health.last_error or "")
    assert health.unsaved_task_ids == (task_id,)
    failures = [r for r in caplog.records if "saving" in r.getMessage()]
    assert len(failures) == faults["count"]
    assert all(task_id in r.getMessage() for r in failures)

    monkeypatch.setattr(os, "replace", real_replace)
    dispatcher.resume_task(task_id)
    saved = read_state(state_dir)["tasks"][0]
    assert saved["run_count"] == 3
    assert saved["status"] == "pending"
    assert dispatcher.save_health.ok
    assert dispatcher.save_health.unsaved_task_ids == ()
    await dispatcher.stop()


async def test_a_failed_background_save_is_retried_without_a_new_change(
    make_dispatcher: MakeDispatcher, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobstores.saver

    monkeypatch.setattr(jobstores.saver, "RETRY_FIRST", 0.0)  # retry on the next loop turn
    dispatcher = make_dispatcher()
    task_id = await dispatcher.add_task(sys_type="s", task_type="t", account_id="a", interval=60)
    store = dispatcher._store
    real_replace = os.replace
    calls = {"n": 0}

    def fail_once(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_once)
    retried = asyncio.Event()
    saver = store._saver
    request_save = saver.request

    def noting_request_save() -> None:
        retried.set()
        request_save()

    store.update_task(task_id, lambda r: r.replace(run_count=7))
    assert not await store.save_async()  # the failed write schedules a retry
    assert not dispatcher.save_health.ok
    monkeypatch.setattr(saver, "request", noting_request_save)
    await asyncio.wait_for(retried.wait(), 5)  # no new change: only the retry asks to save
    await store.drain_saves()
    assert dispatcher.save_health.ok
    assert read_state(state_dir)["tasks"][0]["run_count"] == 7
    dispatcher.close()
