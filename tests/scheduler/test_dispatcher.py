"""End-to-end scenarios with a frozen clock: what a host application sees."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import SHANGHAI, Recorder, add, at, read_state, seed_file, seed_task, task_in_file

from jobstores import JsonJobStore
from scheduler import (
    DispatcherEvent,
    InvalidTaskError,
    RunSucceeded,
    TaskDispatcher,
    TimezoneMismatchError,
)
from tasks import TaskStatus

MakeDispatcher = Callable[..., TaskDispatcher]


async def hold_run(
    dispatcher: TaskDispatcher, recorder: Recorder, task_id: str, *, via_run_pending: bool = True
) -> asyncio.Task[None] | None:
    """Start the due run of ``task_id`` and return once it is inside run(), held there until
    ``recorder.gates[task_id]`` is set. Returns the run_pending() call in progress, if any."""
    recorder.gates[task_id] = asyncio.Event()
    recorder.started[task_id] = asyncio.Event()
    pending = asyncio.create_task(dispatcher.run_pending()) if via_run_pending else None
    if not via_run_pending:
        dispatcher.scheduler.wakeup()
    await asyncio.wait_for(recorder.started[task_id].wait(), 5)
    return pending


async def test_seed_example_runs_unchanged(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    # The seed's example, constants replaced by their string values.
    with pytest.warns(DeprecationWarning, match="valid_time_rage"):
        task_id = await dispatcher.add_task(
            sys_type="mac_intel",
            task_type="xhs_type",
            xhs_account_id="account_1",
            xhs_account_name="账号1",
            user_query="开始运营",
            task_end_time=datetime.date.today() + datetime.timedelta(days=30),
            interval=3600,
            valid_time_rage=[8, 22],
        )
    await dispatcher.start()
    dispatcher.pause_task(task_id)
    dispatcher.resume_task(task_id)
    await dispatcher.stop()

    saved = read_state(state_dir)
    assert saved["version"] == "1.0"
    assert saved["account_tasks"] == {"account_1": [task_id]}
    (task,) = saved["tasks"]
    assert task["valid_time_range"] == [8, 22]
    assert task["account_name"] == "账号1"
    assert task["kwargs"] == {
        "xhs_account_id": "account_1",
        "xhs_account_name": "账号1",
        "user_query": "开始运营",
        "task_id": task_id,
        "task_type": "xhs_type",
    }
    assert recorder.created[0] == {"sys_type": "mac_intel", **task["kwargs"]}
    for key in (
        "task_id",
        "account_id",
        "account_name",
        "task_type",
        "status",
        "interval",
        "valid_time_range",
        "task_end_time",
        "last_execution_time",
        "next_execution_time",
        "created_at",
        "updated_at",
        "kwargs",
        "sys_type",
    ):
        assert key in task


async def test_a_day_of_runs_across_the_window(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    assert dispatcher.get_task(task_id).next_execution_time == at(2026, 1, 8, 8, 0)
    await dispatcher.start()
    for hour in range(24):
        clock.move_to(at(2026, 1, 8, 7, 0) + datetime.timedelta(hours=hour))
        await dispatcher.run_pending()
    hours = [run.at.hour for run in recorder.runs]
    assert hours == list(range(8, 22))
    record = dispatcher.get_task(task_id)
    assert record.run_count == 14
    assert record.last_execution_time == at(2026, 1, 8, 21, 0)
    assert record.next_execution_time == at(2026, 1, 9, 8, 0)
    await dispatcher.stop()


async def test_wrap_around_window_runs_overnight(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, interval=7200, valid_time_range=[22, 6])
    await dispatcher.start()
    for hour in range(24):
        clock.move_to(at(2026, 1, 8, 7, 0) + datetime.timedelta(hours=hour))
        await dispatcher.run_pending()
    assert [run.at.hour for run in recorder.runs] == [22, 0, 2, 4]
    await dispatcher.stop()


async def test_end_date_completes_the_task_and_keeps_it(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, interval=4 * 3600, task_end_time=datetime.date(2026, 1, 8))
    await dispatcher.start()
    for hour in range(30):
        clock.move_to(at(2026, 1, 8, 7, 0) + datetime.timedelta(hours=hour))
        await dispatcher.run_pending()
    assert [run.at.hour for run in recorder.runs] == [8, 12, 16, 20]
    record = dispatcher.get_task(task_id)
    assert record.status is TaskStatus.COMPLETED
    assert record.next_execution_time is None
    saved = task_in_file(state_dir, task_id)
    assert saved["status"] == "completed"
    assert saved["task_end_time"] == "2026-01-08"
    await dispatcher.stop()


async def test_exact_end_datetime_is_the_last_start(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, task_end_time=datetime.datetime(2026, 1, 8, 10, 0))
    await dispatcher.start()
    for hour in range(6):
        clock.move_to(at(2026, 1, 8, 8, 0) + datetime.timedelta(hours=hour))
        await dispatcher.run_pending()
    assert [run.at.hour for run in recorder.runs] == [8, 9, 10]
    assert dispatcher.get_task(task_id).status is TaskStatus.COMPLETED
    await dispatcher.stop()


async def test_more_tasks_due_than_a_pass_takes_all_run(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pass takes at most pass_limit due jobs (so it never holds the loop for long); the
    # passes that follow at once take the rest, for run_pending as for the scheduler's timer.
    monkeypatch.setattr(JsonJobStore, "pass_limit", 2)
    dispatcher = make_dispatcher()
    ids = [await add(dispatcher, f"account_{i}") for i in range(7)]
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    assert sorted(recorder.run_ids()) == sorted(ids)
    await dispatcher.stop()


async def test_more_tasks_due_than_a_pass_takes_all_run_on_time(
    make_dispatcher: MakeDispatcher, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(JsonJobStore, "pass_limit", 2)
    dispatcher = make_dispatcher()
    for i in range(7):
        await add(dispatcher, f"account_{i}", valid_time_range=[0, 24])
    finished: list[DispatcherEvent] = []
    all_ran = asyncio.Event()

    def count(event: DispatcherEvent) -> None:
        finished.append(event)
        if len(finished) == 7:
            all_ran.set()

    dispatcher.add_listener(count, [RunSucceeded])
    await dispatcher.start()  # all due now: the scheduler's own passes, one after another
    await asyncio.wait_for(all_ran.wait(), 10)
    assert len(recorder.runs) == 7
    await dispatcher.stop()


async def test_pause_and_resume(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    dispatcher.pause_task(task_id)
    dispatcher.pause_task(task_id)  # idempotent
    assert task_in_file(state_dir, task_id)["status"] == "paused"
    assert dispatcher.get_task(task_id).next_execution_time is None
    for hour in (9, 10, 11):
        clock.move_to(at(2026, 1, 8, hour, 30))
        await dispatcher.run_pending()
    assert recorder.count(task_id) == 1
    dispatcher.resume_task(task_id)
    dispatcher.resume_task(task_id)  # idempotent
    # last run 08:00 + 1h is past: the next run is now, inside the window.
    record = dispatcher.get_task(task_id)
    assert record.status is TaskStatus.PENDING
    assert record.next_execution_time == at(2026, 1, 8, 11, 30)
    assert task_in_file(state_dir, task_id)["status"] == "pending"
    await dispatcher.run_pending()
    assert recorder.count(task_id) == 2
    await dispatcher.stop()


async def test_resume_waits_for_interval_and_window(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, interval=6 * 3600)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    dispatcher.pause_task(task_id)
    clock.move_to(at(2026, 1, 8, 9, 0))
    dispatcher.resume_task(task_id)
    assert dispatcher.get_task(task_id).next_execution_time == at(2026, 1, 8, 14, 0)
    dispatcher.pause_task(task_id)
    clock.move_to(at(2026, 1, 8, 23, 0))
    dispatcher.resume_task(task_id)
    assert dispatcher.get_task(task_id).next_execution_time == at(2026, 1, 9, 8, 0)
    await dispatcher.stop()


async def test_pause_during_a_run_lets_it_finish_with_no_run_after(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    pending = await hold_run(dispatcher, recorder, task_id)
    assert dispatcher.get_task(task_id).status is TaskStatus.RUNNING
    dispatcher.pause_task(task_id)
    assert task_in_file(state_dir, task_id)["status"] == "paused"
    recorder.gates[task_id].set()
    assert pending is not None
    await asyncio.wait_for(pending, 5)
    record = dispatcher.get_task(task_id)
    assert record.status is TaskStatus.PAUSED
    assert record.run_count == 1
    clock.move_to(at(2026, 1, 8, 12, 0))
    await dispatcher.run_pending()
    assert recorder.count(task_id) == 1
    await dispatcher.stop()


async def test_reorder_changes_execution_order(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    first = await add(dispatcher, task_id="first")
    second = await add(dispatcher, task_id="second")
    third = await add(dispatcher, task_id="third")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    assert recorder.run_ids() == [first, second, third]

    dispatcher.reorder_task(third, 0)
    assert dispatcher.account_tasks == {"account_1": [third, first, second]}
    assert read_state(state_dir)["account_tasks"] == {"account_1": [third, first, second]}
    recorder.runs.clear()
    clock.move_to(at(2026, 1, 8, 9, 0))
    await dispatcher.run_pending()
    assert recorder.run_ids() == [third, first, second]
    await dispatcher.stop()


async def test_order_version_changes_with_every_change_of_an_order(
    make_dispatcher: MakeDispatcher,
) -> None:
    dispatcher = make_dispatcher()
    seen = [dispatcher.order_version]
    first = await add(dispatcher, task_id="first")
    seen.append(dispatcher.order_version)
    await add(dispatcher, task_id="second")
    seen.append(dispatcher.order_version)
    dispatcher.pause_task(first)  # a change that moves nothing
    assert dispatcher.order_version == seen[-1]
    dispatcher.reorder_task("second", 0)
    seen.append(dispatcher.order_version)
    dispatcher.remove_task(first)
    seen.append(dispatcher.order_version)
    assert len(set(seen)) == len(seen)


async def test_one_run_at_a_time_per_account_and_accounts_in_parallel(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    ids = {
        (account, n): await add(dispatcher, account=account, task_id=f"{account}-{n}")
        for account in ("a", "b")
        for n in range(3)
    }
    gate = asyncio.Event()
    for task_id in ids.values():
        recorder.gates[task_id] = gate
    recorder.started["a-0"] = asyncio.Event()
    recorder.started["b-0"] = asyncio.Event()
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    pending = asyncio.create_task(dispatcher.run_pending())
    # Both accounts' first tasks are running at once; nothing else of theirs is.
    await asyncio.wait_for(recorder.started["a-0"].wait(), 5)
    await asyncio.wait_for(recorder.started["b-0"].wait(), 5)
    assert recorder.active == {"a": 1, "b": 1}
    gate.set()
    assert pending is not None
    await asyncio.wait_for(pending, 5)
    assert recorder.max_active == {"a": 1, "b": 1}
    assert recorder.max_total == 2
    order = recorder.run_ids()
    assert [i for i in order if i.startswith("a")] == ["a-0", "a-1", "a-2"]
    assert [i for i in order if i.startswith("b")] == ["b-0", "b-1", "b-2"]
    await dispatcher.stop()


async def test_concurrency_limit_across_accounts(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher(max_concurrent_runs=2)
    gate = asyncio.Event()
    for n in range(5):
        task_id = await add(dispatcher, account=f"acc{n}", task_id=f"t{n}")
        recorder.gates[task_id] = gate
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    pending = asyncio.create_task(dispatcher.run_pending())
    recorder.started["t1"] = asyncio.Event()
    await asyncio.wait_for(recorder.started["t1"].wait(), 5)
    assert sum(recorder.active.values()) == 2
    gate.set()
    assert pending is not None
    await asyncio.wait_for(pending, 5)
    assert recorder.max_total == 2
    assert len(recorder.runs) == 5
    await dispatcher.stop()


async def test_a_failing_run_records_the_error_and_stays_scheduled(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    recorder.fail.add(task_id)
    await dispatcher.start()
    for hour in (8, 9):
        clock.move_to(at(2026, 1, 8, hour, 0))
        await dispatcher.run_pending()
    record = dispatcher.get_task(task_id)
    assert record.status is TaskStatus.ERROR
    assert record.last_error == f"ValueError: boom in {task_id}"
    assert record.consecutive_failures == 2
    assert record.failure_count == 2
    assert record.next_execution_time == at(2026, 1, 8, 10, 0)
    saved = task_in_file(state_dir, task_id)
    assert saved["status"] == "error"
    assert saved["last_error"] == record.last_error

    recorder.fail.clear()
    clock.move_to(at(2026, 1, 8, 10, 0))
    await dispatcher.run_pending()
    record = dispatcher.get_task(task_id)
    assert record.status is TaskStatus.PENDING
    assert (record.run_count, record.failure_count, record.consecutive_failures) == (3, 2, 0)
    await dispatcher.stop()


class SyncManager:
    """A manager with a plain run(): it must run in a worker thread."""

    threads: ClassVar[list[int]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def run(self) -> None:
        SyncManager.threads.append(threading.get_ident())


async def test_sync_managers_run_in_a_thread(clock: Any, make_dispatcher: MakeDispatcher) -> None:
    SyncManager.threads.clear()
    dispatcher = make_dispatcher(task_manager_factory=SyncManager)
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    assert len(SyncManager.threads) == 1
    assert SyncManager.threads[0] != threading.get_ident()
    assert dispatcher.get_task(task_id).run_count == 1
    await dispatcher.stop()


class SelfCancellingManager:
    """An async manager whose run() raises CancelledError without being cancelled."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def run(self) -> None:
        raise asyncio.CancelledError("gave up")


async def test_a_run_raising_cancelled_error_by_itself_fails_and_is_counted(
    clock: Any, make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    # Local runs are awaited in the runner's own task: a CancelledError the manager raises
    # must count as a failed run, not as the dispatcher cutting the run off.
    dispatcher = make_dispatcher(task_manager_factory=SelfCancellingManager)
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    record = dispatcher.get_task(task_id)
    assert (record.run_count, record.failure_count) == (1, 1)
    assert record.status is TaskStatus.ERROR
    assert record.last_error == "CancelledError: gave up"
    assert record.active_run is None
    await dispatcher.stop()
    assert task_in_file(state_dir, task_id)["last_error"] == "CancelledError: gave up"


async def test_stop_and_recreate_restores_everything(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    a1 = await add(dispatcher, account="a", user_query="q1")
    a2 = await add(dispatcher, account="a", interval=1800, valid_time_range=[22, 6])
    b1 = await add(dispatcher, account="b", task_end_time=datetime.date(2026, 2, 1))
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    dispatcher.pause_task(b1)
    dispatcher.reorder_task(a2, 0)
    before = {record.task_id: record for record in dispatcher.list_tasks()}
    await dispatcher.stop()

    recorder.created.clear()
    again = make_dispatcher()
    after = {record.task_id: record for record in again.list_tasks()}
    assert after == before
    assert again.account_tasks == {"a": [a2, a1], "b": [b1]}
    assert sorted(kw["task_id"] for kw in recorder.created) == sorted([a1, a2, b1])
    assert {kw["task_id"]: kw for kw in recorder.created}[a1]["user_query"] == "q1"
    assert after[b1].status is TaskStatus.PAUSED
    assert after[a1].run_count == 1
    await again.start()
    clock.move_to(at(2026, 1, 8, 9, 0))
    await again.run_pending()
    assert again.get_task(a1).run_count == 2
    await again.stop()


async def run_at_eight_then_stop(clock: Any, make_dispatcher: MakeDispatcher) -> str:
    """An hourly 8-22 task that ran at 08:00, then a stopped dispatcher; returns the task id."""
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    await dispatcher.stop()
    return task_id


async def test_downtime_catch_up_is_one_run_if_window_open(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    task_id = await run_at_eight_then_stop(clock, make_dispatcher)

    clock.move_to(at(2026, 1, 8, 15, 20))  # five runs missed
    again = make_dispatcher()
    await again.start()
    await again.run_pending()
    assert recorder.count(task_id) == 2
    record = again.get_task(task_id)
    assert record.last_execution_time == at(2026, 1, 8, 15, 20)
    assert record.next_execution_time == at(2026, 1, 8, 16, 20)
    await again.stop()


async def test_downtime_catch_up_waits_for_the_window(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    task_id = await run_at_eight_then_stop(clock, make_dispatcher)

    clock.move_to(at(2026, 1, 8, 23, 0))  # missed 09:00-21:00; the window is closed now
    again = make_dispatcher()
    await again.start()
    await again.run_pending()
    assert recorder.count(task_id) == 1
    assert again.get_task(task_id).next_execution_time == at(2026, 1, 9, 8, 0)
    clock.move_to(at(2026, 1, 9, 8, 0))
    await again.run_pending()
    assert recorder.count(task_id) == 2
    await again.stop()


async def test_busy_loop_coalesces_missed_runs(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, interval=60)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    clock.move_to(at(2026, 1, 8, 8, 10, 30))  # ten intervals passed without a pass
    await dispatcher.run_pending()
    assert recorder.count(task_id) == 2
    assert dispatcher.get_task(task_id).next_execution_time == at(2026, 1, 8, 8, 11, 30)
    await dispatcher.stop()


async def test_a_task_running_at_crash_is_runnable_after_load(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    dispatcher.close()
    document = read_state(state_dir)
    document["tasks"][0]["status"] = "running"
    (state_dir / "dispatch_config.json").write_text(json.dumps(document))
    assert task_in_file(state_dir, task_id)["status"] == "running"
    again = make_dispatcher()
    assert again.get_task(task_id).status is TaskStatus.PENDING
    await again.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await again.run_pending()
    assert recorder.count(task_id) == 1
    await again.stop()


async def test_removing_a_task_stops_it_and_drops_it_from_the_file(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    keep = await add(dispatcher)
    gone = await add(dispatcher)
    await dispatcher.start()
    dispatcher.remove_task(gone)
    assert [t["task_id"] for t in read_state(state_dir)["tasks"]] == [keep]
    assert read_state(state_dir)["account_tasks"] == {"account_1": [keep]}
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()
    assert recorder.run_ids() == [keep]
    await dispatcher.stop()


async def test_remove_during_a_run_does_not_resurrect_the_task(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    pending = await hold_run(dispatcher, recorder, task_id)
    dispatcher.remove_task(task_id)
    recorder.gates[task_id].set()
    assert pending is not None
    await asyncio.wait_for(pending, 5)
    assert dispatcher.list_tasks() == []
    assert read_state(state_dir)["tasks"] == []
    await dispatcher.stop()


async def test_async_context_manager_starts_and_stops(
    clock: Any, make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    async with make_dispatcher() as dispatcher:
        assert dispatcher.running
        await add(dispatcher)
    assert dispatcher.closed
    assert not dispatcher.running


async def test_stop_lets_a_run_finish_within_the_grace_period(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await hold_run(dispatcher, recorder, task_id, via_run_pending=False)
    stopping = asyncio.create_task(dispatcher.stop())
    await asyncio.sleep(0)
    assert not stopping.done()
    recorder.gates[task_id].set()
    await asyncio.wait_for(stopping, 5)
    assert task_in_file(state_dir, task_id)["run_count"] == 1
    assert task_in_file(state_dir, task_id)["status"] == "pending"


async def test_stop_cancels_a_run_past_the_grace_period(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await hold_run(dispatcher, recorder, task_id, via_run_pending=False)  # never released
    await asyncio.wait_for(dispatcher.stop(grace_period=0), 5)
    saved = task_in_file(state_dir, task_id)
    assert saved["status"] == "pending"
    assert saved["run_count"] == 0
    assert saved["last_execution_time"] == at(2026, 1, 8, 8, 0).isoformat()


async def test_stop_past_the_grace_period_drops_runs_still_waiting_for_their_lane(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    # Runs waiting for a lane are queue entries, not tasks: stopping must still take them
    # back (never started, nothing counted) and settle them, besides cutting off the run.
    dispatcher = make_dispatcher(max_concurrent_runs=1)
    held = await add(dispatcher, account="a", task_id="a-0")
    behind = await add(dispatcher, account="a", task_id="a-1")  # waits for a's lane
    other = await add(dispatcher, account="b", task_id="b-0")  # waits for the one slot
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await hold_run(dispatcher, recorder, held, via_run_pending=False)  # never released
    await asyncio.wait_for(dispatcher.stop(grace_period=0), 5)
    assert recorder.run_ids() == [held]
    for task_id in (held, behind, other):
        saved = task_in_file(state_dir, task_id)
        assert (saved["status"], saved["run_count"]) == ("pending", 0), task_id
        assert saved.get("active_run") is None, task_id
    assert task_in_file(state_dir, behind).get("last_execution_time") is None


async def test_run_pending_needs_a_started_dispatcher(make_dispatcher: MakeDispatcher) -> None:
    from scheduler import DispatcherNotRunningError

    with pytest.raises(DispatcherNotRunningError):
        await make_dispatcher().run_pending()


async def test_a_stopped_dispatcher_refuses_changes(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    from scheduler import DispatcherClosedError

    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.stop()
    await dispatcher.stop()  # idempotent
    with pytest.raises(DispatcherClosedError):
        dispatcher.pause_task(task_id)
    with pytest.raises(DispatcherClosedError):
        await add(dispatcher)
    assert dispatcher.get_task(task_id).task_id == task_id


def test_timezone_default_is_local(state_dir: Path) -> None:
    import tzlocal

    dispatcher = TaskDispatcher(state_dir)
    try:
        assert dispatcher.timezone == tzlocal.get_localzone()
    finally:
        dispatcher.close()


def test_timezone_accepts_tzinfo(state_dir: Path) -> None:
    dispatcher = TaskDispatcher(state_dir, timezone=SHANGHAI)
    try:
        assert dispatcher.timezone is SHANGHAI
    finally:
        dispatcher.close()


def _store_recording(state_dir: Path, zone: str) -> bytes:
    """A state file of one task, recording ``zone``."""
    document = json.loads(seed_file([seed_task()]))
    state_dir.mkdir(parents=True, exist_ok=True)
    content = json.dumps({**document, "timezone": zone}).encode()
    (state_dir / "dispatch_config.json").write_bytes(content)
    return content


def test_no_zone_given_takes_the_files_zone(state_dir: Path) -> None:
    _store_recording(state_dir, "Asia/Shanghai")
    dispatcher = TaskDispatcher(state_dir, task_manager_factory=Recorder())
    try:
        assert str(dispatcher.timezone) == "Asia/Shanghai"
        dispatcher.pause_task("task_id_1")
    finally:
        dispatcher.close()
    assert read_state(state_dir)["timezone"] == "Asia/Shanghai"


def test_another_zone_than_the_files_is_refused(state_dir: Path) -> None:
    content = _store_recording(state_dir, "Asia/Shanghai")
    with pytest.raises(TimezoneMismatchError, match=r"'Asia/Shanghai', not 'UTC'") as raised:
        TaskDispatcher(state_dir, timezone="UTC")
    assert isinstance(raised.value, ValueError)
    assert (raised.value.recorded, raised.value.requested) == ("Asia/Shanghai", "UTC")
    assert "convert_timezone=True" in str(raised.value)
    assert (state_dir / "dispatch_config.json").read_bytes() == content
    TaskDispatcher(state_dir, task_manager_factory=Recorder(), timezone=SHANGHAI).close()


async def test_converting_the_zone_is_explicit(
    clock: Any, state_dir: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    first = TaskDispatcher(state_dir, task_manager_factory=recorder, timezone="Asia/Shanghai")
    task_id = await add(first)  # hours 8-22 Shanghai: next run 08:00 Shanghai
    first.close()
    with caplog.at_level(logging.WARNING):
        dispatcher = TaskDispatcher(
            state_dir, task_manager_factory=recorder, timezone="UTC", convert_timezone=True
        )
    try:
        assert str(dispatcher.timezone) == "UTC"
        assert any("converting" in r.getMessage() for r in caplog.records)
        dispatcher.pause_task(task_id)
        dispatcher.resume_task(task_id)  # now 23:00 UTC: the next 8-22 opening is 08:00 UTC
        planned = dispatcher.get_task(task_id).next_execution_time
        assert planned == datetime.datetime(2026, 1, 8, 8, 0, tzinfo=datetime.UTC)
    finally:
        dispatcher.close()
    assert read_state(state_dir)["timezone"] == "UTC"


def test_an_unknown_recorded_zone_needs_an_explicit_conversion(state_dir: Path) -> None:
    _store_recording(state_dir, "Asia/Shanghai")
    path = state_dir / "dispatch_config.json"
    path.write_bytes(path.read_bytes().replace(b'"Asia/Shanghai"', b'"Mars/Olympus"'))
    with pytest.raises(InvalidTaskError, match="Mars/Olympus") as raised:
        TaskDispatcher(state_dir)
    assert raised.value.field == "timezone"
    with pytest.raises(TimezoneMismatchError):
        TaskDispatcher(state_dir, timezone="UTC")
    converted = TaskDispatcher(
        state_dir, task_manager_factory=Recorder(), timezone="UTC", convert_timezone=True
    )
    converted.pause_task("task_id_1")
    converted.close()
    assert read_state(state_dir)["timezone"] == "UTC"


async def test_cancelling_run_pending_drops_the_runs_still_waiting_for_their_lane(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    held = await add(dispatcher, account="a", task_id="a-0")
    behind = await add(dispatcher, account="a", task_id="a-1")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    pending = await hold_run(dispatcher, recorder, held)
    assert pending is not None
    pending.cancel()  # cancels the run it waits for, and the one waiting behind it
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.wait_for(dispatcher.run_pending(), 5)  # nothing left out
    assert recorder.run_ids() == [held]
    assert dispatcher.get_task(behind).active_run is None
    assert dispatcher.get_task(held).active_run is None
    await dispatcher.stop()
    assert task_in_file(state_dir, behind)["run_count"] == 0
