"""APScheduler's view of the table: the due index follows every record change, jobs are built
from the records, and the table's account order is rebuilt from the document's."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from helpers import SHANGHAI, T0, record

from jobstores import JsonJobStore
from jobstores.jobs import JobView, TaskTrigger
from jobstores.table import TaskTable
from tasks import TaskStatus, lifecycle
from tasks.model import TaskRecord
from tasks.schedule import Schedule


def _run() -> None:  # pragma: no cover - never called: the view only files jobs
    raise AssertionError


def _instant(r: TaskRecord) -> float:
    when = None if r.status is TaskStatus.PAUSED else r.start_time
    return math.inf if when is None else when.timestamp()


class Model:
    """A table with a view over it, and what the view must hold, computed from scratch."""

    def __init__(self) -> None:
        self.table = TaskTable()
        self.view = JobView(SHANGHAI, _run, self.table.find)
        self.table.listen(self.view.sync)
        self.view.attach(object(), "default", [])
        self.dropped: set[str] = set()

    def update(self, task_id: str, change: Any) -> None:
        old = self.table.get(task_id)
        if self.table.update(task_id, change) is not old:
            self.dropped.discard(task_id)  # a record change gives the job back

    def expected(self) -> list[str]:
        filed = [
            (_instant(r), r.task_id)
            for r in self.table.records()
            if lifecycle.schedulable(r) and r.task_id not in self.dropped
        ]
        return [task_id for _, task_id in sorted(filed)]

    def check(self, now: datetime) -> None:
        expected = self.expected()
        assert self.view.ids() == expected
        jobs, faults = self.view.all()
        assert faults == []
        assert [job.id for job in jobs] == expected
        due, _ = self.view.due(now)
        assert [job.id for job in due] == [
            task_id for task_id in expected if _instant(self.table.get(task_id)) <= now.timestamp()
        ]
        first = next(iter(expected), None)
        if first is None or _instant(self.table.get(first)) == math.inf:
            assert self.view.next_run_time() is None
        else:
            assert self.view.next_run_time() == self.table.get(first).start_time


def test_the_index_follows_every_change() -> None:
    """Random adds, moves, pauses, resumes, removals, drops and re-admissions, checked
    against the index computed from the records after each one."""
    rng = random.Random(7)
    model = Model()
    times = [T0 + timedelta(minutes=rng.randrange(0, 120)) for _ in range(12)]  # many ties
    for step in range(1500):
        ids = [r.task_id for r in model.table.records()]
        action = rng.random()
        if action < 0.2 or len(ids) < 3:
            task_id = f"t{step}"
            model.table.add([record(task_id, at=rng.choice(times))])
        elif action < 0.45:
            task_id = rng.choice(ids)
            when = rng.choice([*times, None])
            model.update(task_id, lambda r, when=when: lifecycle.planned(r, when, T0))
        elif action < 0.55:
            task_id = rng.choice(ids)
            start = rng.choice(times)
            model.update(task_id, lambda r, start=start: r.replace(next_start_time=start))
        elif action < 0.65:
            task_id = rng.choice(ids)
            model.table.remove(task_id)
            model.dropped.discard(task_id)
        elif action < 0.75:
            task_id = rng.choice(ids)
            model.update(
                task_id, lambda r: r.replace(status=TaskStatus.COMPLETED, next_execution_time=None)
            )
        elif action < 0.85:
            task_id = rng.choice(ids)
            if task_id in model.view:
                model.view.drop(task_id)
                model.dropped.add(task_id)
        elif action < 0.88:
            task_id = rng.choice(ids)  # a run's progress, or an edit of its rules
            interval = rng.choice([3600, 7200])
            model.update(
                task_id,
                lambda r, interval=interval: r.replace(
                    run_count=r.run_count + 1, interval=interval
                ),
            )
        elif action < 0.9:
            task_id = rng.choice(ids)  # a run starts, ends, fails; a pause by hand
            status = rng.choice(list(TaskStatus))
            model.update(task_id, lambda r, status=status: r.replace(status=status))
        elif action < 0.92:
            if model.dropped:
                task_id = rng.choice(sorted(model.dropped))
                model.view.readmit(task_id)
                model.dropped.discard(task_id)
        else:
            # The scheduler's pass: every due job moved on by its interval.
            now = rng.choice(times)
            for job in model.view.due(now)[0]:
                later = job.next_run_time + timedelta(hours=1)
                model.update(job.id, lambda r, later=later: lifecycle.planned(r, later, T0))
        model.check(rng.choice(times))


def test_a_changed_record_gives_a_dropped_job_back() -> None:
    model = Model()
    model.table.add([record("a"), record("b", at=T0 + timedelta(minutes=1))])
    model.view.drop("a")
    assert "a" not in model.view
    assert model.view.ids() == ["b"]
    model.table.update("a", lambda r: r.replace(run_count=1))
    assert model.view.ids() == ["a", "b"]


def test_the_view_is_empty_until_attached() -> None:
    table = TaskTable()
    view = JobView(SHANGHAI, _run, table.find)
    table.listen(view.sync)
    table.add([record("a")])
    assert "a" not in view
    assert view.lookup("a") is None
    view.attach(object(), "default", table.records())
    assert view.ids() == ["a"]
    view.detach()
    assert view.ids() == []
    assert "a" not in view


def test_attaching_files_records_in_any_order_by_instant_then_id() -> None:
    """A loaded table lists its records in file order; the index is sorted by (instant, id)
    all the same: ties broken by id, paused tasks last, unplanned ones not filed."""
    rng = random.Random(3)
    times = [T0 + timedelta(minutes=m) for m in (0, 5, 5, 30)]
    records = [
        record(f"t{i:02d}", at=rng.choice([*times, None]), status=status)
        for i, status in enumerate(
            rng.choice([TaskStatus.PENDING, TaskStatus.PAUSED, TaskStatus.ERROR]) for _ in range(40)
        )
    ]
    rng.shuffle(records)
    view = JobView(SHANGHAI, _run, {r.task_id: r for r in records}.get)
    assert view.attach(object(), "default", records) == []
    filed = sorted((_instant(r), r.task_id) for r in records if lifecycle.schedulable(r))
    assert view.ids() == [task_id for _, task_id in filed]
    assert [job.id for job in view.all()[0]] == view.ids()
    assert {_instant(r) for r in records if r.status is TaskStatus.PAUSED} == {math.inf}
    assert view.ids()[-1] in {r.task_id for r in records if r.status is TaskStatus.PAUSED}
    due, _ = view.due(T0 + timedelta(minutes=5))
    assert [job.id for job in due] == [t for when, t in filed if when <= times[2].timestamp()]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JsonJobStore]:
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0)
    store.start(BackgroundScheduler(timezone=SHANGHAI), "default")
    yield store
    store.close()


def test_jobs_are_built_from_the_record_every_time(store: JsonJobStore) -> None:
    store.add_tasks([record("a"), record("b", interval=3600)])
    job = store.lookup_job("a")
    assert job is not None
    assert store.lookup_job("a") is not job
    job._modify(next_run_time=T0 + timedelta(hours=5))  # not handed back: nothing changes
    assert store.get_next_run_time() == T0
    assert store.table.get("a").next_execution_time == T0
    shared = [j.trigger for j in store.get_all_jobs()]
    assert isinstance(shared[0], TaskTrigger)
    assert shared[0] is shared[1]  # equal rules, one trigger


def test_a_trigger_answers_the_same_question_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler pass asks a job's trigger for the run after the same time twice (finding
    its run times, then moving it): the second answer is the first one."""
    trigger = TaskTrigger.for_record(record("a", interval=600), SHANGHAI)
    asked: list[datetime | None] = []
    real = Schedule.next_run

    def next_run(self: Schedule, previous: datetime | None, now: datetime) -> datetime | None:
        asked.append(previous)
        return real(self, previous, now)

    monkeypatch.setattr(Schedule, "next_run", next_run)
    now = T0 + timedelta(minutes=1)
    first = trigger.get_next_fire_time(T0, now)
    assert trigger.get_next_fire_time(T0, now) is first
    assert asked == [T0]
    # Another question (even an equal one, asked anew) is answered anew.
    assert trigger.get_next_fire_time(T0, T0 + timedelta(minutes=1)) == first
    assert trigger.get_next_fire_time(first, now) == T0 + timedelta(minutes=20)
    assert asked == [T0, T0, first]


def test_a_job_that_cannot_be_built_is_faulted_and_the_others_are_due(
    store: JsonJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_tasks([record("bad"), record("good")])
    real = JobView.trigger

    def trigger(self: JobView, r: TaskRecord) -> Any:
        if r.task_id == "bad":
            raise RuntimeError("cannot plan bad")
        return real(self, r)

    monkeypatch.setattr(JobView, "trigger", trigger)
    assert [job.id for job in store.get_due_jobs(T0)] == ["good"]
    bad = store.table.get("bad")
    assert bad.status is TaskStatus.ERROR
    assert bad.last_error == "scheduling failed: RuntimeError: cannot plan bad"
    assert store.lookup_job("bad") is None


def test_the_account_order_is_rebuilt_from_the_documents() -> None:
    """The hint orders each account's tasks; ids it names under another account, or not at
    all, are ignored; tasks it does not place follow in file order; kept ids keep their
    place after the restored ones."""
    table = TaskTable()
    records = [
        record("a1", account="a"),
        record("b1", account="b"),
        record("a2", account="a"),
        record("c1", account="c"),
        record("a3", account="a"),
        record("d1", account="d"),
    ]
    hint = {
        "b": ["b1", "a1", "kept-b", "gone"],
        "a": ["a3", "a1", "kept-a"],
        "x": ["kept-x"],
    }
    kept = [({"task_id": "kept-a"}, "kept-a"), ({"task_id": "kept-b"}, "kept-b")]
    table.load(records, kept, hint)
    assert table.account_tasks() == {"b": ["b1"], "a": ["a3", "a1", "a2"], "c": ["c1"], "d": ["d1"]}
    assert list(table.account_tasks()) == ["b", "a", "c", "d"]
    image = table.capture()
    assert image.account_tasks == {
        "b": ["b1", "kept-b"],
        "a": ["a3", "a1", "a2", "kept-a"],
        "c": ["c1"],
        "d": ["d1"],
    }
    ordered = table.account_tasks()["a"]
    assert ordered[0] is records[4].task_id  # the record's own string, not the hint's copy
