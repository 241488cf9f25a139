"""A commit is one statement: fenced in the database, the account order a row per task, and
the migration of a version-1 database (the order one array per account)."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import SHANGHAI, T0, record

from jobstores import JsonJobStore
from jobstores.postgres import (
    SCHEMA_VERSION,
    Fence,
    FullState,
    Leadership,
    PostgresState,
    PostgresStorage,
    StaleLeaderError,
    TaskRow,
    connector,
    ensure_schema,
    export_document,
    import_document,
)
from jobstores.postgres.schema import FEW, schema_version
from jobstores.storage import SnapshotStorage
from jobstores.table import TaskTable

from .test_lease import expired, wait_for

SAVED = "2026-01-08T08:00:00+08:00"


def commit(state: PostgresState, fence: Fence, **options: Any) -> None:
    options.setdefault("saved_at", SAVED)
    options.setdefault("timezone", "Asia/Shanghai")
    options.setdefault("extra", {})
    state.commit(fence, **options)


class Traced:
    """The connections a :class:`PostgresState` opens, and the round trips each makes while
    traced (libpq's own trace of the protocol: one ``Sync`` or simple ``Query`` message per
    round trip)."""

    def __init__(self, dsn: str) -> None:
        self._connect = connector(dsn, timeout=5)
        self.connections: list[psycopg.Connection[Any]] = []

    def __call__(self) -> psycopg.Connection[Any]:
        connection = self._connect()
        self.connections.append(connection)
        return connection

    def round_trips(self, action: Callable[[], object]) -> int:
        pgconn = self.connections[-1].pgconn
        with tempfile.TemporaryFile("w+") as trace:
            pgconn.trace(trace.fileno())
            pgconn.set_trace_flags(
                psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE
            )
            try:
                action()
            finally:
                pgconn.untrace()
            trace.seek(0)
            sent = [line.split("\t") for line in trace.read().splitlines()]
        return sum(1 for line in sent if line[0] == "F" and line[2] in ("Sync", "Query"))


@pytest.fixture
def traced(postgres_dsn: str, cluster: str) -> Iterator[tuple[PostgresState, Traced]]:
    connections = Traced(postgres_dsn)
    state = PostgresState(connections, cluster)
    yield state, connections
    state.close()


def test_a_commit_of_a_change_is_one_round_trip(
    traced: tuple[PostgresState, Traced], fence: Fence
) -> None:
    state, connections = traced
    commit(state, fence, full=FullState([TaskRow.of(record("a"))], [], {"acc": ["a"]}))
    changes: list[dict[str, Any]] = [
        {"changes": [("b", TaskRow.of(record("b")))]},  # an add
        {"changes": [("a", TaskRow.of(record("a", interval=7200)))]},  # an edit
        {"moves": [("acc", "b", "a")]},  # a reorder
        {"orders": {"acc": ["a", "b"]}},  # an account's whole order
        {"changes": [("a", None)], "applied": [("r1", "started")]},  # a removal, a run event
        {"changes": [(f"n{i}", TaskRow.of(record(f"n{i}"))) for i in range(FEW + 5)]},  # many
    ]
    for change in changes:
        assert connections.round_trips(partial(commit, state, fence, **change)) == 1
    stored = state.load()
    assert stored is not None
    assert stored.account_tasks == {"acc": ["b", *(f"n{i}" for i in range(FEW + 5))]}
    assert state.applied_runs(["r1"]) == {("r1", "started")}


def test_a_stale_leaders_one_statement_commit_is_refused_and_changes_nothing(
    traced: tuple[PostgresState, Traced],
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    state, connections = traced
    old = make_leadership(holder="old", lease=0.3)
    assert old.try_acquire()
    commit(state, old.fence(), full=FullState([TaskRow.of(record("a"))], [], {"acc": ["a"]}))
    before = state.load()
    wait_for(expired(connect, cluster))
    new = make_leadership(holder="new", lease=10)
    assert new.try_acquire()
    assert old.is_leader_now()  # frozen: its own clock says it still leads

    def stale_commit() -> None:
        commit(
            state,
            old.fence(),
            extra={"late": True},
            changes=[("b", TaskRow.of(record("b"))), ("a", None)],
            moves=[("acc", "b", None)],
            applied=[("r9", "succeeded")],
        )

    with pytest.raises(StaleLeaderError, match=r"epoch 1 refused.*epoch 2 by 'new'") as raised:
        connections.round_trips(stale_commit)
    assert (raised.value.epoch, raised.value.current, raised.value.holder) == (1, 2, "new")
    assert state.load() == before
    assert state.applied_runs(["r9"]) == set()
    # The refusal was one round trip too, and the connection serves the new leader at once.
    with pytest.raises(StaleLeaderError):
        assert connections.round_trips(stale_commit) == 1
    commit(state, new.fence(), changes=[("b", TaskRow.of(record("b")))])
    stored = state.load()
    assert stored is not None
    assert stored.account_tasks == {"acc": ["a", "b"]}


@pytest.mark.parametrize("seed", range(3))
def test_batches_of_many_changes_give_the_tables_order(
    state: PostgresState, make_leadership: Callable[..., Leadership], seed: int
) -> None:
    """Random batches of many adds, edits, removals and reorders, each committed at once:
    set-wise (every other batch adds only to accounts it removes none from, and reuses no
    id) or one by one (an account both loses and gains a task, an id removed and added
    again). What loads back is what the table (the JSON stores' table) holds."""
    leader = make_leadership()
    assert leader.try_acquire()
    storage = PostgresStorage(state, leader, timezone_key="Asia/Shanghai")
    storage.load(None)
    table = TaskTable()
    rng = random.Random(seed)
    numbers = iter(range(100_000))
    removed: list[str] = []

    def save() -> None:
        image = table.capture(full=False)
        storage.commit(image, T0)
        table.saved(image.version)

    table.add([record(f"t{next(numbers)}", account=rng.choice("abcd")) for _ in range(200)])
    save()
    for batch in range(12):
        set_wise = batch % 2 == 0
        changed: set[str] = set()
        for _ in range(rng.randrange(FEW + 1, 3 * FEW)):
            ids = [r.task_id for r in table.records() if r.task_id not in changed]
            choice = rng.random()
            if choice < 0.35 or len(ids) < 10:
                reuse = removed and rng.random() < 0.3 and not set_wise
                task_id = removed.pop() if reuse else f"t{next(numbers)}"
                table.add([record(task_id, account=rng.choice("de" if set_wise else "abcde"))])
            elif choice < 0.5:
                task_id = rng.choice(ids)
                table.update(
                    task_id, lambda r: r.model_copy(update={"interval": rng.randint(60, 9999)})
                )
            elif choice < 0.7:
                candidates = [i for i in ids if table.get(i).account_id in "abc" or not set_wise]
                if not candidates:
                    continue
                task_id = rng.choice(candidates)
                table.remove(task_id)
                removed.append(task_id)
            else:
                task_id = rng.choice(ids)
                account = table.get(task_id).account_id
                table.reorder(task_id, rng.randrange(len(table.account_tasks()[account])))
            if set_wise:
                changed.add(task_id)
        save()
        stored = state.load()
        assert stored is not None
        assert stored.account_tasks == table.account_tasks()
        assert [raw["task_id"] for raw in stored.tasks] == [r.task_id for r in table.records()]


def test_moves_into_one_gap_number_the_account_afresh(
    state: PostgresState, fence: Fence, connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    ids = [f"t{i}" for i in range(6)]
    commit(state, fence, full=FullState([TaskRow.of(record(i)) for i in ids], [], {"acc": ids}))
    table = TaskTable()
    table.load([record(i) for i in ids], [], {"acc": ids})
    # Each move takes the middle of the same gap: after ~20 the gap is used up.
    for step in range(60):
        task_id = ids[2 + step % 4]
        table.reorder(task_id, 1)
        order = table.account_tasks()["acc"]
        commit(state, fence, moves=[("acc", task_id, order[2])])
        stored = state.load()
        assert stored is not None
        assert stored.account_tasks == {"acc": order}
    with connect() as connection:
        positions = connection.execute(
            "SELECT count(DISTINCT pos), count(*) FROM td_order WHERE cluster = %s", (cluster,)
        ).fetchone()
    assert positions == (6, 6)


def test_an_account_order_equals_the_json_stores_after_many_changes(
    tmp_path: Path, state: PostgresState, make_leadership: Callable[..., Leadership]
) -> None:
    leader = make_leadership()
    assert leader.try_acquire()
    on_file = JsonJobStore(
        tmp_path / "file", timezone=SHANGHAI, now=T0, storage=SnapshotStorage(tmp_path / "file")
    )
    in_db = JsonJobStore(
        tmp_path / "db", timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, leader)
    )
    rng = random.Random(7)
    try:
        for step in range(300):
            ids = [r.task_id for r in on_file.table.records()]
            choice = rng.random()
            if choice < 0.4 or len(ids) < 5:
                many = [record(f"s{step}-{k}", account=rng.choice("xy")) for k in range(3)]
                for store in (on_file, in_db):
                    store.add_tasks(many)
            elif choice < 0.6:
                task_id = rng.choice(ids)
                for store in (on_file, in_db):
                    store.remove_task(task_id)
            else:
                task_id = rng.choice(ids)
                account = on_file.table.get(task_id).account_id
                place = rng.randrange(len(on_file.table.account_tasks()[account]))
                for store in (on_file, in_db):
                    store.reorder(task_id, place)
            if step % 10 == 0:
                assert on_file.save()
                assert in_db.save()
        assert on_file.save()
        assert in_db.save()
    finally:
        on_file.close()
        in_db.close()
    stored = state.load()
    assert stored is not None
    reopened = JsonJobStore(tmp_path / "file", timezone=SHANGHAI, now=T0)
    try:
        assert stored.account_tasks == reopened.table.account_tasks()
        assert [raw["task_id"] for raw in stored.tasks] == [
            r.task_id for r in reopened.table.records()
        ]
    finally:
        reopened.close()


# ---------------------------------------------------------------------- migration

_TO_VERSION_1 = """
ALTER TABLE td_accounts ADD COLUMN task_ids text[];
UPDATE td_accounts AS a SET task_ids = coalesce(
    (SELECT array_agg(o.task_id ORDER BY o.pos) FROM td_order AS o
     WHERE o.cluster = a.cluster AND o.account_id = a.account_id), '{}');
ALTER TABLE td_accounts ALTER COLUMN task_ids SET NOT NULL;
DROP TABLE td_order;
DROP FUNCTION td_commit, td_change_all, td_change_each, td_append, td_unlist, td_set_order,
    td_move;
CREATE FUNCTION td_moved(ids text[], task text, before text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$ SELECT ids $$;
UPDATE td_schema SET version = 1;
"""
"""A database of this code's tables turned into version 1's: each account's order one
``text[]`` (``td_accounts.task_ids``), no ``td_order``, version 1's ``td_moved``."""


def test_a_version_1_database_is_migrated_in_place_and_exports_the_same_bytes(
    tmp_path: Path, empty_database: str, make_leadership: Callable[..., Leadership]
) -> None:
    directory = tmp_path / "json"
    store = JsonJobStore(directory, timezone=SHANGHAI, now=T0, storage=SnapshotStorage(directory))
    store.add_tasks([record(f"t{i}", account="ab"[i % 2]) for i in range(8)])
    store.reorder("t6", 0)
    store.remove_task("t3")
    assert store.save()
    store.close()
    original = (directory / "dispatch_config.json").read_bytes()

    connect = connector(empty_database, timeout=5)
    old = PostgresState(connect, "default")
    leader = Leadership(connect, "default", holder="leader")
    assert leader.try_acquire()
    import_document(old, leader.fence(), original)
    old.close()
    with psycopg.connect(empty_database, autocommit=True) as connection:
        connection.execute(_TO_VERSION_1)
        # Version 1 could hold an account listed empty and an id listed twice.
        connection.execute(
            "INSERT INTO td_accounts (cluster, account_id, task_ids) VALUES ('default', 'c', '{}')"
        )
        connection.execute(
            "UPDATE td_accounts SET task_ids = task_ids || 't0'::text WHERE account_id = 'a'"
        )
        assert schema_version(connection) == 1

    state = PostgresState(connect, "default")
    try:
        assert export_document(state) == original  # migrated on first use
        stored = state.load()
        assert stored is not None
        assert stored.account_tasks == {"a": ["t6", "t0", "t2", "t4"], "b": ["t1", "t5", "t7"]}
        # The migrated store takes changes, one statement each.
        commit(state, leader.fence(), changes=[("t9", TaskRow.of(record("t9", account="a")))])
        commit(state, leader.fence(), moves=[("a", "t9", "t0")])
        stored = state.load()
        assert stored is not None
        assert stored.account_tasks["a"] == ["t6", "t9", "t0", "t2", "t4"]
    finally:
        state.close()
        leader.stop(release=True)
    with psycopg.connect(empty_database, autocommit=True) as connection:
        assert schema_version(connection) == SCHEMA_VERSION
        assert ensure_schema(connection) == SCHEMA_VERSION
        columns = {
            row[0]
            for row in connection.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'td_accounts'"
            )
        }
        moved = connection.execute("SELECT to_regproc('td_moved')").fetchone()
    assert columns == {"cluster", "account_id", "seq"}
    assert moved == (None,)


def test_a_change_of_very_many_tasks_is_one_transaction_of_several_statements(
    traced: tuple[PostgresState, Traced], fence: Fence, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobstores.postgres import state as state_module

    state, connections = traced
    monkeypatch.setattr(state_module, "_CHUNK", 7)
    commit(state, fence, full=FullState([TaskRow.of(record("a"))], [], {"acc": ["a"]}))
    rows = [TaskRow.of(record(f"t{i}", account="ab"[i % 2])) for i in range(30)]
    trips = connections.round_trips(
        lambda: commit(
            state,
            fence,
            changes=[(row.task_id, row) for row in rows] + [("a", None), ("t3", None)],
            moves=[("b", "t5", "t1")],
            applied=[("r1", "started")],
        )
    )
    assert trips == 2 + 5  # BEGIN, COMMIT and a statement per 7 changes
    stored = state.load()
    assert stored is not None
    assert stored.account_tasks == {
        "a": [f"t{i}" for i in range(0, 30, 2)],
        "b": ["t5", *(f"t{i}" for i in range(1, 30, 2) if i not in (3, 5))],
    }
    assert state.applied_runs(["r1"]) == {("r1", "started")}
    # Refused whole for a stale epoch: the first statement already refuses.
    stale = Fence(fence.cluster, fence.holder, fence.epoch - 1)
    with pytest.raises(StaleLeaderError):
        commit(state, stale, changes=[(row.task_id, None) for row in rows])
    assert state.load() == stored
