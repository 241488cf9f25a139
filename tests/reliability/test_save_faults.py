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

from scheduler import SaveFailedError, TaskDispatcher
from scheduler.listeners import DispatcherEvent, TaskAdded, TaskPaused, TaskRemoved, TaskResumed
from tasks.schedule import utc_now
from tasks.zones import resolve_timezone

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
    real_write = os.write
    faults = {"count": 0}

    def full_disk(fd: int, data: Any) -> int:
        faults["count"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)  # the journal's appends and any snapshot
    with caplog.at_level(logging.ERROR):
        for hour in (8, 9, 10):
            clock.move_to(at(2026, 1, 8, hour, 0))
            await dispatcher.run_pending()
        with pytest.raises(SaveFailedError, match=task_id):  # in effect, but not durable
            dispatcher.pause_task(task_id)
    assert dispatcher.get_task(task_id).status == "paused"
    assert recorder.count(task_id) == 3
    assert (state_dir / "dispatch_config.json").read_bytes() == before
    health = dispatcher.save_health
    assert not health.ok
    assert "No space left" in (health.last_error or "")
    assert health.unsaved_task_ids == (task_id,)
    failures = [r for r in caplog.records if "saving" in r.getMessage()]
    assert len(failures) == faults["count"]
    assert all(task_id in r.getMessage() for r in failures)

    monkeypatch.setattr(os, "write", real_write)
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
    real_write = os.write
    calls = {"n": 0}

    def fail_once(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fail_once)
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
    await store.saver.drain()
    assert dispatcher.save_health.ok
    assert read_state(state_dir)["tasks"][0]["run_count"] == 7
    dispatcher.close()


def _fail_writes(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make every save fail (disk full) until the returned function is called."""
    real_write = os.write

    def full_disk(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def restore() -> None:
        monkeypatch.setattr(os, "write", real_write)

    monkeypatch.setattr(os, "write", full_disk)
    return restore


def _new(task_id: str, account: str = "a") -> dict[str, Any]:
    return {
        "sys_type": "s",
        "task_type": "t",
        "account_id": account,
        "interval": 60,
        "task_id": task_id,
    }


async def _change(dispatcher: TaskDispatcher, call: str) -> None:
    if call == "add_task":
        await dispatcher.add_task(**_new("new"))
    elif call == "add_tasks":
        await dispatcher.add_tasks([_new("new"), _new("new2", "b")])
    elif call == "reorder":
        dispatcher.reorder_task("second", 0)
    elif call == "update":
        dispatcher.update_task("third", valid_time_range=(0, 24))
    else:
        getattr(dispatcher, f"{call}_task")("second" if call == "resume" else "first")


# What each call changed, and how that shows in the saved file.
CHANGES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], bool]]] = {
    "add_task": (("new",), lambda f: "new" in {t["task_id"] for t in f["tasks"]}),
    "add_tasks": (
        ("new", "new2"),
        lambda f: {"new", "new2"} <= {t["task_id"] for t in f["tasks"]},
    ),
    "pause": (("first",), lambda f: f["tasks"][0]["status"] == "paused"),
    "resume": (("second",), lambda f: f["tasks"][1]["status"] == "pending"),
    "remove": (("first",), lambda f: "first" not in {t["task_id"] for t in f["tasks"]}),
    "reorder": (("second",), lambda f: f["account_tasks"]["a"] == ["second", "first"]),
}


@pytest.mark.parametrize("call", list(CHANGES))
async def test_a_change_that_could_not_be_saved_raises_stays_applied_and_is_retried(
    make_dispatcher: MakeDispatcher, state_dir: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    import jobstores.saver

    monkeypatch.setattr(jobstores.saver, "RETRY_FIRST", 0.0)
    dispatcher = make_dispatcher()
    await dispatcher.add_tasks([_new("first"), _new("second")])
    dispatcher.pause_task("second")
    await dispatcher.start()
    before = (state_dir / "dispatch_config.json").read_bytes()
    ids, shows = CHANGES[call]
    restore = _fail_writes(monkeypatch)
    with pytest.raises(SaveFailedError) as raised:
        await _change(dispatcher, call)
    assert isinstance(raised.value, OSError)
    assert raised.value.task_ids == ids
    assert "No space left" in raised.value.cause
    assert all(task_id in str(raised.value) for task_id in ids)
    assert (state_dir / "dispatch_config.json").read_bytes() == before
    # In effect in memory, as the file will say ...
    in_memory = {
        "tasks": [r.to_json_dict() for r in dispatcher.list_tasks()],
        "account_tasks": dispatcher.account_tasks,
    }
    assert shows(in_memory)
    # ... once writes work again, with no further call: the background retry saves it.
    restore()

    async def saved() -> None:
        # save_health offers nothing to await; the wait is bounded below.
        while not dispatcher.save_health.ok:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(saved(), 10)
    assert shows(read_state(state_dir))
    await dispatcher.stop()


def _closed_now() -> tuple[int, int]:
    """An hour window of the tests' zone that is closed at this moment."""
    hour = utc_now().astimezone(resolve_timezone("Asia/Shanghai")).hour
    return (hour + 1, 24) if hour < 23 else (0, 23)


# What each call announces, and the task it makes due now (None: none).
ANNOUNCED: dict[str, tuple[list[tuple[type[DispatcherEvent], str]], str | None]] = {
    "add_task": ([(TaskAdded, "new")], "new"),
    "add_tasks": ([(TaskAdded, "new"), (TaskAdded, "new2")], "new2"),
    "pause": ([(TaskPaused, "first")], None),
    "resume": ([(TaskResumed, "second")], "second"),
    "update": ([], "third"),  # the window opens now
    "remove": ([(TaskRemoved, "first")], None),
    "reorder": ([], None),
}


@pytest.mark.parametrize("call", list(ANNOUNCED))
async def test_a_change_whose_save_failed_is_scheduled_and_announced_like_any_other(
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
) -> None:
    # Real time: the scheduler sleeps until its next planned run (a minute away) unless a
    # change wakes it, so a due task that runs within seconds was scheduled by the change.
    dispatcher = make_dispatcher()
    third = {**_new("third", "c"), "valid_time_range": _closed_now()}
    await dispatcher.add_tasks([_new("first"), _new("second"), third])
    dispatcher.pause_task("second")
    events: list[DispatcherEvent] = []
    dispatcher.add_listener(events.append, [TaskAdded, TaskPaused, TaskRemoved, TaskResumed])
    await dispatcher.start()

    async def ran(task_id: str) -> None:
        while not recorder.count(task_id):  # noqa: ASYNC110 - the wait is bounded below
            await asyncio.sleep(0.01)

    await asyncio.wait_for(ran("first"), 10)  # its first run is out of the way
    expected, due = ANNOUNCED[call]
    restore = _fail_writes(monkeypatch)
    try:
        with pytest.raises(SaveFailedError):
            await _change(dispatcher, call)
        assert [(type(e), e.task_id) for e in events] == expected
        if due is not None:  # runs although saving still fails
            await asyncio.wait_for(ran(due), 10)
    finally:
        restore()
    await dispatcher.stop()
