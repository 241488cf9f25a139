"""The dispatcher's clock: a ``clock=`` object the host moves decides what is due, the hour
windows, end times and retries, and the system's clock is not consulted for any of them.

The fake clock here is a plain object set years before the real date: a decision that read
the system's clock instead would find every run long overdue and every end time passed.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import SHANGHAI, add, at, seed_file, seed_task

from jobstores import JsonJobStore
from scheduler import RunSucceeded, TaskDispatcher
from tasks import TaskStatus
from tasks.clock import SYSTEM_CLOCK, Clock, resolve_clock

MakeDispatcher = Callable[..., TaskDispatcher]

START = at(2011, 3, 5, 7, 0)
"""The fake clock's first reading: years before any real date the tests run on."""
HALF_HOUR = datetime.timedelta(minutes=30)


class FakeClock:
    """A clock that stands still until the test moves it."""

    def __init__(self, now: datetime.datetime) -> None:
        self.current = now
        self.reads = 0

    def now(self) -> datetime.datetime:
        self.reads += 1
        return self.current

    def move_to(self, when: datetime.datetime) -> None:
        self.current = when


class ClockedRuns:
    """A task manager factory whose runs note the fake clock's time when they run."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.runs: list[tuple[str, datetime.datetime]] = []
        self.fail: set[str] = set()

    def __call__(self, **kwargs: Any) -> ClockedManager:
        return ClockedManager(self, kwargs["task_id"])


class ClockedManager:
    def __init__(self, owner: ClockedRuns, task_id: str) -> None:
        self.owner = owner
        self.task_id = task_id

    async def run(self) -> None:
        self.owner.runs.append((self.task_id, self.owner.clock.current))
        if self.task_id in self.owner.fail:
            raise ValueError(f"boom in {self.task_id}")


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def runs(fake_clock: FakeClock) -> ClockedRuns:
    return ClockedRuns(fake_clock)


@pytest.fixture
def clocked(
    make_dispatcher: MakeDispatcher, fake_clock: FakeClock, runs: ClockedRuns
) -> TaskDispatcher:
    return make_dispatcher(clock=fake_clock, task_manager_factory=runs)


async def pass_at(dispatcher: TaskDispatcher, clock: FakeClock, when: datetime.datetime) -> None:
    clock.move_to(when)
    await dispatcher.run_pending()


async def test_a_due_task_runs_when_the_clock_says_within_its_window_until_its_end(
    clocked: TaskDispatcher, fake_clock: FakeClock, runs: ClockedRuns, state_dir: Path
) -> None:
    task_id = await add(
        clocked,
        interval=3600,
        valid_time_range=[8, 12],
        task_end_time=datetime.datetime(2011, 3, 6, 9, 0),
    )
    record = clocked.get_task(task_id)
    assert record.next_execution_time == at(2011, 3, 5, 8, 0)  # the window opens at 8
    assert record.created_at == START
    await clocked.start()

    await pass_at(clocked, fake_clock, at(2011, 3, 5, 7, 59, 59))
    assert runs.runs == []  # not due yet by the fake clock
    await pass_at(clocked, fake_clock, at(2011, 3, 5, 8, 0))
    assert runs.runs == [(task_id, at(2011, 3, 5, 8, 0))]
    await pass_at(clocked, fake_clock, at(2011, 3, 5, 8, 30))
    assert len(runs.runs) == 1  # the next run is at 9
    # Through the rest of the day and the next morning, half-hourly: the window (8-12) and
    # the end (the 6th at 9:00, the last start) by the fake clock.
    for half_hours in range(2, 52):
        await pass_at(clocked, fake_clock, at(2011, 3, 5, 8, 0) + half_hours * HALF_HOUR)
    assert [when for _, when in runs.runs] == [
        at(2011, 3, 5, 8, 0),
        at(2011, 3, 5, 9, 0),
        at(2011, 3, 5, 10, 0),
        at(2011, 3, 5, 11, 0),
        at(2011, 3, 6, 8, 0),
        at(2011, 3, 6, 9, 0),
    ]
    record = clocked.get_task(task_id)
    assert record.status is TaskStatus.COMPLETED
    assert record.next_execution_time is None
    assert record.last_execution_time == at(2011, 3, 6, 9, 0)  # stamped by the fake clock
    assert record.updated_at == at(2011, 3, 6, 9, 0)
    entries = clocked.runs(task_id)
    assert {entry.started_at.year for entry in entries if entry.started_at} == {2011}
    history = clocked._history
    assert history is not None
    assert history.prune(timeout=10)  # 30 days' retention by the fake clock: all are kept
    assert len(clocked.runs(task_id)) == len(entries) == 6
    await clocked.stop()


async def test_retries_and_listener_events_follow_the_clock(
    clocked: TaskDispatcher, fake_clock: FakeClock, runs: ClockedRuns
) -> None:
    task_id = await add(clocked, run_policy={"retries": 1, "retry_delay": 120})
    runs.fail.add(task_id)
    seen: list[datetime.datetime] = []
    clocked.add_listener(lambda event: seen.append(event.at), [RunSucceeded])
    await clocked.start()
    await pass_at(clocked, fake_clock, at(2011, 3, 5, 8, 0))
    retry = clocked.get_task(task_id).retry
    assert retry is not None
    assert retry.at == at(2011, 3, 5, 8, 2)
    timer = clocked._path.retries._timer  # the retry timer: 120 s out by the fake clock
    assert timer is not None
    assert 110 < timer.when() - asyncio.get_running_loop().time() <= 120
    await pass_at(clocked, fake_clock, at(2011, 3, 5, 8, 1, 59))
    assert len(runs.runs) == 1  # the retry waits for the fake clock
    runs.fail.discard(task_id)
    await pass_at(clocked, fake_clock, at(2011, 3, 5, 8, 2))
    assert [when for _, when in runs.runs] == [at(2011, 3, 5, 8, 0), at(2011, 3, 5, 8, 2)]
    assert clocked.get_task(task_id).retry is None
    await clocked.stop()
    assert seen == [at(2011, 3, 5, 8, 2)]


async def test_a_reloaded_dispatcher_decides_by_the_clock(
    make_dispatcher: MakeDispatcher, fake_clock: FakeClock, runs: ClockedRuns
) -> None:
    first = make_dispatcher(clock=fake_clock, task_manager_factory=runs)
    task_id = await add(first, valid_time_range=[8, 12])
    first.close()
    fake_clock.move_to(at(2011, 3, 5, 13, 0))  # the 8:00 run was missed; the window is shut
    again = make_dispatcher(clock=fake_clock, task_manager_factory=runs)
    await again.start()
    await again.run_pending()
    assert runs.runs == []
    assert again.get_task(task_id).next_execution_time == at(2011, 3, 6, 8, 0)
    await pass_at(again, fake_clock, at(2011, 3, 6, 8, 0))
    assert runs.runs == [(task_id, at(2011, 3, 6, 8, 0))]
    await again.stop()


def test_a_task_without_a_next_run_is_planned_at_load_by_the_clock(
    make_dispatcher: MakeDispatcher, fake_clock: FakeClock, runs: ClockedRuns, state_dir: Path
) -> None:
    task = seed_task(
        "seeded",
        task_end_time="2011-04-01",
        last_execution_time=None,
        next_execution_time=None,
        created_at="2011-03-01T00:00:00",
        updated_at="2011-03-01T00:00:00",
    )
    state_dir.mkdir()
    (state_dir / "dispatch_config.json").write_bytes(seed_file([task]))
    # In the window (8-22): the first run is now. The clock may tell the time in any zone.
    fake_clock.move_to(at(2011, 3, 5, 10, 30).astimezone(datetime.UTC))
    dispatcher = make_dispatcher(clock=fake_clock, task_manager_factory=runs)
    planned = dispatcher.get_task("seeded").next_execution_time
    assert planned == at(2011, 3, 5, 10, 30)
    assert planned is not None
    assert planned.tzinfo is SHANGHAI  # in the dispatcher's zone
    dispatcher.close()


def test_a_clock_without_now_is_refused_naming_the_field(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    with pytest.raises(TypeError, match=r"^clock: must have a now\(\) method, not str$"):
        make_dispatcher(clock="2011-03-05")
    assert not state_dir.exists()  # nothing created


def test_the_system_clock_is_the_default_and_reads_at_each_call(tmp_path: Path) -> None:
    assert resolve_clock(None) is SYSTEM_CLOCK
    assert isinstance(SYSTEM_CLOCK, Clock)
    first = SYSTEM_CLOCK.now()
    assert first.tzinfo is datetime.UTC
    assert SYSTEM_CLOCK.now() >= first
    store = JsonJobStore(tmp_path, timezone=SHANGHAI)
    try:
        assert store.clock is SYSTEM_CLOCK
        assert store.now().tzinfo is SHANGHAI
    finally:
        store.close()
