"""Whatever one task's schedule does, the other tasks keep running."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_SUBMITTED
from apscheduler.triggers.base import BaseTrigger
from helpers import Recorder, at, read_state, task_in_file

from jobstores.jobs import JobView
from scheduler import TaskDispatcher, TaskTrigger
from tasks import TaskRecord, TaskStatus
from tasks.schedule import Schedule

MakeDispatcher = Callable[..., TaskDispatcher]


class ExplodingTrigger(BaseTrigger):  # type: ignore[misc]
    """A trigger whose every question raises (a bug, a record nobody foresaw)."""

    def get_next_fire_time(self, previous: datetime | None, now: datetime) -> datetime | None:
        raise RuntimeError("trigger exploded")


async def add(dispatcher: TaskDispatcher, task_id: str, **options: Any) -> str:
    options.setdefault("interval", 1)
    return await dispatcher.add_task(
        sys_type="s", task_type="t", account_id=task_id, task_id=task_id, **options
    )


async def test_a_raising_trigger_puts_its_task_in_error_and_the_others_run_on(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "bad")  # due first: the pass meets it before "good"
    await add(dispatcher, "good")
    await dispatcher.start()
    dispatcher.scheduler.modify_job("bad", trigger=ExplodingTrigger())
    with caplog.at_level(logging.ERROR):
        for second in range(1, 6):
            clock.move_to(at(2026, 1, 8, 7, 0) + timedelta(seconds=second))
            await dispatcher.run_pending()
    assert recorder.count("good") == 5
    assert recorder.count("bad") == 0
    bad = dispatcher.get_task("bad")
    assert bad.status is TaskStatus.ERROR
    assert bad.next_execution_time is None
    assert bad.last_error == "scheduling failed: RuntimeError: trigger exploded"
    assert task_in_file(state_dir, "bad")["status"] == "error"
    assert any(
        "task bad" in r.getMessage() and "trigger exploded" in r.getMessage()
        for r in caplog.records
    )
    await dispatcher.stop()


async def test_the_timer_is_re_armed_after_a_raising_trigger(
    make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    # The scheduler's own wake-ups, on the real clock: a 1 s task keeps its pace.
    dispatcher = make_dispatcher()
    await add(dispatcher, "bad")
    await add(dispatcher, "good")
    ran = recorder.started["good"] = asyncio.Event()
    await dispatcher.start()  # its first pass is queued on the loop, not run yet
    dispatcher.scheduler.modify_job("bad", trigger=ExplodingTrigger())
    await asyncio.wait_for(ran.wait(), 10)
    ran.clear()
    await asyncio.wait_for(ran.wait(), 10)  # a second run: the timer was armed again
    assert recorder.count("good") == 2
    assert dispatcher.get_task("bad").status is TaskStatus.ERROR
    await dispatcher.stop()


async def test_a_schedule_raising_at_load_or_start_stops_only_its_task(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = make_dispatcher()
    await add(first, "good")
    await add(first, "at-load", valid_time_range=[3, 4])
    await add(first, "at-start", valid_time_range=[3, 4])
    await first.stop()
    state = read_state(state_dir)
    for task in state["tasks"]:
        if task["task_id"] == "at-load":
            task["next_execution_time"] = None  # the loader has to plan it
    (state_dir / "dispatch_config.json").write_bytes(orjson.dumps(state))

    real_of = Schedule.of.__func__  # type: ignore[attr-defined]

    def of(cls: type[Schedule], record: TaskRecord, zone: Any) -> Schedule:
        if record.task_id == "at-load":  # planning it while loading raises
            raise RuntimeError("cannot plan at-load")
        return real_of(cls, record, zone)  # type: ignore[no-any-return]

    real_trigger = JobView.trigger

    def trigger(self: JobView, record: TaskRecord) -> TaskTrigger:
        if record.task_id == "at-start":  # building its job at start raises
            raise RuntimeError("cannot plan at-start")
        return real_trigger(self, record)

    monkeypatch.setattr(Schedule, "of", classmethod(of))
    monkeypatch.setattr(JobView, "trigger", trigger)
    with caplog.at_level(logging.ERROR):
        dispatcher = make_dispatcher()
        await dispatcher.start()
        for second in range(1, 4):
            clock.move_to(at(2026, 1, 8, 7, 0) + timedelta(seconds=second))
            await dispatcher.run_pending()
    assert recorder.count("good") == 3
    assert [r.task_id for r in dispatcher.list_tasks()] == ["good", "at-start"]
    assert dispatcher.get_task("at-start").status is TaskStatus.ERROR
    assert "cannot plan at-start" in (dispatcher.get_task("at-start").last_error or "")
    messages = [r.getMessage() for r in caplog.records]
    assert any("task at-load could not be restored" in m for m in messages)
    assert any("task at-start" in m and "cannot plan at-start" in m for m in messages)
    await dispatcher.stop()
    kept = task_in_file(state_dir, "at-load")  # kept verbatim, not lost
    assert kept["next_execution_time"] is None
    assert task_in_file(state_dir, "at-start")["status"] == "error"


async def test_a_pass_leaves_the_hosts_collector_alone(
    clock: Any, make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "a")
    await dispatcher.start()
    during: list[bool] = []
    store = dispatcher._store
    real = store.update_job

    def update_job(job: Any) -> None:  # APScheduler moving the job's next run, in the pass
        during.append(gc.isenabled())
        real(job)

    monkeypatch.setattr(store, "update_job", update_job)
    assert gc.isenabled()
    clock.move_to(at(2026, 1, 8, 7, 0) + timedelta(seconds=1))
    await dispatcher.run_pending()
    assert during == [True]  # the collector is the host's: a pass does not hold it off
    assert gc.isenabled()
    await dispatcher.stop()


async def test_apscheduler_listeners_hear_of_every_submission_and_run(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    """Events are made and handed out only while someone listens; then all of them are."""
    dispatcher = make_dispatcher()
    await add(dispatcher, "ok")
    await add(dispatcher, "bad")
    recorder.fail.add("bad")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 7, 0) + timedelta(seconds=1))
    await dispatcher.run_pending()  # nobody listens
    heard: list[tuple[int, str]] = []
    dispatcher.scheduler.add_listener(
        lambda event: heard.append((event.code, event.job_id)),
        EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR,
    )
    clock.move_to(at(2026, 1, 8, 7, 0) + timedelta(seconds=2))
    await dispatcher.run_pending()
    assert sorted(heard) == sorted(
        [
            (EVENT_JOB_SUBMITTED, "ok"),
            (EVENT_JOB_SUBMITTED, "bad"),
            (EVENT_JOB_EXECUTED, "ok"),
            (EVENT_JOB_ERROR, "bad"),
        ]
    )
    await dispatcher.stop()
