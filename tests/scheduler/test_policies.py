"""Run policies and task edits end to end, with a frozen clock: retries, timeouts, auto-pause,
jitter and update_task."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import Recorder, at, read_state, task_in_file

from scheduler import InvalidTaskError, TaskDispatcher
from tasks import RunPolicy, TaskStatus
from tasks.runs import RunEvent, RunEventKind, RunRequest

MakeDispatcher = Callable[..., TaskDispatcher]
MINUTE = timedelta(minutes=1)


async def add(dispatcher: TaskDispatcher, account: str = "account_1", **options: Any) -> str:
    options.setdefault("interval", 3600)
    options.setdefault("valid_time_range", [8, 22])
    return await dispatcher.add_task(
        sys_type="mac_intel", task_type="xhs_type", xhs_account_id=account, **options
    )


async def run_at(clock: Any, dispatcher: TaskDispatcher, *when: int) -> None:
    clock.move_to(at(*when))
    await asyncio.wait_for(dispatcher.run_pending(), 10)


# ---------------------------------------------------------------------- retries


async def test_retries_back_off_exactly_then_the_last_failure_sets_error(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    policy = {"retries": 2, "retry_delay": 60, "retry_backoff": 3}
    task_id = await add(dispatcher, run_policy=policy)
    recorder.fail.add(task_id)
    await dispatcher.start()

    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    record = dispatcher.get_task(task_id)
    assert record.retry is not None
    assert (record.retry.at, record.retry.attempt) == (at(2026, 1, 8, 8, 1), 2)
    assert record.status is TaskStatus.PENDING
    assert record.last_error is None
    assert (record.run_count, record.failure_count, record.consecutive_failures) == (1, 0, 0)
    assert task_in_file(state_dir, task_id)["retry"]["attempt"] == 2

    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0, 59)  # not yet
    assert len(recorder.runs) == 1
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 1)
    assert dispatcher.get_task(task_id).retry.at == at(2026, 1, 8, 8, 4)  # type: ignore[union-attr]
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 4)

    assert [run.at for run in recorder.runs] == [
        at(2026, 1, 8, 8, 0),
        at(2026, 1, 8, 8, 1),
        at(2026, 1, 8, 8, 4),
    ]
    record = dispatcher.get_task(task_id)
    assert record.retry is None
    assert record.status is TaskStatus.ERROR
    assert record.last_error == f"ValueError: boom in {task_id}"
    assert (record.run_count, record.failure_count, record.consecutive_failures) == (3, 1, 1)
    assert record.next_execution_time == at(2026, 1, 8, 9, 0)
    entries = dispatcher.runs(task_id)
    assert [(entry.attempt, entry.outcome) for entry in reversed(entries)] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]
    assert {entry.scheduled_at for entry in entries} == {at(2026, 1, 8, 8, 0)}
    await dispatcher.stop()


async def test_retries_of_many_tasks_run_in_the_order_of_their_times(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    # Planned in one order, due in another: each is submitted at its own time.
    dispatcher = make_dispatcher()
    delays = {"account_1": 300, "account_2": 60, "account_3": 180}
    ids = {
        account: await add(dispatcher, account, run_policy={"retries": 1, "retry_delay": delay})
        for account, delay in delays.items()
    }
    recorder.fail.update(ids.values())
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    assert len(recorder.runs) == 3
    for minute in (1, 2, 3, 4, 5):
        await run_at(clock, dispatcher, 2026, 1, 8, 8, minute)
    assert [(run.task_id, run.at) for run in recorder.runs[3:]] == [
        (ids["account_2"], at(2026, 1, 8, 8, 1)),
        (ids["account_3"], at(2026, 1, 8, 8, 3)),
        (ids["account_1"], at(2026, 1, 8, 8, 5)),
    ]
    await dispatcher.stop()


async def test_a_retry_that_succeeds_clears_the_failure(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy=RunPolicy(retries=3, retry_delay=300))
    recorder.fail.add(task_id)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    recorder.fail.clear()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 5)
    record = dispatcher.get_task(task_id)
    assert (record.status, record.retry, record.last_error) == (TaskStatus.PENDING, None, None)
    assert (record.run_count, record.failure_count) == (2, 0)
    await dispatcher.stop()


async def test_no_retry_at_or_after_the_next_planned_run(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"retries": 5, "retry_delay": 3600})
    recorder.fail.add(task_id)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    record = dispatcher.get_task(task_id)
    assert record.retry is None
    assert record.status is TaskStatus.ERROR
    await dispatcher.stop()


async def test_a_retry_survives_a_restart(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"retries": 1})
    recorder.fail.add(task_id)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    await dispatcher.stop()

    again = make_dispatcher()
    await again.start()
    await run_at(clock, again, 2026, 1, 8, 8, 1)
    assert [run.at for run in recorder.runs] == [at(2026, 1, 8, 8, 0), at(2026, 1, 8, 8, 1)]
    assert again.runs(task_id)[0].attempt == 2
    await again.stop()


async def test_pausing_drops_a_planned_retry(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"retries": 1})
    recorder.fail.add(task_id)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    dispatcher.pause_task(task_id)
    dispatcher.resume_task(task_id)
    assert dispatcher.get_task(task_id).retry is None
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 1)
    assert len(recorder.runs) == 1
    await dispatcher.stop()


# ---------------------------------------------------------------------- auto-pause


async def test_auto_pause_after_consecutive_failures_and_resume(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"pause_after_failures": 2})
    recorder.fail.add(task_id)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    assert dispatcher.get_task(task_id).status is TaskStatus.ERROR
    with caplog.at_level(logging.ERROR, logger="scheduler.ledger"):
        await run_at(clock, dispatcher, 2026, 1, 8, 9, 0)
    record = dispatcher.get_task(task_id)
    assert record.status is TaskStatus.PAUSED
    assert record.next_execution_time is None
    assert (
        record.paused_reason == f"2 failed runs in a row; the last: ValueError: boom in {task_id}"
    )
    assert task_in_file(state_dir, task_id)["paused_reason"] == record.paused_reason
    assert any("paused: 2 failed runs" in r.getMessage() for r in caplog.records)

    await run_at(clock, dispatcher, 2026, 1, 8, 10, 0)
    assert len(recorder.runs) == 2
    dispatcher.resume_task(task_id)
    record = dispatcher.get_task(task_id)
    assert (record.status, record.paused_reason) == (TaskStatus.PENDING, None)
    assert record.consecutive_failures == 0
    assert record.next_execution_time == at(2026, 1, 8, 10, 0)
    await run_at(clock, dispatcher, 2026, 1, 8, 10, 0)
    assert dispatcher.get_task(task_id).status is TaskStatus.ERROR  # one failure: not paused
    await dispatcher.stop()


async def test_a_manual_pause_has_no_reason(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"pause_after_failures": 1})
    dispatcher.pause_task(task_id)
    assert dispatcher.get_task(task_id).paused_reason is None


# ---------------------------------------------------------------------- timeouts


class Blocking:
    """A manager whose run() blocks its thread until released (``mode="sync"``), or returns
    a coroutine that ends at once."""

    release = threading.Event()
    entered = threading.Event()

    def __init__(self, **kwargs: Any) -> None:
        self.sync = kwargs.get("mode") == "sync"

    def run(self) -> Any:
        Blocking.entered.set()
        if self.sync:
            assert Blocking.release.wait(10)
            return None
        return self._done()

    async def _done(self) -> None:
        return None


class AsyncBlocking:
    def __init__(self, **kwargs: Any) -> None:
        pass

    async def run(self) -> None:
        await asyncio.sleep(30)


async def test_an_async_run_past_its_timeout_is_cancelled_and_fails(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = make_dispatcher(task_manager_factory=AsyncBlocking)
    task_id = await add(dispatcher, run_policy={"run_timeout": 0.2})
    events: list[RunEvent] = []
    dispatcher.observe_runs(lambda request, event: events.append(event))
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    record = dispatcher.get_task(task_id)
    assert (record.status, record.last_error) == (TaskStatus.ERROR, "timed out after 0.2 s")
    assert events[-1].kind is RunEventKind.FAILED
    assert events[-1].extra == {"timed_out": 0.2}
    assert dispatcher.runs(task_id)[0].extra == {"timed_out": 0.2}
    await dispatcher.stop()


async def test_a_sync_run_past_its_timeout_fails_but_holds_its_lane(
    clock: Any, make_dispatcher: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    Blocking.release.clear()
    Blocking.entered.clear()
    dispatcher = make_dispatcher(task_manager_factory=Blocking)
    task_id = await add(dispatcher, mode="sync", run_policy={"run_timeout": 0.2})
    other = await add(dispatcher, mode="async")
    failed = asyncio.Event()
    order: list[str] = []

    def observe(request: RunRequest, event: RunEvent) -> None:
        order.append(f"{request.task_id} {event.kind.value}")
        if event.kind is RunEventKind.FAILED:
            failed.set()

    dispatcher.observe_runs(observe)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    with caplog.at_level(logging.WARNING, logger="scheduler.backends.local"):
        pending = asyncio.create_task(dispatcher.run_pending())
        await asyncio.wait_for(failed.wait(), 10)
        record = dispatcher.get_task(task_id)
        assert (record.status, record.last_error) == (TaskStatus.ERROR, "timed out after 0.2 s")
        assert record.active_run is None
        # The thread still runs: the account's other task waits for it.
        assert not pending.done()
        assert order == [f"{task_id} started", f"{task_id} failed"]
        assert any("cannot be stopped" in r.getMessage() for r in caplog.records)
        Blocking.release.set()
        await asyncio.wait_for(pending, 10)
    assert order[2] == f"{other} started"
    await dispatcher.stop(grace_period=0)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def _gone_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is dead within ``seconds`` (polled: another process's state)."""
    deadline = time.monotonic() + seconds
    while not _dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def test_a_shell_run_past_its_timeout_kills_its_process_group(
    make_dispatcher: MakeDispatcher, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    dispatcher = make_dispatcher(task_manager_factory=None)
    task_id = await dispatcher.add_task(
        sys_type="local",
        task_type="shell",
        account_id="acc",
        interval=3600,
        shell=True,
        command=f"sleep 30 & echo $! > {pid_file}; wait",
        run_policy={"run_timeout": 0.5},
    )
    await dispatcher.start()
    await asyncio.wait_for(dispatcher.run_pending(), 10)
    record = dispatcher.get_task(task_id)
    assert record.last_error == "timed out after 0.5 s"
    child = int(pid_file.read_text())

    assert _gone_within(child, 5)
    await dispatcher.stop()


# ---------------------------------------------------------------------- update_task


async def test_update_interval_replans_from_the_last_run_and_keeps_everything_else(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    first = await add(dispatcher)
    task_id = await add(dispatcher)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    before = dispatcher.get_task(task_id)

    record = dispatcher.update_task(task_id, interval=timedelta(hours=2))
    assert record.interval == 7200
    assert record.next_execution_time == at(2026, 1, 8, 10, 0)
    assert (record.task_id, record.run_count, record.created_at) == (
        task_id,
        before.run_count,
        before.created_at,
    )
    assert dispatcher.account_tasks == {"account_1": [first, task_id]}
    assert task_in_file(state_dir, task_id)["interval"] == 7200  # durable on return

    await run_at(clock, dispatcher, 2026, 1, 8, 9, 0)
    assert recorder.count(task_id) == 1
    await run_at(clock, dispatcher, 2026, 1, 8, 10, 0)
    assert recorder.count(task_id) == 2
    await dispatcher.stop()

    again = make_dispatcher()
    await again.start()
    assert again.get_task(task_id).next_execution_time == at(2026, 1, 8, 12, 0)
    await run_at(clock, again, 2026, 1, 8, 11, 0)
    assert recorder.count(task_id) == 2
    await run_at(clock, again, 2026, 1, 8, 12, 0)
    assert recorder.count(task_id) == 3
    await again.stop()


async def test_update_window_moves_the_next_run_out_of_and_into_the_window(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)

    record = dispatcher.update_task(task_id, valid_time_range=[12, 22])
    assert record.next_execution_time == at(2026, 1, 8, 12, 0)
    await run_at(clock, dispatcher, 2026, 1, 8, 9, 0)
    assert recorder.count(task_id) == 1

    clock.move_to(at(2026, 1, 8, 9, 30))
    record = dispatcher.update_task(task_id, valid_time_range=(0, 24))
    assert record.next_execution_time == at(2026, 1, 8, 9, 30)  # overdue: now
    await run_at(clock, dispatcher, 2026, 1, 8, 9, 30)
    assert recorder.count(task_id) == 2
    await dispatcher.stop()


async def test_a_completed_task_whose_end_moves_later_is_pending_again(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, task_end_time=at(2026, 1, 8, 8, 30))
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    await run_at(clock, dispatcher, 2026, 1, 8, 9, 0)
    assert dispatcher.get_task(task_id).status is TaskStatus.COMPLETED

    record = dispatcher.update_task(task_id, task_end_time=date(2026, 1, 9))
    assert (record.status, record.next_execution_time) == (
        TaskStatus.PENDING,
        at(2026, 1, 8, 9, 0),
    )
    await run_at(clock, dispatcher, 2026, 1, 8, 9, 0)
    assert recorder.count(task_id) == 2
    record = dispatcher.update_task(task_id, task_end_time=None)
    assert record.task_end_time is None
    await dispatcher.stop()


async def test_update_kwargs_recreates_the_manager(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, user_query="old")
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    record = dispatcher.update_task(
        task_id, kwargs={"xhs_account_id": "account_1", "user_query": "new"}
    )
    assert record.kwargs == {
        "xhs_account_id": "account_1",
        "user_query": "new",
        "task_id": task_id,
        "task_type": "xhs_type",
    }
    assert recorder.created[-1]["user_query"] == "new"
    created = len(recorder.created)
    await run_at(clock, dispatcher, 2026, 1, 8, 9, 0)
    assert len(recorder.created) == created  # the run used the new manager
    dispatcher.update_task(task_id, interval=7200)
    dispatcher.update_task(task_id, kwargs={"xhs_account_id": "account_1", "user_query": "new"})
    await run_at(clock, dispatcher, 2026, 1, 8, 11, 0)
    assert len(recorder.created) == created  # same keywords: the manager is kept
    dispatcher.update_task(task_id, kwargs={"xhs_account_id": "account_1", "user_query": "last"})
    await run_at(clock, dispatcher, 2026, 1, 8, 13, 0)
    assert len(recorder.created) == created + 1
    assert recorder.created[-1]["user_query"] == "last"
    await dispatcher.stop()


async def test_update_run_policy_merges_a_dict_and_a_paused_task_stays_paused(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"retries": 2})
    dispatcher.pause_task(task_id)
    record = dispatcher.update_task(task_id, run_policy={"run_timeout": 30}, interval=60)
    assert record.run_policy == RunPolicy(retries=2, run_timeout=30)
    assert (record.status, record.next_execution_time) == (TaskStatus.PAUSED, None)
    record = dispatcher.update_task(task_id, run_policy=None)
    assert record.run_policy is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"interval": 0}, "interval"),
        ({"valid_time_range": [8, 8]}, "valid_time_range"),
        ({"task_end_time": date(2026, 1, 1)}, "task_end_time"),
        ({"run_policy": {"retries": -1}}, "run_policy.retries"),
        ({"run_policy": {"jitter": "soon"}}, "run_policy.jitter"),
        ({"run_policy": {"retry": 3}}, "run_policy.retry"),
        ({"run_policy": {"run_timeout": 0}}, "run_policy.run_timeout"),
        ({"run_policy": {"pause_after_failures": 0}}, "run_policy.pause_after_failures"),
        ({"kwargs": {"xhs_account_id": "account_2"}}, "kwargs"),
        ({"kwargs": {"xhs_account_id": "account_1", "interval": 5}}, "kwargs.interval"),
        ({"kwargs": {"xhs_account_id": "account_1", "task_id": "x"}}, "kwargs.task_id"),
        ({"kwargs": {"xhs_account_id": "account_1", "bad": {1, 2}}}, "kwargs.bad"),
    ],
)
async def test_bad_updates_name_the_field_and_change_nothing(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    state_dir: Path,
    changes: dict[str, Any],
    field: str,
) -> None:
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    before = dispatcher.get_task(task_id)
    saved = read_state(state_dir)
    with pytest.raises(InvalidTaskError) as caught:
        dispatcher.update_task(task_id, **changes)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    assert dispatcher.get_task(task_id) == before
    assert read_state(state_dir) == saved


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"retries": 101}, "run_policy.retries"),
        ({"retry_backoff": 0.5}, "run_policy.retry_backoff"),
        ({"jitter": -1}, "run_policy.jitter"),
        ({"unknown": 1}, "run_policy.unknown"),
        ("fast", "run_policy"),
    ],
)
async def test_bad_policies_on_add_name_the_field_and_save_nothing(
    make_dispatcher: MakeDispatcher, state_dir: Path, policy: Any, field: str
) -> None:
    dispatcher = make_dispatcher()
    with pytest.raises(InvalidTaskError) as caught:
        await add(dispatcher, run_policy=policy)
    assert caught.value.field == field
    assert dispatcher.list_tasks() == []
    assert not (state_dir / "dispatch_config.json").exists() or read_state(state_dir)["tasks"] == []


async def test_update_of_an_unknown_task(make_dispatcher: MakeDispatcher) -> None:
    dispatcher = make_dispatcher()
    with pytest.raises(KeyError):
        dispatcher.update_task("nope", interval=60)


# ---------------------------------------------------------------------- jitter


async def test_jitter_starts_late_without_drifting_and_survives_a_restart(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("random.random", lambda: 0.5)
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"jitter": 600})
    record = dispatcher.get_task(task_id)
    assert record.next_execution_time == at(2026, 1, 8, 8, 0)
    assert record.next_start_time == at(2026, 1, 8, 8, 5)
    await dispatcher.start()
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 0)
    assert recorder.runs == []
    await run_at(clock, dispatcher, 2026, 1, 8, 8, 5)
    assert [run.at for run in recorder.runs] == [at(2026, 1, 8, 8, 5)]
    record = dispatcher.get_task(task_id)
    assert record.next_execution_time == at(2026, 1, 8, 9, 0)  # from 8:00, not 8:05
    assert record.next_start_time == at(2026, 1, 8, 9, 5)
    assert dispatcher.runs(task_id)[0].scheduled_at == at(2026, 1, 8, 8, 0)
    await dispatcher.stop()

    monkeypatch.setattr("random.random", lambda: 0.9)
    again = make_dispatcher()
    assert again.get_task(task_id).next_start_time == at(2026, 1, 8, 9, 5)  # kept
    await again.start()
    await run_at(clock, again, 2026, 1, 8, 9, 5)
    assert len(recorder.runs) == 2
    await again.stop()


async def test_pause_resume_and_edits_keep_a_jittered_task_on_its_grid(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    state_dir: Path,
) -> None:
    monkeypatch.setattr("random.random", lambda: 0.5)  # each run starts 5 minutes late
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"jitter": 600})
    await dispatcher.start()
    for hour in range(8, 14):
        await run_at(clock, dispatcher, 2026, 1, 8, hour, 5)
        clock.move_to(at(2026, 1, 8, hour, 6))
        if hour % 2:
            dispatcher.pause_task(task_id)
            dispatcher.resume_task(task_id)
        else:
            dispatcher.update_task(task_id, valid_time_range=[8, 23])
        record = dispatcher.get_task(task_id)
        assert record.next_execution_time == at(2026, 1, 8, hour + 1, 0)  # not hour + 1:05
        assert record.next_start_time == at(2026, 1, 8, hour + 1, 5)
    assert [run.at for run in recorder.runs] == [at(2026, 1, 8, h, 5) for h in range(8, 14)]
    assert task_in_file(state_dir, task_id)["last_planned_time"] == "2026-01-08T13:00:00+08:00"
    await dispatcher.stop()
    again = make_dispatcher()  # the grid point is kept on file
    again.pause_task(task_id)
    again.resume_task(task_id)
    assert again.get_task(task_id).next_execution_time == at(2026, 1, 8, 14, 0)
    again.close()


async def test_jitter_never_leaves_the_window(
    clock: Any, make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("random.random", lambda: 1.0)
    clock.move_to(at(2026, 1, 8, 21, 50))
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher, run_policy={"jitter": 1800})
    record = dispatcher.get_task(task_id)
    assert record.next_start_time == at(2026, 1, 8, 21, 59, 59)


async def test_updating_the_jitter_draws_it_again(
    clock: Any, make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("random.random", lambda: 1.0)
    dispatcher = make_dispatcher()
    task_id = await add(dispatcher)
    assert dispatcher.get_task(task_id).next_start_time is None
    record = dispatcher.update_task(task_id, run_policy={"jitter": 60})
    assert record.next_start_time == at(2026, 1, 8, 8, 1)
    record = dispatcher.update_task(task_id, run_policy={"jitter": 0})
    assert record.next_start_time is None
