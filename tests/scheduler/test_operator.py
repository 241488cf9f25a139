"""An operator's actions through the Python API, with a frozen clock: run now, and pausing or
resuming a whole account."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from helpers import SHANGHAI, Recorder, add, at, task_in_file

from scheduler import AccountNotFoundError, SaveFailedError, TaskDispatcher
from scheduler.history import HISTORY_FILENAME, read_runs
from scheduler.listeners import DispatcherEvent, TaskPaused, TaskResumed
from tasks import TaskStatus

MakeDispatcher = Callable[..., TaskDispatcher]


async def settle(dispatcher: TaskDispatcher) -> None:
    await asyncio.wait_for(dispatcher.run_pending(), 10)


# ---------------------------------------------------------------------- run now


async def test_a_manual_run_in_a_closed_window_runs_once_and_keeps_the_grid(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)  # 07:00: the window opens at 08:00
    await dispatcher.start()
    planned = dispatcher.get_task(task_id).next_execution_time
    assert planned == at(2026, 1, 8, 8, 0)

    asked = dispatcher.run_now(task_id)
    assert asked.run_requested == at(2026, 1, 8, 7, 0)
    assert task_in_file(state_dir, task_id)["run_requested"] is not None
    await settle(dispatcher)

    assert recorder.count(task_id) == 1
    record = dispatcher.get_task(task_id)
    assert record.next_execution_time == planned
    assert record.last_execution_time is None
    assert record.run_requested is None
    assert (record.status, record.run_count) == (TaskStatus.PENDING, 1)
    assert task_in_file(state_dir, task_id)["run_requested"] is None

    await settle(dispatcher)
    assert recorder.count(task_id) == 1
    # The planned run still comes at its time, as planned.
    clock.move_to(at(2026, 1, 8, 8, 0))
    await settle(dispatcher)
    assert recorder.count(task_id) == 2
    triggers = [entry.trigger for entry in dispatcher.runs(task_id)]
    assert triggers == ["schedule", "manual"]
    await dispatcher.stop()


async def test_a_manual_run_of_a_paused_task_leaves_it_paused_and_never_auto_pauses(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    policy = {"pause_after_failures": 1, "retries": 2, "retry_delay": 60}
    task_id = await add(dispatcher, run_policy=policy)
    other = await add(dispatcher, run_policy=policy)
    recorder.fail.update({task_id, other})
    await dispatcher.start()
    dispatcher.pause_task(task_id)

    dispatcher.run_now(task_id)
    dispatcher.run_now(other)
    await settle(dispatcher)

    assert recorder.count(task_id) == 1
    paused = dispatcher.get_task(task_id)
    assert (paused.status, paused.paused_reason) == (TaskStatus.PAUSED, None)
    failed = dispatcher.get_task(other)
    # Failed, not retried, not counted toward the auto-pause.
    assert failed.status is TaskStatus.ERROR
    assert (failed.retry, failed.consecutive_failures, failed.failure_count) == (None, 0, 1)
    assert failed.next_execution_time == at(2026, 1, 8, 8, 0)
    assert failed.last_error is not None
    await dispatcher.stop()


class Sleeper:
    """A manager whose run takes far longer than any timeout here."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    async def run(self) -> None:
        await asyncio.sleep(30)


async def test_a_manual_run_is_stopped_by_the_run_timeout(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = make_dispatcher(task_manager_factory=Sleeper)
    task_id = await add(dispatcher, run_policy={"run_timeout": 0.2})
    await dispatcher.start()
    dispatcher.run_now(task_id)
    await settle(dispatcher)
    record = dispatcher.get_task(task_id)
    assert (record.status, record.last_error) == (TaskStatus.ERROR, "timed out after 0.2 s")
    (entry,) = dispatcher.runs(task_id)
    assert (entry.trigger, entry.outcome, entry.extra) == ("manual", "failed", {"timed_out": 0.2})
    await dispatcher.stop()


async def test_asking_twice_before_it_starts_runs_once(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    first = dispatcher.run_now(task_id)
    second = dispatcher.run_now(task_id)
    assert first.run_requested == second.run_requested
    await settle(dispatcher)
    assert recorder.count(task_id) == 1
    await dispatcher.stop()


async def test_asking_again_while_it_runs_runs_it_once_more(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    recorder.gates[task_id] = gate = asyncio.Event()
    recorder.started[task_id] = started = asyncio.Event()
    await dispatcher.start()
    dispatcher.run_now(task_id)
    await asyncio.wait_for(started.wait(), 10)
    again = dispatcher.run_now(task_id)  # the first is running: this one is a new request
    assert again.run_requested is not None
    gate.set()
    await settle(dispatcher)
    await settle(dispatcher)
    assert recorder.count(task_id) == 2
    assert dispatcher.get_task(task_id).run_requested is None
    assert [entry.trigger for entry in dispatcher.runs(task_id)] == ["manual", "manual"]
    await dispatcher.stop()


async def test_a_manual_run_waits_for_its_accounts_lane(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    busy = await add(dispatcher, valid_time_range=[0, 24])
    task_id = await add(dispatcher)
    recorder.gates[busy] = gate = asyncio.Event()
    recorder.started[busy] = started = asyncio.Event()
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 7, 0, 1))
    dispatcher.scheduler.process_due()
    await asyncio.wait_for(started.wait(), 10)
    dispatcher.run_now(task_id)
    await asyncio.sleep(0)
    assert recorder.count(task_id) == 0
    assert dispatcher.queued_runs() == {"account_1": [task_id]}
    gate.set()
    await settle(dispatcher)
    assert recorder.count(task_id) == 1
    assert recorder.max_active.get("account_1", 1) == 1
    await dispatcher.stop()


async def test_a_run_asked_for_is_durable_and_runs_once_after_a_restart(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    first = make_dispatcher()
    task_id = await add(first)
    first.run_now(task_id)  # saved when it returns; nobody runs it in this process
    first.close(save=False)

    second = make_dispatcher()
    assert second.get_task(task_id).run_requested is not None
    await second.start()
    await settle(second)
    assert recorder.count(task_id) == 1
    await second.stop()

    third = make_dispatcher()
    await third.start()
    await settle(third)
    assert recorder.count(task_id) == 1
    assert [entry.trigger for entry in third.runs(task_id)] == ["manual"]
    await third.stop()


async def test_history_rows_from_before_triggers_read_as_planned_or_retry(
    clock: Any, make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, valid_time_range=[0, 24])
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 7, 0, 1))
    await settle(dispatcher)
    await dispatcher.stop()
    # The file as the previous format wrote it: no trigger column.
    with sqlite3.connect(state_dir / HISTORY_FILENAME) as connection:
        connection.execute("ALTER TABLE runs DROP COLUMN trigger")
        connection.execute("INSERT INTO runs SELECT * FROM runs WHERE 0")
        connection.execute("UPDATE runs SET attempt = 2, run_id = 'old-retry'")
        connection.execute("PRAGMA user_version = 1")
    (entry,) = read_runs(state_dir)
    assert (entry.run_id, entry.trigger) == ("old-retry", "retry")
    reopened = make_dispatcher()  # opening the history adds the column
    (entry,) = reopened.runs(task_id)
    assert entry.trigger == "retry"
    reopened.close()


# ---------------------------------------------------------------------- accounts


async def test_pause_and_resume_an_account_in_one_commit_reported_per_task(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    first = await add(dispatcher, "banned")
    second = await add(dispatcher, "banned")
    done = await add(dispatcher, "banned", task_end_time="2026-01-09")
    other = await add(dispatcher, "fine")
    dispatcher.pause_task(second)
    events: list[DispatcherEvent] = []
    dispatcher.add_listener(events.append, [TaskPaused, TaskResumed])
    await dispatcher.start()

    report = dispatcher.pause_account("banned")
    assert [(c.task_id, c.status, c.changed) for c in report] == [
        (first, TaskStatus.PAUSED, True),
        (second, TaskStatus.PAUSED, False),
        (done, TaskStatus.PAUSED, True),
    ]
    for task_id in (first, second, done):
        assert task_in_file(state_dir, task_id)["status"] == "paused"
    assert task_in_file(state_dir, other)["status"] == "pending"
    await asyncio.sleep(0)
    assert [(type(e), e.task_id) for e in events] == [(TaskPaused, first), (TaskPaused, done)]

    events.clear()
    report = dispatcher.resume_account("banned")
    assert [(c.task_id, c.changed) for c in report] == [(first, True), (second, True), (done, True)]
    assert all(c.status is TaskStatus.PENDING for c in report)
    assert task_in_file(state_dir, second)["status"] == "pending"
    await asyncio.sleep(0)
    assert [e.task_id for e in events] == [first, second, done]
    assert all(isinstance(e, TaskResumed) for e in events)

    with pytest.raises(AccountNotFoundError, match="nobody"):
        dispatcher.pause_account("nobody")
    await dispatcher.stop()


async def test_an_account_change_that_could_not_be_saved_acts_is_announced_and_raises(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dispatcher = make_dispatcher()
    first = await add(dispatcher, "banned")
    second = await add(dispatcher, "banned")
    events: list[DispatcherEvent] = []
    dispatcher.add_listener(events.append, [TaskPaused])
    await dispatcher.start()

    def full_disk(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = os.write
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SaveFailedError) as failed:
        dispatcher.pause_account("banned")
    assert set(failed.value.task_ids) == {first, second}
    assert {dispatcher.get_task(t).status for t in (first, second)} == {TaskStatus.PAUSED}
    await asyncio.sleep(0)
    assert [e.task_id for e in events] == [first, second]
    monkeypatch.setattr(os, "write", real_write)
    await settle(dispatcher)
    assert task_in_file(state_dir, first)["status"] == "paused"
    await dispatcher.stop()


# ---------------------------------------------------------------------- the API in-process


async def test_preview_of_an_edit_changes_nothing_and_names_bad_fields(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    import httpx

    from scheduler.control import create_app

    dispatcher = make_dispatcher()
    app = create_app(dispatcher)  # before the clock is frozen: FastAPI imports pydantic.v1
    # At 07:30 in Shanghai, outside the previewed hours: inside them the first run would be
    # "now", off the hourly grid the others keep.
    with freeze_time(at(2026, 3, 2, 7, 30), real_asyncio=True):
        await _preview_an_edit(dispatcher, app, state_dir, httpx)


async def _preview_an_edit(
    dispatcher: TaskDispatcher, app: Any, state_dir: Path, httpx: Any
) -> None:
    task_id = await add(dispatcher)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as http:
        url = f"/api/v1/tasks/{task_id}/preview"
        answer = await http.post(url, params={"count": 3}, json={"valid_time_range": [10, 12]})
        assert answer.status_code == 200, answer.text
        runs = [datetime.fromisoformat(t).astimezone(SHANGHAI) for t in answer.json()["runs"]]
        assert len(runs) == 3
        assert all(t.hour in (10, 11) and t.minute == runs[0].minute for t in runs), runs
        assert dispatcher.get_task(task_id).valid_time_range == (8, 22)
        assert task_in_file(state_dir, task_id)["valid_time_range"] == [8, 22]
        for body, field in (
            ({"valid_time_range": [24, 0]}, "valid_time_range"),
            ({"run_policy": {"retries": -1}}, "run_policy.retries"),
            ({"interval": "often"}, "interval"),
            ({"kwargs": {"x": 1}}, "kwargs"),
        ):
            refused = await http.post(url, json=body)
            assert (refused.status_code, refused.json()["field"]) == (422, field), body
        missing = await http.post("/api/v1/tasks/nope/preview", json={})
        assert (missing.status_code, missing.json()["field"]) == (404, "task_id")
