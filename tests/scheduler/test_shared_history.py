"""The run history kept in PostgreSQL: the same history on every instance of a cluster.

The queries run against both implementations (the SQLite file and the cluster's ``td_runs``)
with the same events, over a real PostgreSQL (a fresh database per test run, a cluster per
test).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import SHANGHAI, Recorder, at
from postgres_support import Databases, postgres_databases, url_of

from jobstores.postgres import connector
from jobstores.postgres.runs import RUN_FIELDS, RunTable
from scheduler import HistoryUnavailableError, RunHistory, TaskDispatcher
from scheduler.history import HISTORY_FILENAME, SHARED_FIELDS, SharedRunHistory, open_history
from tasks.runs import RunEvent, RunEventKind, RunRequest
from tasks.secrets import mask_text

__all__ = ["postgres_databases"]  # a fixture of every test here

DAY0 = datetime(2026, 1, 1, tzinfo=UTC)
TASK: dict[str, Any] = {
    "sys_type": "mac_intel",
    "task_type": "xhs_type",
    "xhs_account_id": "account_1",
    "interval": 3600,
    "valid_time_range": [8, 22],
}
LEAKY = "RuntimeError: login refused for postgresql://bot:hunter2@db/x password=swordfish42"
SECRETS = ("hunter2", "swordfish42")


@pytest.fixture(scope="module")
def dsn(postgres_databases: Databases) -> str:
    """The database of this module's tests (each test uses clusters of its own)."""
    return postgres_databases.create()


def new_cluster() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


MakeHistory = Callable[..., RunHistory]


@pytest.fixture(params=["sqlite", "postgres"])
def make_history(request: pytest.FixtureRequest, tmp_path: Path, dsn: str) -> Iterator[MakeHistory]:
    """Histories of one implementation (SQLite, or a PostgreSQL cluster of this test's own)."""
    made: list[RunHistory] = []
    cluster = new_cluster()

    def make(**options: Any) -> RunHistory:
        options.setdefault("clock", Clock(DAY0))
        history: RunHistory
        if request.param == "sqlite":
            history = RunHistory(tmp_path / HISTORY_FILENAME, **options)
        else:
            history = SharedRunHistory(RunTable(connector(dsn, timeout=5), cluster), **options)
        made.append(history)
        return history

    yield make
    for history in made:
        history.close()


def run_request(
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
    error: str = "ValueError: boom",
) -> None:
    req = run_request(run_id, task_id, account, start)
    history.record(req, RunEvent(run_id, task_id, RunEventKind.STARTED, start, worker="w1"))
    end = start + timedelta(seconds=seconds)
    history.record(
        req,
        RunEvent(
            run_id,
            task_id,
            kind,
            end,
            error=None if kind is RunEventKind.SUCCEEDED else error,
            started_at=start,
            worker="w1",
            extra={"rows": 3} if kind is RunEventKind.SUCCEEDED else {},
        ),
    )


def fill(history: RunHistory) -> None:
    """Runs of two tasks and two accounts, failed and not, some at one same instant, one
    still running and one that never started."""
    kinds = [RunEventKind.SUCCEEDED, RunEventKind.FAILED, RunEventKind.LOST]
    for hour in range(6):
        for task_id, account in (("t1", "a1"), ("t2", "a2")):
            record_run(
                history,
                f"{task_id}-{hour}",
                task_id=task_id,
                account=account,
                start=DAY0 + timedelta(hours=hour),  # t1 and t2 start at the same instant
                kind=kinds[hour % 3],
            )
    late = run_request("running", "t1", "a1", DAY0 + timedelta(hours=7))
    history.record(late, RunEvent("running", "t1", RunEventKind.STARTED, late.scheduled_at))
    expired = run_request("expired", "t2", "a2", DAY0 + timedelta(hours=8))
    history.record(
        expired,
        RunEvent(
            "expired",
            "t2",
            RunEventKind.EXPIRED,
            DAY0 + timedelta(hours=9),
            error="RunExpiredError: nobody started it",
        ),
    )
    assert history.flush()


QUERIES: list[dict[str, Any]] = [
    {},
    {"task_id": "t1"},
    {"account_id": "a2"},
    {"failed": True},
    {"failed": False},
    {"since": DAY0 + timedelta(hours=2), "until": DAY0 + timedelta(hours=4)},
    {"task_id": "t2", "failed": True, "limit": 2},
    {"limit": 3, "before_run": "t2-4"},
    {"account_id": "a1", "before_run": "t1-3"},
]


def answers(history: RunHistory) -> list[list[Any]]:
    return [history.query(**query) for query in QUERIES]


def test_queries_filter_and_order_runs(make_history: MakeHistory) -> None:
    history = make_history(timezone=SHANGHAI)
    fill(history)
    everything = history.query()
    assert [e.run_id for e in everything] == [
        "expired",  # never started: placed by its end
        "running",
        "t2-5",  # at one instant, the run recorded last comes first
        "t1-5",
        "t2-4",
        "t1-4",
        "t2-3",
        "t1-3",
        "t2-2",
        "t1-2",
        "t2-1",
        "t1-1",
        "t2-0",
        "t1-0",
    ]
    by_id = {e.run_id: e for e in everything}
    assert by_id["running"].outcome == "running"
    assert by_id["running"].finished_at is None
    assert by_id["expired"].started_at is None
    assert by_id["t1-1"].error == "ValueError: boom"
    ok = by_id["t1-0"]
    assert (ok.outcome, ok.duration, ok.worker, ok.extra, ok.trigger) == (
        "succeeded",
        2.0,
        "w1",
        {"rows": 3},
        "schedule",
    )
    assert ok.started_at == DAY0
    assert ok.started_at is not None
    assert ok.started_at.tzinfo == SHANGHAI
    assert {e.run_id for e in history.query(failed=True)} == {
        "t1-1",
        "t2-1",
        "t1-2",
        "t2-2",
        "t1-4",
        "t2-4",
        "t1-5",
        "t2-5",
        "expired",
    }
    assert [e.run_id for e in history.query(limit=3, before_run="t2-4")] == [
        "t1-4",
        "t2-3",
        "t1-3",
    ]
    with pytest.raises(ValueError, match="before_run"):
        history.query(before_run="nope")
    with pytest.raises(ValueError, match="since"):
        history.query(since=datetime(2026, 1, 1))  # naive


def test_both_histories_answer_every_query_alike(tmp_path: Path, dsn: str) -> None:
    assert RUN_FIELDS == SHARED_FIELDS  # the table's rows are what the history reads
    local = RunHistory(tmp_path / HISTORY_FILENAME, timezone=SHANGHAI, clock=Clock(DAY0))
    shared = SharedRunHistory(
        RunTable(connector(dsn, timeout=5), new_cluster()), timezone=SHANGHAI, clock=Clock(DAY0)
    )
    try:
        fill(local)
        fill(shared)
        expected = answers(local)
        assert sum(map(len, expected)) > len(QUERIES)  # the queries do find runs
        assert answers(shared) == expected
        # Paging walks every run once, in the same order.
        for history in (local, shared):
            seen: list[str] = []
            page = history.query(limit=4)
            while page:
                seen.extend(e.run_id for e in page)
                page = history.query(limit=4, before_run=page[-1].run_id)
            assert seen == [e.run_id for e in expected[0]]
    finally:
        local.close()
        shared.close()


def test_a_repeated_or_late_event_changes_nothing(make_history: MakeHistory) -> None:
    history = make_history()
    req = run_request("r1")
    end = DAY0 + timedelta(seconds=5)
    history.record(req, RunEvent("r1", "t1", RunEventKind.SUCCEEDED, end, started_at=DAY0))
    history.record(req, RunEvent("r1", "t1", RunEventKind.FAILED, end, error="E: late"))
    history.record(req, RunEvent("r1", "t1", RunEventKind.STARTED, DAY0))
    assert history.flush()
    (entry,) = history.query()
    assert (entry.outcome, entry.error, entry.duration) == ("succeeded", None, 5.0)


def test_runs_older_than_the_retention_are_pruned(make_history: MakeHistory) -> None:
    clock = Clock(DAY0)
    history = make_history(retention=timedelta(days=1), clock=clock, prune_batch=2)
    for day in range(5):
        record_run(history, f"r{day}", start=DAY0 + timedelta(days=day))
    assert history.flush()
    assert len(history.query()) == 5
    assert history.prune(DAY0 + timedelta(days=3, hours=12), timeout=10)
    assert [e.run_id for e in history.query()] == ["r4", "r3"]


def test_secrets_in_an_error_are_masked_in_the_history(make_history: MakeHistory) -> None:
    history = make_history()
    record_run(history, "r1", kind=RunEventKind.FAILED, error=LEAKY)
    assert history.flush()
    (entry,) = history.query()
    assert entry.error == mask_text(LEAKY) != LEAKY
    assert not [secret for secret in SECRETS if secret in str(entry.to_json())]


def test_closing_a_shared_history_writes_what_is_queued(dsn: str) -> None:
    cluster = new_cluster()
    history = SharedRunHistory(RunTable(connector(dsn, timeout=5), cluster), clock=Clock(DAY0))
    record_run(history, "r1")
    history.close()  # writes what is queued before closing
    again = SharedRunHistory(RunTable(connector(dsn, timeout=5), cluster), clock=Clock(DAY0))
    try:
        assert [e.run_id for e in again.query()] == ["r1"]
    finally:
        again.close()


class _Unreachable:
    """A store whose cluster keeps its runs in a database nobody answers at."""

    def run_table(self) -> RunTable:
        unreachable = connector("postgresql://postgres@127.0.0.1:1/nothing", timeout=1)
        return RunTable(unreachable, "c1")


def test_an_unreachable_database_leaves_the_history_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(HistoryUnavailableError, match="run history: td_runs of cluster 'c1'"):
        SharedRunHistory(_Unreachable().run_table())
    assert open_history(tmp_path, True, UTC, _Unreachable()) is None
    assert "running without a run history" in caplog.text
    assert not (tmp_path / HISTORY_FILENAME).exists()  # no silent local history either


# ---------------------------------------------------------------------- through dispatchers


class _Leaky:
    """A task manager whose runs fail with credentials in the message."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def run(self) -> None:
        raise RuntimeError(LEAKY.removeprefix("RuntimeError: "))


def _dispatcher(directory: Path, store: str, factory: Any) -> TaskDispatcher:
    return TaskDispatcher(
        directory, task_manager_factory=factory, timezone="Asia/Shanghai", store=store
    )


async def test_every_instance_of_a_cluster_shows_the_same_history(
    clock: Any, recorder: Recorder, tmp_path: Path, dsn: str
) -> None:
    url = f"{url_of(dsn)}?cluster={new_cluster()}"
    first = _dispatcher(tmp_path / "first", url, recorder)
    assert isinstance(first.history, SharedRunHistory)
    task_id = await first.add_task(**TASK)
    await first.start()
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        await first.run_pending()
        clock.move_to(at(2026, 1, 8, 9, 0))
        await first.run_pending()
        recorded = first.runs()
    finally:
        await first.stop()
    assert [e.scheduled_at for e in recorded] == [at(2026, 1, 8, 9, 0), at(2026, 1, 8, 8, 0)]
    assert not (tmp_path / "first" / HISTORY_FILENAME).exists()  # nothing kept locally

    # Another instance, on another machine's directory, takes the lease: same history.
    second = _dispatcher(tmp_path / "second", url, recorder)
    try:
        assert second.role == "leader"
        assert second.runs() == recorded
        assert [e.run_id for e in second.runs(task_id, failed=False)] == [
            e.run_id for e in recorded
        ]
        # Another cluster of the same database shows none of them.
        other = _dispatcher(tmp_path / "other", f"{url_of(dsn)}?cluster={new_cluster()}", recorder)
        try:
            assert other.runs() == []
        finally:
            other.close()
    finally:
        second.close()


async def test_a_failed_runs_secrets_are_masked_in_the_shared_history(
    clock: Any, tmp_path: Path, dsn: str
) -> None:
    cluster = new_cluster()
    dispatcher = _dispatcher(tmp_path / "d", f"{url_of(dsn)}?cluster={cluster}", _Leaky)
    task_id = await dispatcher.add_task(**TASK)
    await dispatcher.start()
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        await dispatcher.run_pending()
        (entry,) = dispatcher.runs(task_id)
    finally:
        await dispatcher.stop()
    assert entry.outcome == "failed"
    assert entry.error == mask_text(LEAKY)
    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute("SELECT td_runs::text FROM td_runs WHERE cluster = %s", (cluster,))
        text = "\n".join(row for (row,) in rows.fetchall())
    assert "login refused" in text
    assert not [secret for secret in SECRETS if secret in text]


def test_history_off_or_passed_is_kept_with_a_postgres_store(
    recorder: Recorder, tmp_path: Path, dsn: str
) -> None:
    url = f"{url_of(dsn)}?cluster={new_cluster()}"
    off = TaskDispatcher(tmp_path / "a", task_manager_factory=recorder, store=url, history=False)
    try:
        assert off.history is None
        with pytest.raises(HistoryUnavailableError):
            off.runs()
    finally:
        off.close()
    mine = RunHistory(tmp_path / "mine.sqlite3", retention=timedelta(days=2))
    passed = TaskDispatcher(tmp_path / "b", task_manager_factory=recorder, store=url, history=mine)
    try:
        assert passed.history is mine
    finally:
        passed.close()


def test_a_run_started_on_one_instance_is_completed_by_another(dsn: str) -> None:
    cluster = new_cluster()
    old = SharedRunHistory(RunTable(connector(dsn, timeout=5), cluster), clock=Clock(DAY0))
    new = SharedRunHistory(RunTable(connector(dsn, timeout=5), cluster), clock=Clock(DAY0))
    try:
        req = run_request("r1")
        old.record(req, RunEvent("r1", "t1", RunEventKind.STARTED, DAY0, worker="w1"))
        assert old.flush()
        assert [e.outcome for e in new.query()] == ["running"]
        # The new leader records the old leader's run in progress as lost.
        lost_at = DAY0 + timedelta(seconds=30)
        new.record(req, RunEvent("r1", "t1", RunEventKind.LOST, lost_at, error="RunLostError: x"))
        assert new.flush()
        for history in (old, new):
            (entry,) = history.query()
            assert (entry.outcome, entry.started_at, entry.worker, entry.duration) == (
                "lost",
                DAY0,
                "w1",
                30.0,
            )
    finally:
        old.close()
        new.close()


class _Nul:
    """A task manager whose runs fail with a NUL character in the message."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def run(self) -> None:
        raise RuntimeError("read b'\x00' from the device")


async def test_a_nul_character_in_a_task_and_in_its_error_is_saved_and_loaded_back(
    clock: Any, tmp_path: Path, dsn: str
) -> None:
    # Valid JSON that jsonb cannot hold: saved exactly, as the JSON store saves it.
    url = f"{url_of(dsn)}?cluster={new_cluster()}"
    dispatcher = _dispatcher(tmp_path / "d", url, _Nul)
    task_id = await dispatcher.add_task(**TASK, note="a\x00b")
    await dispatcher.start()
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        await dispatcher.run_pending()
        assert dispatcher.save_health.ok
        (entry,) = dispatcher.runs(task_id)
    finally:
        await dispatcher.stop()
    assert entry.outcome == "failed"
    assert entry.error == "RuntimeError: read b'\ufffd' from the device"  # the history's text
    again = _dispatcher(tmp_path / "d", url, _Nul)
    try:
        record = again.get_task(task_id)
    finally:
        again.close()
    assert record.kwargs["note"] == "a\x00b"
    assert record.last_error == "RuntimeError: read b'\x00' from the device"
