"""The run history: what a dispatcher records, how it is queried, pruned and kept out of the way."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from helpers import SHANGHAI, Recorder, at, task_in_file

from scheduler import HistoryUnavailableError, RunHistory, TaskDispatcher
from scheduler.cli import main
from scheduler.history import HISTORY_FILENAME, read_runs
from tasks.runs import RunEvent, RunEventKind, RunRequest

MakeDispatcher = Callable[..., TaskDispatcher]
DAY0 = datetime(2026, 1, 1, tzinfo=UTC)


async def add(dispatcher: TaskDispatcher, task_id: str, account: str = "account_1") -> str:
    return await dispatcher.add_task(
        sys_type="mac_intel",
        task_type="xhs_type",
        xhs_account_id=account,
        interval=3600,
        valid_time_range=[8, 22],
        task_id=task_id,
    )


def request(
    run_id: str, task_id: str = "t1", account: str = "a1", scheduled: datetime = DAY0
) -> RunRequest:
    return RunRequest(
        run_id=run_id,
        task_id=task_id,
        account_id=account,
        sys_type="mac_intel",
        task_type="xhs_type",
        kwargs={},
        scheduled_at=scheduled,
        submitted_at=scheduled,
    )


def record_run(
    history: RunHistory,
    run_id: str,
    *,
    task_id: str = "t1",
    account: str = "a1",
    start: datetime = DAY0,
    seconds: float = 2.0,
    kind: RunEventKind = RunEventKind.SUCCEEDED,
) -> None:
    """Record a whole run (started, then finished ``seconds`` later)."""
    req = request(run_id, task_id, account, start)
    history.record(req, RunEvent(run_id, task_id, RunEventKind.STARTED, start))
    error = None if kind is RunEventKind.SUCCEEDED else "ValueError: boom"
    end = start + timedelta(seconds=seconds)
    history.record(req, RunEvent(run_id, task_id, kind, end, error=error, started_at=start))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def history_at(tmp_path: Path) -> Iterator[Callable[..., RunHistory]]:
    made: list[RunHistory] = []

    def make(**options: Any) -> RunHistory:
        options.setdefault("clock", Clock(DAY0))
        history = RunHistory(tmp_path / HISTORY_FILENAME, **options)
        made.append(history)
        return history

    yield make
    for history in made:
        history.close()


# ---------------------------------------------------------------------- through a dispatcher


async def test_success_and_failure_runs_are_recorded(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "good", "account_1")
    await add(dispatcher, "bad", "account_2")
    recorder.fail.add("bad")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()

    assert dispatcher.history is not None
    assert dispatcher.history.path == state_dir / HISTORY_FILENAME
    runs = {entry.task_id: entry for entry in dispatcher.runs()}
    assert set(runs) == {"good", "bad"}
    good, bad = runs["good"], runs["bad"]
    assert good.outcome == "succeeded"
    assert good.error is None
    assert good.account_id == "account_1"
    assert (good.sys_type, good.task_type, good.attempt, good.worker) == (
        "mac_intel",
        "xhs_type",
        1,
        None,
    )
    assert good.scheduled_at == at(2026, 1, 8, 8, 0)
    assert good.started_at == good.finished_at == at(2026, 1, 8, 8, 0)
    assert good.duration == 0.0
    assert good.scheduled_at.tzinfo is not None
    assert bad.outcome == "failed"
    assert bad.failed
    assert bad.error == "ValueError: boom in bad"
    assert [e.run_id for e in dispatcher.runs(failed=True)] == [bad.run_id]
    assert [e.run_id for e in dispatcher.runs("good")] == [good.run_id]
    assert [e.run_id for e in dispatcher.runs(account_id="account_2")] == [bad.run_id]
    assert good.to_json()["started_at"] == "2026-01-08T08:00:00+08:00"

    clock.move_to(at(2026, 1, 8, 9, 0))
    await dispatcher.run_pending()
    assert [e.scheduled_at.hour for e in dispatcher.runs("good")] == [9, 8]
    await dispatcher.stop()

    # The history outlives the process and is readable without owning the directory.
    again = make_dispatcher()
    assert len(again.runs()) == 4
    assert len(read_runs(state_dir, SHANGHAI, task_id="bad")) == 2
    # The task state is the same as without a history.
    assert task_in_file(state_dir, "good")["run_count"] == 2


async def test_a_run_in_progress_shows_as_running(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "slow")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    recorder.gates["slow"] = asyncio.Event()
    recorder.started["slow"] = asyncio.Event()
    pending = asyncio.create_task(dispatcher.run_pending())
    await asyncio.wait_for(recorder.started["slow"].wait(), 5)
    assert dispatcher.history is not None
    assert await asyncio.to_thread(dispatcher.history.flush)
    (entry,) = dispatcher.runs()
    assert (entry.outcome, entry.finished_at, entry.duration) == ("running", None, None)

    clock.move_to(at(2026, 1, 8, 8, 0, 5))
    recorder.gates["slow"].set()
    await asyncio.wait_for(pending, 5)
    (entry,) = dispatcher.runs()
    assert (entry.outcome, entry.duration) == ("succeeded", 5.0)
    await dispatcher.stop()


async def test_a_run_cancelled_at_stop_is_recorded_as_lost(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "stuck")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    recorder.gates["stuck"] = asyncio.Event()
    recorder.started["stuck"] = asyncio.Event()
    pending = asyncio.create_task(dispatcher.run_pending())
    await asyncio.wait_for(recorder.started["stuck"].wait(), 5)
    await dispatcher.stop(grace_period=0)
    await asyncio.gather(pending, return_exceptions=True)
    (entry,) = read_runs(state_dir)
    assert entry.outcome == "lost"
    assert entry.error is not None
    assert "stopped" in entry.error


async def test_a_failing_history_write_is_logged_and_changes_nothing_else(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "t1")
    await dispatcher.start()
    # Every insert into the history now fails, as a full or broken disk would make it.
    with sqlite3.connect(state_dir / HISTORY_FILENAME) as other:
        other.execute(
            "CREATE TRIGGER broken BEFORE INSERT ON runs "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
    clock.move_to(at(2026, 1, 8, 8, 0))
    with caplog.at_level(logging.ERROR, logger="scheduler.history"):
        await dispatcher.run_pending()
    failures = [r for r in caplog.records if r.name == "scheduler.history"]
    assert len(failures) == 1, "logged once, not once per batch"
    assert "disk on fire" in failures[0].getMessage()
    assert dispatcher.runs() == []
    assert dispatcher.history is not None
    assert dispatcher.history.dropped == 2
    # The run itself, and the task's state, are as if nothing had happened.
    assert recorder.run_ids() == ["t1"]
    saved = task_in_file(state_dir, "t1")
    assert (saved["run_count"], saved["failure_count"], saved["last_error"]) == (1, 0, None)
    assert saved["status"] == "pending"

    # Once the disk is fixed, runs are recorded again.
    with sqlite3.connect(state_dir / HISTORY_FILENAME) as other:
        other.execute("DROP TRIGGER broken")
    clock.move_to(at(2026, 1, 8, 9, 0))
    await dispatcher.run_pending()
    assert [e.outcome for e in dispatcher.runs()] == ["succeeded"]
    await dispatcher.stop()


async def test_an_observer_that_raises_does_not_affect_the_run(
    clock: Any,
    make_dispatcher: MakeDispatcher,
    recorder: Recorder,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "t1")

    def broken(request: RunRequest, event: RunEvent) -> None:
        raise RuntimeError("observer bug")

    dispatcher.observe_runs(broken)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    with caplog.at_level(logging.ERROR, logger="scheduler.ledger"):
        await dispatcher.run_pending()
    assert sum("observer" in r.getMessage() for r in caplog.records) == 2  # started, succeeded
    assert [e.outcome for e in dispatcher.runs()] == ["succeeded"]
    assert task_in_file(state_dir, "t1")["run_count"] == 1
    await dispatcher.stop()


def test_an_unusable_history_file_leaves_the_history_off(
    make_dispatcher: MakeDispatcher, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / HISTORY_FILENAME).write_bytes(b"this is not a database, " * 100)
    with caplog.at_level(logging.ERROR, logger="scheduler.history"):
        dispatcher = make_dispatcher()
    assert dispatcher.history is None
    assert any("without a run history" in r.getMessage() for r in caplog.records)
    with pytest.raises(HistoryUnavailableError, match="is off"):
        dispatcher.runs()


def test_history_can_be_turned_off_or_configured(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    off = make_dispatcher(history=False)
    assert off.history is None
    off.close()
    assert not (state_dir / HISTORY_FILENAME).exists()

    own = RunHistory(state_dir / HISTORY_FILENAME, retention=timedelta(days=7))
    dispatcher = make_dispatcher(history=own)
    assert dispatcher.history is own
    assert own.retention == timedelta(days=7)
    dispatcher.close()
    own.record(request("late"), RunEvent("late", "t1", RunEventKind.STARTED, DAY0))
    assert own.flush()  # closed with the dispatcher: ignored, nothing to wait for


# ---------------------------------------------------------------------- queries


def test_queries_by_task_account_outcome_and_time(history_at: Callable[..., RunHistory]) -> None:
    history = history_at()
    for i in range(30):
        record_run(
            history,
            f"r{i}",
            task_id=f"t{i % 3}",
            account=f"a{i % 2}",
            start=DAY0 + timedelta(minutes=i),
            kind=RunEventKind.FAILED if i % 5 == 0 else RunEventKind.SUCCEEDED,
        )
    assert history.flush()

    everything = history.query(limit=1000)
    assert [e.run_id for e in everything] == [f"r{i}" for i in reversed(range(30))]
    assert [e.run_id for e in history.query(task_id="t1", limit=3)] == ["r28", "r25", "r22"]
    assert {e.account_id for e in history.query(account_id="a1", limit=100)} == {"a1"}
    assert len(history.query(account_id="a1", limit=100)) == 15
    assert [e.run_id for e in history.query(failed=True)] == [
        "r25",
        "r20",
        "r15",
        "r10",
        "r5",
        "r0",
    ]
    assert len(history.query(failed=False)) == 24
    window = history.query(since=DAY0 + timedelta(minutes=10), until=DAY0 + timedelta(minutes=13))
    assert [e.run_id for e in window] == ["r12", "r11", "r10"]
    combined = history.query(task_id="t0", account_id="a0", failed=True)
    assert [e.run_id for e in combined] == ["r0"]  # t0 and a0: i % 6 == 0; failed: i % 5 == 0
    assert history.query(task_id="unknown") == []


def test_paging_walks_every_run_once_even_with_equal_times(
    history_at: Callable[..., RunHistory],
) -> None:
    history = history_at()
    for i in range(25):
        record_run(history, f"r{i:02d}", start=DAY0 + timedelta(minutes=i // 3))
    assert history.flush()
    seen: list[str] = []
    page = history.query(task_id="t1", limit=4)
    while page:
        seen.extend(e.run_id for e in page)
        page = history.query(task_id="t1", limit=4, before_run=page[-1].run_id)
    assert seen == [e.run_id for e in history.query(limit=100)]
    assert sorted(seen) == [f"r{i:02d}" for i in range(25)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": True}, "limit"),
        ({"since": datetime(2026, 1, 1)}, "since"),
        ({"until": datetime(2026, 1, 1)}, "until"),
        ({"before_run": "nope"}, "before_run"),
    ],
)
def test_bad_query_arguments_name_the_argument(
    history_at: Callable[..., RunHistory], arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        history_at().query(**arguments)


def test_events_out_of_order_or_repeated_keep_the_first_finish(
    history_at: Callable[..., RunHistory],
) -> None:
    history = history_at()
    req = request("r1")
    end = DAY0 + timedelta(seconds=3)
    history.record(req, RunEvent("r1", "t1", RunEventKind.FAILED, end, error="E", started_at=DAY0))
    assert history.flush()
    history.record(req, RunEvent("r1", "t1", RunEventKind.STARTED, DAY0, worker="w1"))
    history.record(req, RunEvent("r1", "t1", RunEventKind.SUCCEEDED, end + timedelta(1)))
    # A run that expired never started: it is placed at its end.
    history.record(request("r2"), RunEvent("r2", "t1", RunEventKind.EXPIRED, end, error="late"))
    assert history.flush()
    r2, r1 = history.query()
    assert (r1.outcome, r1.error, r1.duration, r1.worker) == ("failed", "E", 3.0, None)
    assert (r2.outcome, r2.started_at, r2.finished_at, r2.duration) == ("expired", None, end, None)


def test_extra_and_worker_are_kept(history_at: Callable[..., RunHistory]) -> None:
    history = history_at()
    req = request("r1")
    history.record(req, RunEvent("r1", "t1", RunEventKind.STARTED, DAY0, worker="mac-mini-3"))
    done = RunEvent("r1", "t1", RunEventKind.SUCCEEDED, DAY0 + timedelta(1), extra={"exit_code": 0})
    history.record(req, done)
    assert history.flush()
    (entry,) = history.query()
    assert (entry.worker, entry.extra, entry.duration) == ("mac-mini-3", {"exit_code": 0}, 86400)


@pytest.mark.parametrize("copies", [1, 20], ids=["one statement", "many rows a statement"])
def test_a_batch_writes_the_same_rows_as_writing_starts_then_finishes_one_by_one(
    tmp_path: Path, copies: int
) -> None:
    # A run whose start and end share a batch is written as one row (its start row is
    # skipped when the finishing row says everything it would): the rows must not change.
    # Rows are written many to a statement: repeated and late events of one run may then
    # share a statement, which must apply them in order as separate statements would.
    t0 = DAY0
    later = t0 + timedelta(seconds=5)

    def ev(run: str, kind: RunEventKind, at: datetime, **fields: Any) -> RunEvent:
        return RunEvent(run, "t1", kind, at, **fields)

    S, OK, FAILED, LOST = (
        RunEventKind.STARTED,
        RunEventKind.SUCCEEDED,
        RunEventKind.FAILED,
        RunEventKind.LOST,
    )
    events = [
        ev("local", S, t0),
        ev("local", OK, later, started_at=t0 + timedelta(seconds=1)),
        ev("worker", S, t0, worker="w1"),
        ev("worker", FAILED, later, worker="w1", error="E", started_at=t0),
        ev("other-worker", S, t0, worker="w1"),
        ev("other-worker", OK, later, started_at=t0),
        ev("start-extra", S, t0, extra={"pid": 7}),
        ev("start-extra", OK, later, started_at=t0),
        ev("no-start-time", S, t0, worker="w2"),
        ev("no-start-time", LOST, later, worker="w2", error="gone"),
        ev("twice", S, t0),
        ev("twice", S, t0 + timedelta(seconds=2), worker="w3"),
        ev("twice", OK, later, started_at=t0),
        ev("end-first", OK, later, started_at=t0, extra={"exit_code": 0}),
        ev("end-first", S, t0),
        ev("only-start", S, t0, worker="w4"),
    ]
    events = [
        dataclasses.replace(event, run_id=f"{event.run_id}-{copy}")
        for copy in range(copies)
        for event in events
    ]
    pairs = [(request(event.run_id), event) for event in events]
    batched = RunHistory(tmp_path / "batched.sqlite3", clock=Clock(DAY0))
    single = RunHistory(tmp_path / "single.sqlite3", clock=Clock(DAY0))
    try:
        for history in (batched, single):
            assert history.flush()  # the writer thread is idle from here on
        batched._write(pairs)
        assert batched.dropped == 0
        for pair in [p for p in pairs if p[1].kind is S] + [p for p in pairs if p[1].kind is not S]:
            single._write([pair])
        rows = {h: sorted(h.query(limit=1000), key=lambda e: e.run_id) for h in (batched, single)}
    finally:
        batched.close()
        single.close()
    assert rows[batched] == rows[single]
    assert len(rows[batched]) == 8 * copies


# ---------------------------------------------------------------------- retention and load


def test_retention_prunes_old_runs_while_new_ones_arrive(
    history_at: Callable[..., RunHistory],
) -> None:
    clock = Clock(DAY0)
    history = history_at(clock=clock, retention=timedelta(days=1), prune_batch=3)
    for i in range(600):
        record_run(history, f"old{i}", task_id=f"t{i % 4}", start=DAY0 + timedelta(seconds=i))
    assert history.flush()

    clock.now = DAY0 + timedelta(days=3)
    written: list[str] = []

    def keep_running() -> None:
        # Runs go on (the dispatcher's loop) while the writer prunes, a batch at a time.
        for batch in range(40):
            for i in range(10):
                run_id = f"new{batch}-{i}"
                record_run(history, run_id, task_id=f"t{i % 4}", start=clock.now)
                written.append(run_id)
            assert history.flush()

    runner = threading.Thread(target=keep_running)
    runner.start()
    try:
        assert history.prune(timeout=30)
    finally:
        runner.join(30)
    assert history.flush()
    left = {e.run_id for e in history.query(limit=10_000)}
    assert left == set(written)
    assert history.dropped == 0


def test_old_runs_are_pruned_when_the_history_opens(
    history_at: Callable[..., RunHistory], tmp_path: Path
) -> None:
    first = history_at(clock=Clock(DAY0))
    for i in range(20):
        record_run(first, f"r{i}", start=DAY0 + timedelta(days=i))
    first.close()

    later = history_at(clock=Clock(DAY0 + timedelta(days=40)), retention=timedelta(days=30))
    # Asking to prune nothing waits for the pruning already under way (the larger cutoff wins).
    assert later.prune(DAY0, timeout=30)
    assert [e.run_id for e in later.query()] == [
        f"r{i}" for i in (19, 18, 17, 16, 15, 14, 13, 12, 11, 10)
    ]


def test_readers_see_consistent_results_while_the_writer_inserts(
    history_at: Callable[..., RunHistory], tmp_path: Path
) -> None:
    history = history_at()
    stop = threading.Event()
    problems: list[BaseException] = []
    counts: list[list[int]] = [[] for _ in range(3)]

    def read(slot: int) -> None:
        reader = read_runs if slot == 2 else None
        try:
            while not stop.is_set():
                if reader is not None:  # a separate read-only process would do this
                    found = reader(tmp_path, task_id="t0", limit=10_000)
                else:
                    found = history.query(task_id="t0", limit=10_000)
                assert all(e.outcome == "succeeded" for e in found if e.finished_at)
                counts[slot].append(len(found))
        except BaseException as exc:
            problems.append(exc)

    readers = [threading.Thread(target=read, args=(slot,)) for slot in range(3)]
    for thread in readers:
        thread.start()
    try:
        for batch in range(20):
            for i in range(100):
                n = batch * 100 + i
                record_run(history, f"r{n}", task_id=f"t{n % 2}", start=DAY0 + timedelta(n))
            assert history.flush()
    finally:
        stop.set()
        for thread in readers:
            thread.join(30)
    assert not problems
    for seen in counts:
        assert seen == sorted(seen), "a reader never sees fewer runs than before"
    assert len(history.query(task_id="t0", limit=10_000)) == 1000


# ---------------------------------------------------------------------- the CLI


async def test_cli_runs_reads_the_history_while_the_dispatcher_runs(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "good", "account_1")
    await add(dispatcher, "bad", "account_2")
    recorder.fail.add("bad")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()

    def cli(*args: str) -> str:
        result = CliRunner().invoke(
            main, ["--dir", str(state_dir), "--timezone", "Asia/Shanghai", "runs", *args]
        )
        assert result.exit_code == 0, (result.output, result.exception)
        return result.stdout

    table = await asyncio.to_thread(cli)
    assert "good" in table
    assert "failed" in table
    assert "2026-01-08 08:00:00" in table

    failed = orjson.loads(await asyncio.to_thread(cli, "--failed", "--json"))
    assert [(e["task_id"], e["error"]) for e in failed] == [("bad", "ValueError: boom in bad")]
    by_task = orjson.loads(await asyncio.to_thread(cli, "good", "--json", "--since", "1h"))
    assert [e["task_id"] for e in by_task] == ["good"]
    by_account = orjson.loads(await asyncio.to_thread(cli, "--account", "account_2", "--json"))
    assert [e["task_id"] for e in by_account] == ["bad"]
    assert orjson.loads(await asyncio.to_thread(cli, "--since", "2026-01-08T09:00", "--json")) == []
    await dispatcher.stop()


def test_cli_runs_without_a_history(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--dir", str(tmp_path / "none"), "runs"])
    assert result.exit_code == 0
    assert "No runs recorded" in result.stdout
    bad = CliRunner().invoke(main, ["--dir", str(tmp_path), "runs", "--since", "yesterday"])
    assert bad.exit_code == 2
    assert "--since" in bad.output
