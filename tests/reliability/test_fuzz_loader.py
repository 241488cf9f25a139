"""The loader against hostile input: arbitrary bytes, arbitrary JSON, damaged records."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstores import JsonJobStore
from jobstores.jsonfile import parse_record
from scheduler import TaskDispatcher
from scheduler.errors import InvalidTaskError, NewerFormatError

UTC = ZoneInfo("UTC")
NOW = datetime(2026, 1, 8, 10, 0, tzinfo=UTC)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Manager:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def run(self) -> None:
        return None


@contextmanager
def directory_with(content: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        path = Path(name)
        (path / "dispatch_config.json").write_bytes(content)
        yield path


def load(directory: Path) -> JsonJobStore | None:
    """Open the store; the one allowed refusal is a newer format."""
    try:
        return JsonJobStore(directory, timezone=UTC, now=NOW)
    except NewerFormatError:
        return None


def round_trips(store: JsonJobStore, directory: Path) -> None:
    records, kept = store.table.records(), store.table.kept_records()
    store.table.touch()
    assert store.save()
    store.close()
    again = load(directory)
    assert again is not None
    try:
        assert again.table.records() == records
        assert again.table.kept_records() == kept
    finally:
        again.close()


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(content: bytes) -> None:
    with directory_with(content) as directory:
        store = load(directory)
        if store is not None:
            round_trips(store, directory)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "version": st.sampled_from(["1.0", "0.9", "1", 1, None]),
                "tasks": json_values,
                "account_tasks": json_values,
            }
        ),
    )
)
def test_arbitrary_json(document: Any) -> None:
    with directory_with(json.dumps(document).encode()) as directory:
        store = load(directory)
        if store is not None:
            round_trips(store, directory)


def valid_task(n: int, account: str) -> dict[str, Any]:
    return {
        "task_id": f"t{n}",
        "account_id": account,
        "account_name": None,
        "task_type": "x",
        "sys_type": "s",
        "status": "pending",
        "interval": 60,
        "valid_time_range": [0, 24],
        "task_end_time": None,
        "last_execution_time": None,
        "next_execution_time": "2026-01-08T10:00:00+00:00",
        "created_at": "2026-01-08T09:00:00",
        "updated_at": "2026-01-08T09:00:00+00:00",
        "kwargs": {"task_id": f"t{n}", "task_type": "x"},
    }


DAMAGE: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("wrong type", lambda t: {**t, "interval": "sixty"}),
    ("wrong type", lambda t: {**t, "valid_time_range": "all day"}),
    ("wrong type", lambda t: {**t, "kwargs": ["not", "a", "dict"]}),
    ("missing key", lambda t: {k: v for k, v in t.items() if k != "account_id"}),
    ("missing key", lambda t: {k: v for k, v in t.items() if k != "task_id"}),
    ("unknown status", lambda t: {**t, "status": "hibernating"}),
    ("huge number", lambda t: {**t, "interval": 10**400}),
    ("huge number", lambda t: {**t, "run_count": -(10**30)}),
    ("bad datetime", lambda t: {**t, "created_at": "yesterday"}),
    ("bad window", lambda t: {**t, "valid_time_range": [5, 5]}),
    ("not an object", lambda t: [t]),
    ("harmless", lambda t: {**t, "unknown_key": {"nested": True}}),
    ("harmless", lambda t: {**t, "status": "running"}),
]


@FUZZ
@given(
    count=st.integers(1, 6),
    accounts=st.lists(st.sampled_from(["a", "b", "c"]), min_size=6, max_size=6),
    damage=st.lists(st.tuples(st.integers(0, 5), st.integers(0, len(DAMAGE) - 1)), max_size=4),
    duplicates=st.lists(st.integers(0, 5), max_size=2),
    listing=st.sampled_from(["exact", "ghost", "missing", "wrong-account", "garbage"]),
)
def test_damaged_records_are_kept_and_intact_ones_restored(
    count: int,
    accounts: list[str],
    damage: list[tuple[int, int]],
    duplicates: list[int],
    listing: str,
) -> None:
    tasks: list[Any] = [valid_task(n, accounts[n]) for n in range(count)]
    for index, kind in damage:
        if index < len(tasks) and isinstance(tasks[index], dict):
            tasks[index] = DAMAGE[kind][1](tasks[index])
    for index in duplicates:
        if index < len(tasks) and isinstance(tasks[index], dict):
            tasks.append({**tasks[index], "account_name": "duplicate"})
    order: Any = {}
    for n in range(count):
        order.setdefault(accounts[n], []).append(f"t{n}")
    if listing == "ghost":
        order.setdefault("a", []).append("ghost")
    elif listing == "missing" and order:
        order.pop(next(iter(order)))
    elif listing == "wrong-account":
        order = {"z": [f"t{n}" for n in range(count)]}
    elif listing == "garbage":
        order = ["not", "an", "object"]
    document = {"version": "1.0", "saved_at": None, "tasks": tasks, "account_tasks": order}
    encoded = json.dumps(document).encode()

    intact: list[str] = []
    seen: set[str] = set()
    for raw in tasks:
        try:
            record = parse_record(raw, UTC)
        except InvalidTaskError:
            continue
        if record.task_id not in seen:
            intact.append(record.task_id)
        seen.add(record.task_id)

    with directory_with(encoded) as directory:
        store = load(directory)
        assert store is not None
        restored = [r.task_id for r in store.table.records()]
        assert restored == intact
        # Nothing dropped: every record is restored or kept verbatim.
        assert len(restored) + len(store.table.kept_records()) == len(tasks)
        assert {tid for ids in store.table.account_tasks().values() for tid in ids} == set(restored)
        round_trips(store, directory)


@pytest.mark.parametrize(
    "content", [b'\xff\xfe{"tasks": []}', '{"tasks": ["\udcff"]}'.encode("utf-8", "surrogatepass")]
)
def test_non_utf8_is_set_aside(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "dispatch_config.json").write_bytes(content)
    store = load(tmp_path)
    assert store is not None
    assert store.table.records() == []
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1
    store.close()


def test_the_file_cannot_name_code_to_import(tmp_path: Path) -> None:
    """Task types resolve through the configured factory only; nothing in the file is imported."""
    from tasks import TaskTypeRegistry

    task = valid_task(0, "a") | {
        "task_type": "os:system",
        "kwargs": {"task_id": "t0", "task_type": "os:system"},
    }
    (tmp_path / "dispatch_config.json").write_text(json.dumps({"version": "1.0", "tasks": [task]}))
    dispatcher = TaskDispatcher(tmp_path, task_manager_factory=TaskTypeRegistry(), timezone=UTC)
    try:
        assert dispatcher.list_tasks() == []
        assert dispatcher._store.table.kept_records() == [task]
    finally:
        dispatcher.close()


# ---------------------------------------------------------------------- the journal


def _journal_directory(directory: Path, commits: int) -> list[tuple[list[Any], Any]]:
    """A snapshot and a journal of ``commits`` commits; the state after each (prefixes)."""
    from jobstores.journal import JournalStorage

    store = JsonJobStore(
        directory, timezone=UTC, now=NOW, storage=JournalStorage(directory), snapshot_below=0
    )
    store.add_tasks([parse_record(valid_task(0, "a"), UTC)])
    assert store.save()  # the snapshot
    states = [(store.table.records(), store.table.account_tasks())]
    for n in range(1, commits + 1):
        if n % 3 == 0:
            store.reorder(f"t{n - 1}", 0)
        else:
            store.add_tasks([parse_record(valid_task(n, "ab"[n % 2]), UTC)])
        assert store.save()
        states.append((store.table.records(), store.table.account_tasks()))
    store._saver._closed = True  # a crash: the journal stays as it is
    store._storage.close()
    store._storage.release()
    return states


@FUZZ
@given(
    commits=st.integers(1, 6),
    where=st.floats(0, 1),
    damage=st.sampled_from(["truncate", "flip", "insert", "zero-fill"]),
    byte=st.integers(0, 255),
)
def test_a_damaged_journal_loads_a_prefix_of_its_commits(
    commits: int, where: float, damage: str, byte: int
) -> None:
    from jobstores.loading import journal_segments

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        states = _journal_directory(directory, commits)
        (_, segment), *_ = journal_segments(directory)
        original = segment.read_bytes()
        ends, offset = [], 0  # where each commit's last line ends (its newline)
        for line in original.splitlines(keepends=True):
            offset += len(line)
            if b'"commit":true' in line:
                ends.append(offset - 1)
        data = bytearray(original)
        at = min(int(where * len(data)), len(data) - 1)
        if damage == "truncate":
            del data[at:]
        elif damage == "flip":
            data[at] ^= byte or 1
        elif damage == "insert":
            data[at:at] = bytes([byte])
        else:
            data[at:] = bytes(len(data) - at)
        segment.write_bytes(bytes(data))
        store = load(directory)
        assert store is not None
        try:
            got = (store.table.records(), store.table.account_tasks())
            # The snapshot plus every commit written whole before the damage, and nothing
            # after it (unless the damage is harmless, such as a blank line).
            before = sum(end < at for end in ends)
            assert got in (states[before], states[-1])
        finally:
            store.close()
