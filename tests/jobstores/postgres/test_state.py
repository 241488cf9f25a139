"""The state in PostgreSQL: the schema, loading, and commits that apply whole or not at all."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from helpers import SHANGHAI, T0, record

from jobstores import JsonJobStore
from jobstores.postgres import (
    SCHEMA_VERSION,
    Fence,
    FullState,
    Leadership,
    NewerSchemaError,
    PostgresState,
    PostgresStorage,
    PostgresStoreError,
    TaskRow,
    connector,
    ensure_schema,
)
from jobstores.postgres.schema import DDL, FEW, schema_version
from jobstores.table import TaskTable
from tasks.model import TaskRecord, json_default
from tasks.runs import RunEvent, RunEventKind, RunRequest

SAVED = "2026-01-08T08:00:00+08:00"


def plain(record: TaskRecord) -> dict[str, Any]:
    """The record as the state file holds it, parsed."""
    parsed: dict[str, Any] = orjson.loads(orjson.dumps(record.plain(), default=json_default))
    return parsed


def commit(state: PostgresState, fence: Fence, **options: Any) -> None:
    options.setdefault("saved_at", SAVED)
    options.setdefault("timezone", "Asia/Shanghai")
    options.setdefault("extra", {})
    state.commit(fence, **options)


# ---------------------------------------------------------------------- the schema


def test_the_schema_is_created_on_first_use_and_versioned(empty_database: str) -> None:
    with psycopg.connect(empty_database, autocommit=True) as connection:
        assert schema_version(connection) is None
        assert ensure_schema(connection) == SCHEMA_VERSION
        assert schema_version(connection) == SCHEMA_VERSION
        assert ensure_schema(connection) == SCHEMA_VERSION  # again: nothing to do
        tables = {
            row[0]
            for row in connection.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'td\\_%'"
            )
        }
    assert tables == {
        "td_schema",
        "td_leases",
        "td_clusters",
        "td_tasks",
        "td_kept",
        "td_accounts",
        "td_order",
        "td_applied_runs",
        "td_runs",
    }


def test_a_newer_schema_is_refused_and_left_as_it_is(empty_database: str) -> None:
    with psycopg.connect(empty_database, autocommit=True) as connection:
        ensure_schema(connection)
        connection.execute("UPDATE td_schema SET version = %s", (SCHEMA_VERSION + 1,))
    state = PostgresState(connector(empty_database))
    newer = rf"schema version {SCHEMA_VERSION + 1}, newer than .* \({SCHEMA_VERSION}\)"
    with pytest.raises(NewerSchemaError, match=newer):
        state.load()
    leadership = Leadership(connector(empty_database))
    with pytest.raises(NewerSchemaError):
        leadership.try_acquire()
    with psycopg.connect(empty_database, autocommit=True) as connection:
        assert schema_version(connection) == SCHEMA_VERSION + 1


def test_instances_creating_the_schema_at_once_all_succeed(
    postgres_databases: Any,
) -> None:
    for _ in range(3):
        database = postgres_databases.create()
        barrier = threading.Barrier(6)

        def create(database: str = database, barrier: threading.Barrier = barrier) -> int:
            with psycopg.connect(database, autocommit=True) as connection:
                barrier.wait(timeout=10)
                return ensure_schema(connection)

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(lambda _: create(), range(6))) == [SCHEMA_VERSION] * 6


# ---------------------------------------------------------------------- loading and committing


def test_nothing_stored_loads_as_none(state: PostgresState) -> None:
    assert state.load() is None


def test_a_full_state_loads_back_as_the_json_loader_reads_it(
    state: PostgresState, fence: Fence
) -> None:
    a, b, c = record("a"), record("b", account="other"), record("c")
    kept = {"task_id": "bad", "account_id": "acc", "interval": "soon", "big": 10**30}
    commit(
        state,
        fence,
        extra={"comment": "kept", "nested": {"z": 1, "a": [1, 2]}},
        full=FullState(
            [TaskRow.of(a), TaskRow.of(b), TaskRow.of(c)],
            [kept, [1, 2]],
            {"acc": ["c", "a", "bad"], "other": ["b"]},
        ),
    )
    stored = state.load()
    assert stored is not None
    assert stored.tasks == [plain(a), plain(b), plain(c), kept, [1, 2]]
    assert stored.kept == [kept, [1, 2]]
    assert list(stored.account_tasks.items()) == [("acc", ["c", "a", "bad"]), ("other", ["b"])]
    assert list(stored.extra) == ["comment", "nested"]
    assert stored.extra == {"comment": "kept", "nested": {"z": 1, "a": [1, 2]}}
    assert stored.timezone == "Asia/Shanghai"
    assert stored.saved_at == SAVED
    document = stored.document()
    assert document.tasks == stored.tasks
    assert document.account_tasks == stored.account_tasks
    assert document.trusted is False  # kept records: each is checked again
    assert len(document.trusted_tasks) == 3


def test_records_are_jsonb_with_the_seeds_field_names(
    state: PostgresState, fence: Fence, connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    commit(state, fence, full=FullState([TaskRow.of(record("a"))], [], {"acc": ["a"]}))
    with connect() as connection:
        row = connection.execute(
            "SELECT record->>'task_id', record->'valid_time_range', record->>'interval', "
            "jsonb_typeof(record) FROM td_tasks WHERE cluster = %s",
            (cluster,),
        ).fetchone()
    assert row == ("a", [8, 22], "3600", "object")


def test_each_record_keeps_its_text_however_often_the_statement_ran(
    state: PostgresState, fence: Fence
) -> None:
    # psycopg prepares a statement run often enough on one connection: the stored text (what
    # an export writes, and what a load rebuilds without validating) must stay the file's line.
    rows = [TaskRow.of(record(f"t{i}")) for i in range(12)]
    commit(state, fence, changes=[(row.task_id, row) for row in rows])
    for row in rows:
        commit(state, fence, changes=[(row.task_id, row)])
    stored = state.load()
    assert stored is not None
    assert [orjson.dumps(raw).decode() for raw in stored.tasks] == [row.text for row in rows]
    assert stored.document().trusted


def test_a_change_keeps_every_text_as_given_whatever_it_holds(
    state: PostgresState, fence: Fence, connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    # A change's ids, accounts and record texts reach the server as arrays (in binary): what
    # an array's text syntax quotes or escapes (quotes, backslashes, braces, commas, spaces,
    # a bare NULL, non-ASCII) arrives as it was, for a new task, an edited one and a removal.
    odd = 'a "quoted", \\back\\slashed {braced} NULL \u00e9\u6f22\U0001f600 end '
    rows = [
        TaskRow.of(record("NULL", account="{x,y}", kwargs={"user_query": odd})),
        TaskRow.of(record('id "1", \\', account="NULL", kwargs={"user_query": odd[::-1]})),
        TaskRow.of(record("plain", account="in a, b")),
    ]
    commit(state, fence, changes=[(row.task_id, row) for row in rows])
    edited = TaskRow.of(record("NULL", account="{x,y}", kwargs={"user_query": odd * 3}))
    commit(state, fence, changes=[("plain", None), ("NULL", edited)])
    stored = state.load()
    assert stored is not None
    assert [orjson.dumps(raw).decode() for raw in stored.tasks] == [edited.text, rows[1].text]
    assert stored.account_tasks == {"{x,y}": ["NULL"], "NULL": ['id "1", \\']}
    with connect() as connection:
        found = connection.execute(
            "SELECT task_id, account_id, record->'kwargs'->>'user_query' FROM td_tasks "
            "WHERE cluster = %s ORDER BY seq",
            (cluster,),
        ).fetchall()
    assert found == [("NULL", "{x,y}", odd * 3), ('id "1", \\', "NULL", odd[::-1])]


def test_a_record_edited_in_the_database_loads_as_edited_and_is_validated(
    state: PostgresState, fence: Fence, connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    commit(state, fence, full=FullState([TaskRow.of(record("a"))], [], {"acc": ["a"]}))
    stored = state.load()
    assert stored is not None
    assert stored.document().trusted
    with connect() as connection:
        connection.execute(
            "UPDATE td_tasks SET record = jsonb_set(record, '{interval}', '7200') "
            "WHERE cluster = %s",
            (cluster,),
        )
    stored = state.load()
    assert stored is not None
    assert stored.tasks[0]["interval"] == 7200
    assert stored.sealed == [False]
    assert not stored.document().trusted
    assert stored.document().trusted_tasks == set()


def test_a_failing_commit_changes_nothing(state: PostgresState, fence: Fence) -> None:
    commit(state, fence, full=FullState([TaskRow.of(record("a"))], [], {"acc": ["a"]}))
    before = state.load()
    bad = TaskRow("y", "acc", '{"task_id":"y","account_id":"acc","note":')  # not JSON
    with pytest.raises(PostgresStoreError, match="committing failed"):
        commit(
            state,
            fence,
            extra={"changed": True},
            changes=[("x", TaskRow.of(record("x"))), ("a", None), ("y", bad)],
        )
    assert state.load() == before
    commit(state, fence, changes=[("x", TaskRow.of(record("x")))])  # the store works on
    after = state.load()
    assert after is not None
    assert after.account_tasks == {"acc": ["a", "x"]}


def test_changes_orders_and_moves_apply_as_in_the_table(state: PostgresState, fence: Fence) -> None:
    first = [record(f"t{i}") for i in range(5)]
    commit(
        state,
        fence,
        full=FullState(list(map(TaskRow.of, first)), [], {"acc": ["t0", "t1", "t2", "t3", "t4"]}),
    )
    changed = record("t1", interval=7200)
    commit(
        state,
        fence,
        changes=[
            ("t1", TaskRow.of(changed)),  # keeps its place
            ("t0", None),
            ("t5", TaskRow.of(record("t5", account="new"))),  # a new account, last
            ("t3", None),
            ("t3", TaskRow.of(record("t3"))),  # removed and added again: last
        ],
        moves=[("acc", "t4", "t1"), ("acc", "t2", None), ("acc", "missing", "t1")],
    )
    stored = state.load()
    assert stored is not None
    assert [t["task_id"] for t in stored.tasks] == ["t1", "t2", "t4", "t5", "t3"]
    assert stored.tasks[0]["interval"] == 7200
    assert stored.account_tasks == {"acc": ["t4", "t1", "t3", "t2"], "new": ["t5"]}
    # An account's whole order; an account emptied goes, and comes back last.
    commit(state, fence, orders={"acc": ["t3", "t2", "t1", "t4"]}, changes=[("t5", None)])
    commit(state, fence, changes=[("t6", TaskRow.of(record("t6", account="new")))])
    stored = state.load()
    assert stored is not None
    assert list(stored.account_tasks.items()) == [
        ("acc", ["t3", "t2", "t1", "t4"]),
        ("new", ["t6"]),
    ]


@pytest.mark.parametrize("seed", range(4))
def test_the_state_committed_from_table_images_is_the_tables(
    state: PostgresState, make_leadership: Callable[..., Leadership], seed: int
) -> None:
    """Random adds, edits, removals and reorders, saved in batches through the adapter
    (changes, moves and whole orders): what loads back is what the table holds."""
    leader = make_leadership()
    assert leader.try_acquire()
    storage = PostgresStorage(state, leader, timezone_key="Asia/Shanghai")
    loaded = storage.load(None)
    assert (loaded.exists, loaded.records) == (False, [])
    table = TaskTable()
    rng = random.Random(seed)
    removed: list[str] = []
    numbers = iter(range(10_000))

    def save(full: bool = False) -> None:
        image = table.capture(full=full)
        storage.commit(image, T0)
        table.saved(image.version)

    table.add([record(f"big{i}", account="big") for i in range(100)])
    save(full=True)
    for step in range(150):
        ids = [r.task_id for r in table.records()]
        choice = rng.random()
        if choice < 0.3 or not ids:
            reused = removed and rng.random() < 0.3
            task_id = removed.pop() if reused else f"t{next(numbers)}"
            table.add([record(task_id, account=rng.choice("abc"))])
        elif choice < 0.5:
            task_id = rng.choice(ids)
            table.update(
                task_id, lambda r: r.model_copy(update={"interval": rng.randint(60, 9999)})
            )
        elif choice < 0.65:
            task_id = rng.choice(ids)
            table.remove(task_id)
            removed.append(task_id)
        else:
            task_id = rng.choice(ids)
            account = table.get(task_id).account_id
            table.reorder(task_id, rng.randrange(len(table.account_tasks()[account])))
        if step == 75:  # more than 64 of one account reordered between two saves
            for i in range(100):
                if table.find(f"big{i}") is not None:
                    table.reorder(f"big{i}", 0)
        if rng.random() < 0.2:
            save(full=rng.random() < 0.2)
    save()
    stored = state.load()
    assert stored is not None
    assert stored.tasks == [plain(r) for r in table.records()]
    assert stored.account_tasks == table.account_tasks()
    assert stored.document().trusted


def test_run_events_and_applied_ids_commit_with_the_change(
    state: PostgresState, fence: Fence, make_leadership: Callable[..., Leadership]
) -> None:
    request = RunRequest(
        run_id="r1",
        task_id="a",
        account_id="acc",
        sys_type="mac_intel",
        task_type="xhs_type",
        kwargs={},
        scheduled_at=T0,
        submitted_at=T0,
    )
    started = RunEvent("r1", "a", RunEventKind.STARTED, T0, worker="w1")
    finished = RunEvent(
        "r1",
        "a",
        RunEventKind.FAILED,
        T0 + timedelta(seconds=2.5),
        error="ValueError: boom",
        started_at=T0,
        extra={"exit": 3},
    )
    commit(state, fence, applied=[("r1", "started")], runs=[(request, started)])
    assert [r["outcome"] for r in state.runs()] == ["running"]
    commit(state, fence, applied=[("r1", "failed")], runs=[(request, finished)])
    late = RunEvent("r1", "a", RunEventKind.SUCCEEDED, T0 + timedelta(seconds=9), started_at=T0)
    commit(state, fence, runs=[(request, finished), (request, late)])  # duplicates change nothing
    (entry,) = state.runs(task_id="a")
    assert entry["run_id"] == "r1"
    assert entry["outcome"] == "failed"
    assert entry["duration"] == 2.5
    assert entry["worker"] == "w1"
    assert entry["error"] == "ValueError: boom"
    assert entry["started_at"] == T0
    assert entry["trigger"] == "schedule"
    assert entry["extra"] == {"exit": 3}
    assert state.runs(failed=False) == []
    assert len(state.runs(failed=True, account_id="acc")) == 1
    assert state.applied_runs(["r1", "r2"]) == {("r1", "started"), ("r1", "failed")}


def test_the_documented_tables_are_the_ones_created() -> None:
    page = (Path(__file__).parents[3] / "docs" / "postgres.md").read_text(encoding="utf-8")
    documented = page.split("```sql\n", 1)[1].split("```", 1)[0]

    def tables(text: str) -> list[str]:
        text = text.replace("IF NOT EXISTS ", "")
        return [
            " ".join(statement.split())
            for statement in text.split(";")
            if statement.strip().startswith(("CREATE TABLE", "CREATE SEQUENCE"))
        ]

    assert tables(documented) == tables(DDL)


# ---------------------------------------------------------------------- loading writes nothing


def _row_versions(connect: Callable[[], psycopg.Connection[Any]], cluster: str) -> dict[str, str]:
    """Each task row's ``xmin``: the transaction that last wrote it."""
    with connect() as connection:
        rows = connection.execute(
            "SELECT task_id, xmin::text FROM td_tasks WHERE cluster = %s", (cluster,)
        ).fetchall()
    return dict(rows)


@pytest.mark.parametrize("tasks", [30, 2_100])  # below the snapshot threshold, and above it
def test_a_new_leader_of_an_unchanged_store_rewrites_no_task_row(
    tmp_path: Path,
    state: PostgresState,
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
    tasks: int,
) -> None:
    first = make_leadership(holder="first")
    assert first.try_acquire()
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, first))
    store.add_tasks([record(f"t{i}", account=f"acc{i % 7}") for i in range(tasks)])
    assert store.save()
    store.close()
    written = _row_versions(connect, cluster)
    assert len(written) == tasks

    second = make_leadership(holder="second")
    assert second.try_acquire()
    store = JsonJobStore(
        tmp_path, timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, second)
    )
    assert len(store.table.records()) == tasks
    store.table.touch()  # a dispatcher's final save: a full image, with no change in it
    assert store.save()
    store.add_tasks([record("new", account="acc1")])
    assert store.save()
    store.close()
    after = _row_versions(connect, cluster)
    rewritten = [task_id for task_id, version in written.items() if after[task_id] != version]
    assert len(rewritten) == 0, f"{len(rewritten)} of {tasks} rows rewritten"
    assert "new" in after
    stored = state.load()
    assert stored is not None
    assert stored.account_tasks["acc1"][-1] == "new"


def test_a_task_row_set_aside_at_load_is_moved_to_the_kept_records(
    tmp_path: Path,
    state: PostgresState,
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    """A load that repaired something writes it: a row no longer restorable is kept, and a
    kept record restorable again is a task row (both at once: as many rows as before)."""
    leader = make_leadership()
    assert leader.try_acquire()
    commit(
        state,
        leader.fence(),
        full=FullState(
            [TaskRow.of(record("a")), TaskRow.of(record("b"))],
            [plain(record("x"))],
            {"acc": ["a", "b", "x"]},
        ),
    )
    with connect() as connection:
        connection.execute(
            "UPDATE td_tasks SET record = jsonb_set(record, '{interval}', '\"soon\"') "
            "WHERE cluster = %s AND task_id = 'b'",
            (cluster,),
        )
    store = JsonJobStore(
        tmp_path, timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, leader)
    )
    assert sorted(r.task_id for r in store.table.records()) == ["a", "x"]
    store.close()
    stored = state.load()
    assert stored is not None
    assert [raw["task_id"] for raw in stored.kept] == ["b"]
    assert sorted(raw["task_id"] for raw in stored.tasks[: len(stored.sealed)]) == ["a", "x"]
    assert stored.sealed == [True, True]
    assert sorted(stored.account_tasks["acc"]) == ["a", "b", "x"]  # the unrestorable one last


# ---------------------------------------------------------------------- one JSON array


def test_sealed_tasks_load_as_one_json_array_in_file_order(
    state: PostgresState, fence: Fence, connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    rows = [TaskRow.of(record(name)) for name in ("a", "b", "c")]
    commit(state, fence, full=FullState(rows, [], {"acc": ["a", "b", "c"]}))
    with connect() as connection:  # "a" rewritten: last in the table's physical order
        connection.execute(
            "UPDATE td_tasks SET record_text = record_text WHERE cluster = %s AND task_id = 'a'",
            (cluster,),
        )
    deferred = state.load(defer_tasks=True)
    assert deferred is not None
    assert deferred.tasks == []
    assert deferred.sealed_tasks == b"[" + b",".join(row.text.encode() for row in rows) + b"]"
    document = deferred.document()
    assert (document.tasks_deferred, document.trusted) == (True, True)
    assert document.parse_tasks() == [plain(record(name)) for name in ("a", "b", "c")]

    with connect() as connection:  # an edited record: every task is parsed, and checked
        connection.execute(
            "UPDATE td_tasks SET record = jsonb_set(record, '{interval}', '7200') "
            "WHERE cluster = %s AND task_id = 'b'",
            (cluster,),
        )
    deferred = state.load(defer_tasks=True)
    assert deferred is not None
    assert deferred.sealed_tasks is None
    assert [raw["task_id"] for raw in deferred.tasks] == ["a", "b", "c"]
    assert deferred.sealed == [True, False, True]


def test_a_sealed_row_invalid_today_is_kept_and_the_others_restored(
    state: PostgresState,
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    leader = make_leadership()
    assert leader.try_acquire()
    rows = [TaskRow.of(record(name)) for name in ("a", "b", "c")]
    commit(state, leader.fence(), full=FullState(rows, [], {"acc": ["a", "b", "c"]}))
    with connect() as connection:  # sealed, yet not a valid record (as if the model changed)
        connection.execute(
            "UPDATE td_tasks SET record_text = replace(record_text, '\"interval\":3600', "
            "'\"interval\":\"soon\"') WHERE cluster = %s AND task_id = 'b'",
            (cluster,),
        )
    deferred = state.load(defer_tasks=True)
    assert deferred is not None
    assert deferred.sealed_tasks is not None
    storage = PostgresStorage(state, leader)
    loaded = storage.load(SHANGHAI, now=T0)
    assert [r.task_id for r in loaded.records] == ["a", "c"]
    assert [(raw["task_id"], raw["interval"], task_id) for raw, task_id in loaded.kept] == [
        ("b", "soon", "b")
    ]


# ---------------------------------------------------------------------- a NUL character


def nul_record(task_id: str, **changes: Any) -> TaskRecord:
    """A record whose kwargs hold a NUL character, and the six characters ``\\u0000``."""
    kwargs = {"task_id": task_id, "note": "a\x00b\x00", "escaped": "\\u0000", "both": "\\\x00"}
    return record(task_id, kwargs=kwargs, last_error="Error: at\x00", **changes)


def test_a_nul_character_is_kept_exactly_whole_or_changed_few_or_many(
    state: PostgresState, fence: Fence, connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> None:
    # Valid JSON that jsonb cannot hold: the text keeps it, the jsonb holds U+FFFD.
    whole = nul_record("whole")
    commit(state, fence, full=FullState([TaskRow.of(whole)], [], {"acc": ["whole"]}))
    one = nul_record("one")
    commit(state, fence, changes=[("one", TaskRow.of(one))])
    many = [nul_record(f"m{i}") for i in range(FEW + 1)]  # applied set-wise
    commit(state, fence, changes=[(r.task_id, TaskRow.of(r)) for r in many])
    stored = state.load()
    assert stored is not None
    assert stored.tasks == [plain(r) for r in (whole, one, *many)]
    assert stored.sealed == [True] * (FEW + 3)
    with connect() as connection:
        rows = connection.execute(
            "SELECT record->'kwargs'->>'note', record->'kwargs'->>'escaped', "
            "record->'kwargs'->>'both', record->>'last_error' FROM td_tasks WHERE cluster = %s",
            (cluster,),
        ).fetchall()
    assert set(rows) == {("a\ufffdb\ufffd", "\\u0000", "\\\ufffd", "Error: at\ufffd")}


def test_a_version_2_database_is_migrated_and_then_keeps_a_nul_character(
    empty_database: str, make_leadership: Callable[..., Leadership]
) -> None:
    connect = connector(empty_database, timeout=5)
    with psycopg.connect(empty_database, autocommit=True) as connection:
        ensure_schema(connection)
        connection.execute("DROP FUNCTION td_jsonb; UPDATE td_schema SET version = 2")
    state = PostgresState(connect, "default")
    leader = Leadership(connect, "default", holder="leader")
    try:
        assert leader.try_acquire()
        commit(state, leader.fence(), changes=[("n", TaskRow.of(nul_record("n")))])
        stored = state.load()
        assert stored is not None
        assert stored.tasks == [plain(nul_record("n"))]
        with psycopg.connect(empty_database, autocommit=True) as connection:
            assert schema_version(connection) == SCHEMA_VERSION == 3
    finally:
        state.close()
        leader.stop(release=True)
