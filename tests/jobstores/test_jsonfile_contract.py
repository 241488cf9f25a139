"""JsonJobStore against APScheduler's job store interface, and the file after each call."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from helpers import (
    BACKENDS,
    SHANGHAI,
    T0,
    Recorder,
    read_state,
    record,
    store_options,
    task_in_file,
)

from jobstores import JsonJobStore
from scheduler.errors import DirectoryLockedError, InvalidTaskError, TaskNotFoundError
from tasks import TaskStatus
from tasks.events import DispatcherEvent


def job_of(store: JsonJobStore, task_id: str) -> Any:
    job = store.lookup_job(task_id)
    assert job is not None
    return job


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs over each storage backend: one contract."""
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path, recorder: Recorder, backend: str) -> Iterator[JsonJobStore]:
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0, **store_options(backend, tmp_path))
    scheduler = BackgroundScheduler(timezone=SHANGHAI)
    store.start(scheduler, "default")
    yield store
    store.close()


def test_added_tasks_become_jobs_and_are_saved(store: JsonJobStore, tmp_path: Path) -> None:
    store.add_tasks([record("a"), record("b", at=T0 + timedelta(minutes=5))])
    assert store.save()
    job = job_of(store, "a")
    assert job is not None
    assert job.id == "a"
    assert job.next_run_time == T0
    assert job.coalesce is True
    assert job.misfire_grace_time is None
    assert job.max_instances == 1
    assert store.lookup_job("missing") is None
    assert [t["task_id"] for t in read_state(tmp_path)["tasks"]] == ["a", "b"]
    assert read_state(tmp_path)["account_tasks"] == {"acc": ["a", "b"]}


def test_get_due_jobs_and_next_run_time(store: JsonJobStore) -> None:
    store.add_tasks(
        [
            record("late", at=T0 + timedelta(hours=2)),
            record("early", at=T0),
            record("mid", at=T0 + timedelta(hours=1)),
        ]
    )
    assert store.get_due_jobs(T0 - timedelta(seconds=1)) == []
    assert [j.id for j in store.get_due_jobs(T0)] == ["early"]
    assert [j.id for j in store.get_due_jobs(T0 + timedelta(hours=1))] == ["early", "mid"]
    assert store.get_next_run_time() == T0
    # Comparisons happen on instants, whatever the zone of ``now``.
    assert [j.id for j in store.get_due_jobs(T0.astimezone(UTC))] == ["early"]


def test_a_pass_takes_at_most_pass_limit_due_jobs(store: JsonJobStore) -> None:
    store.pass_limit = 2
    store.add_tasks([record(f"t{i}", at=T0 + timedelta(seconds=i)) for i in range(5)])
    now = T0 + timedelta(minutes=1)
    assert [j.id for j in store.get_due_jobs(now)] == ["t0", "t1"]  # the earliest first
    assert store.get_next_run_time() == T0  # the others stay due for the next pass


def test_get_all_jobs_sorts_paused_last(store: JsonJobStore) -> None:
    store.add_tasks(
        [
            record("paused", status=TaskStatus.PAUSED, at=None),
            record("second", at=T0 + timedelta(hours=1)),
            record("first"),
        ]
    )
    assert [j.id for j in store.get_all_jobs()] == ["first", "second", "paused"]
    assert job_of(store, "paused").next_run_time is None


def test_completed_tasks_have_no_job(store: JsonJobStore) -> None:
    store.add_tasks([record("done", status=TaskStatus.COMPLETED, at=None)])
    assert store.lookup_job("done") is None
    assert store.get_next_run_time() is None


def test_update_job_moves_the_record_and_saves(store: JsonJobStore, tmp_path: Path) -> None:
    store.add_tasks([record("a"), record("b", at=T0 + timedelta(minutes=30))])
    job = job_of(store, "a")
    later = T0 + timedelta(hours=1)
    job._modify(next_run_time=later)
    store.update_job(job)
    assert store.table.get("a").next_execution_time == later
    assert store.save()  # APScheduler's calls only request a save (they hold the table lock)
    assert task_in_file(tmp_path, "a")["next_execution_time"] == later.isoformat()
    assert [j.id for j in store.get_all_jobs()] == ["b", "a"]
    assert [j.id for j in store.get_due_jobs(T0 + timedelta(minutes=45))] == ["b"]


def test_update_job_to_none_pauses_and_back_resumes(store: JsonJobStore, tmp_path: Path) -> None:
    store.add_tasks([record("a")])
    job = job_of(store, "a")
    job._modify(next_run_time=None)
    store.update_job(job)
    assert store.save()
    assert task_in_file(tmp_path, "a")["status"] == "paused"
    job._modify(next_run_time=T0)
    store.update_job(job)
    assert store.save()
    assert task_in_file(tmp_path, "a")["status"] == "pending"


def test_remove_job_completes_the_task_and_keeps_the_record(
    store: JsonJobStore, tmp_path: Path
) -> None:
    store.add_tasks([record("a"), record("b")])
    store.remove_job("a")
    assert store.lookup_job("a") is None
    assert store.save()
    saved = task_in_file(tmp_path, "a")
    assert saved["status"] == "completed"
    assert saved["next_execution_time"] is None
    assert read_state(tmp_path)["account_tasks"] == {"acc": ["a", "b"]}


def test_remove_job_waits_for_an_in_flight_run(store: JsonJobStore) -> None:
    store.add_tasks([record("a")])
    store.runs_waiting = {"a"}.__contains__  # a run of "a" waits for its lane
    store.remove_job("a")
    assert store.table.get("a").status is TaskStatus.PENDING
    store.run_settled("a")
    assert store.table.get("a").status is TaskStatus.COMPLETED


def test_a_pass_stamps_its_changes_with_one_reading_of_the_clock(
    store: JsonJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_tasks([record("a"), record("b"), record("c")])
    readings = iter([T0 + timedelta(seconds=s) for s in range(1, 10)])
    monkeypatch.setattr(store, "now", lambda: next(readings))
    later = T0 + timedelta(hours=1)
    with store.calls.deferred_saves():  # what a scheduler pass runs in
        for task_id in ("a", "b"):
            job = job_of(store, task_id)
            job._modify(next_run_time=later)
            store.update_job(job)
    job = job_of(store, "c")
    job._modify(next_run_time=later)
    store.update_job(job)
    assert (
        store.table.get("a").updated_at
        == store.table.get("b").updated_at
        == T0 + timedelta(seconds=1)
    )
    assert store.table.get("c").updated_at == T0 + timedelta(seconds=2)  # after the pass: read anew


def test_run_settled_says_whether_it_changed_the_record(store: JsonJobStore) -> None:
    store.add_tasks([record("a"), record("b")])
    store.runs_waiting = {"a", "b"}.__contains__  # a run of each waits for its lane
    assert store.run_settled("a") is False  # still planned: nothing to save
    store.remove_job("b")  # no further run, while one is out
    assert store.run_settled("b") is True
    assert store.table.get("b").status is TaskStatus.COMPLETED


def test_the_schedulers_changes_announce_their_events_once(store: JsonJobStore) -> None:
    told: list[DispatcherEvent] = []
    store.on_events = told.extend
    store.add_tasks([record("a"), record("b")])  # the caller's own change: it tells
    store.runs_waiting = {"a"}.__contains__  # a run of "a" waits for its lane
    store.remove_job("a")  # its last run is out: completed when it is over
    assert told == []
    store.run_settled("a")
    store.runs_waiting = set().__contains__
    store.remove_job("b")
    store.run_settled("b")  # completed already: nothing more to say
    assert [(event.kind, event.task_id) for event in told] == [
        ("task_completed", "a"),
        ("task_completed", "b"),
    ]


def test_remove_all_jobs_completes_every_task(store: JsonJobStore, tmp_path: Path) -> None:
    store.add_tasks([record("a"), record("b")])
    store.remove_all_jobs()
    assert store.get_all_jobs() == []
    assert store.save()
    assert {t["status"] for t in read_state(tmp_path)["tasks"]} == {"completed"}


def test_unknown_and_conflicting_jobs(store: JsonJobStore) -> None:
    store.add_tasks([record("a")])
    job = job_of(store, "a")
    with pytest.raises(ConflictingIdError):
        store.add_job(job)
    with pytest.raises(JobLookupError):
        store.remove_job("missing")
    store.remove_task("a")
    with pytest.raises(JobLookupError):
        store.update_job(job)
    with pytest.raises(ValueError, match="add_task"):
        store.add_job(job)


def test_add_job_attaches_to_its_record(store: JsonJobStore) -> None:
    store.add_tasks([record("a")])
    job = job_of(store, "a")
    store._jobs.drop("a")
    job._modify(next_run_time=T0 + timedelta(minutes=1))
    store.add_job(job)
    assert store.table.get("a").next_execution_time == T0 + timedelta(minutes=1)


def test_remove_task_deletes_the_record(store: JsonJobStore, tmp_path: Path) -> None:
    store.add_tasks([record("a"), record("b")])
    store.remove_task("a")
    store.save()
    assert [t["task_id"] for t in read_state(tmp_path)["tasks"]] == ["b"]
    assert store.lookup_job("a") is None
    with pytest.raises(TaskNotFoundError):
        store.remove_task("a")


def test_add_tasks_is_all_or_nothing(store: JsonJobStore, recorder: Recorder) -> None:
    store.add_tasks([record("a")])
    with pytest.raises(InvalidTaskError, match="task_id"):
        store.add_tasks([record("b"), record("a")])
    with pytest.raises(InvalidTaskError, match="duplicate"):
        store.add_tasks([record("c"), record("c")])
    assert [r.task_id for r in store.table.records()] == ["a"]


def test_reorder(store: JsonJobStore) -> None:
    store.add_tasks([record("a"), record("b"), record("c"), record("x", account="other")])
    store.reorder("c", 0)
    assert store.table.account_tasks() == {"acc": ["c", "a", "b"], "other": ["x"]}
    assert store.table.position("c") == 0
    with pytest.raises(InvalidTaskError, match="position"):
        store.reorder("a", 3)


@pytest.mark.parametrize("size", [3, 300], ids=["small account", "large account"])
def test_ranks_order_tasks_as_their_positions_after_every_change(
    store: JsonJobStore, tmp_path: Path, backend: str, size: int
) -> None:
    # A run's lane asks for its task's rank; a large account keeps one per task, which must
    # order the tasks as the order list does after every kind of change.
    def check(target: JsonJobStore = store) -> None:
        ids = target.table.account_tasks()["acc"]
        assert [target.table.position(task_id) for task_id in ids] == list(range(len(ids)))
        ranks = [target.table.rank(task_id) for task_id in ids]
        assert all(a < b for a, b in itertools.pairwise(ranks))

    store.add_tasks([record(f"t{i:03d}") for i in range(size)])
    check()
    store.reorder(f"t{size - 1:03d}", 0)
    assert store.table.position(f"t{size - 1:03d}") == 0
    check()
    store.add_tasks([record("new")])  # appended: last
    assert store.table.position("new") == size
    check()
    store.remove_task("t000")
    check()
    assert (
        store.table.rank("t000")
        == store.table.position("t000")
        == store.table.position("unknown")
        > size
    )
    for _ in range(80):  # into the same gap again and again: past what halving can rank
        store.reorder(store.table.account_tasks()["acc"][-1], 1)
        check()
    store.reorder(
        store.table.account_tasks()["acc"][1], len(store.table.account_tasks()["acc"]) - 1
    )
    check()
    store.save()
    store.close()
    again = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0, **store_options(backend, tmp_path))
    try:
        check(again)
    finally:
        again.close()


def test_reopening_restores_records_without_creating_managers(
    store: JsonJobStore, tmp_path: Path, recorder: Recorder, backend: str
) -> None:
    store.add_tasks([record("a"), record("b", account="other", run_count=3)])
    store.reorder("a", 0)
    store.save()
    before = store.table.records()
    store.close()
    recorder.created.clear()
    again = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0, **store_options(backend, tmp_path))
    try:
        assert again.table.records() == before
        assert recorder.created == []  # managers belong to the run backend, not the store
    finally:
        again.close()


def test_one_owner_per_directory(store: JsonJobStore, tmp_path: Path, recorder: Recorder) -> None:
    with pytest.raises(DirectoryLockedError, match=str(tmp_path)):
        JsonJobStore(tmp_path, timezone=SHANGHAI)
    store.close()
    again = JsonJobStore(tmp_path, timezone=SHANGHAI)
    again.close()


def test_concurrent_saves_share_writes(
    store: JsonJobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    backend = store._storage
    real_commit = backend.commit
    gate = threading.Event()

    def slow_commit(image: Any, saved_at: Any) -> None:
        writes.append(len(image.changed))
        gate.wait(5)
        real_commit(image, saved_at)

    monkeypatch.setattr(backend, "commit", slow_commit)
    store.add_tasks([record("first")])
    leader = threading.Thread(target=store.save)
    leader.start()
    while not writes:  # the leader is inside its write
        threading.Event().wait(0.001)
    followers = []
    for n in range(8):
        store.add_tasks([record(f"t{n}")])
        followers.append(threading.Thread(target=store.save))
        followers[-1].start()
    gate.set()
    for thread in [leader, *followers]:
        thread.join(5)
    # One write for the leader, one shared by all eight followers.
    assert writes == [1, 8]
    assert len(read_state(tmp_path)["tasks"]) == 9
    assert store.save_health.unsaved_task_ids == ()
