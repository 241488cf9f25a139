"""The journal backend: damage at the tail and in the middle, crashes around a compaction,
failed appends, readers, and a property test of changes, compactions and reloads."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from helpers import SHANGHAI, T0, read_file, read_state, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstores import JsonJobStore, order, pacing, snapshot_write
from jobstores.format import decode_journal_line
from jobstores.journal import JournalStorage
from jobstores.loading import JOURNAL_PREFIX, journal_segments
from jobstores.snapshot import read_snapshot, validate_state_file
from jobstores.storage import SnapshotStorage
from jobstores.table import StateImage
from tasks import TaskRecord, TaskStatus, lifecycle


class ProbedJournal(JournalStorage):
    """A journal whose next commit can fail before writing anything (``fail``), or call
    ``during`` once, in the middle of writing its lines (as a change made by another thread
    while the save is in progress would land)."""

    fail = False
    during: Callable[[], None] | None = None
    after_lines = 300

    def commit(self, image: StateImage, saved_at: Any) -> None:
        if self.fail:
            raise OSError(errno.EIO, "failing as asked")
        super().commit(image, saved_at)

    def _lines(self, image: StateImage, seq: int, count: int) -> Iterator[bytes]:
        for index, line in enumerate(super()._lines(image, seq, count)):
            if index == self.after_lines and self.during is not None:
                during, self.during = self.during, None
                during()
            yield line


def open_store(directory: Path, *, snapshot_below: int = 0, **options: Any) -> JsonJobStore:
    """A store on a probed journal that takes every change (none below the threshold)."""
    return JsonJobStore(
        directory,
        timezone=SHANGHAI,
        now=T0,
        storage=ProbedJournal(directory, **options),
        snapshot_below=snapshot_below,
    )


def probe(store: JsonJobStore) -> ProbedJournal:
    storage = store._storage
    assert isinstance(storage, ProbedJournal)
    return storage


def crash(store: JsonJobStore) -> None:
    """Let the store go as a killed process would: no close, no final snapshot."""
    store._storage._wait_compaction()  # type: ignore[attr-defined]
    store._storage._close_segment()  # type: ignore[attr-defined]
    store._saver._closed = True
    store._storage.release()


def assert_reloads_after_a_crash(store: JsonJobStore, directory: Path, expected: Any) -> None:
    """Crash ``store``, open ``directory`` again and check it holds ``expected``."""
    crash(store)
    again = open_store(directory)
    try:
        assert state(again) == expected
    finally:
        again.close()


def ran(count: int) -> Callable[[TaskRecord], TaskRecord]:
    return lambda record: record.replace(run_count=count)


def state(store: JsonJobStore) -> tuple[list[Any], dict[str, list[str]], list[Any]]:
    return store.table.records(), store.table.account_tasks(), store.table.kept_records()


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Path, Any]:
    """A store with a snapshot of a, b and a journal holding: pause a, add c, reorder c."""
    store = open_store(tmp_path)
    store.add_tasks([record("a"), record("b")])
    assert store.save()  # the first commit of a new directory writes the snapshot
    store.update_task("a", lambda r: lifecycle.paused(r, T0))
    assert store.save()
    store.add_tasks([record("c")])
    assert store.save()
    store.reorder("c", 0)
    assert store.save()
    expected = state(store)
    crash(store)
    return tmp_path, expected


def segment(directory: Path) -> Path:
    return journal_segments(directory)[-1][1]


def test_a_journal_left_by_a_crash_with_no_snapshot_change_is_replayed(
    seeded: tuple[Path, Any],
) -> None:
    directory, expected = seeded
    assert [t["task_id"] for t in read_file(directory)["tasks"]] == ["a", "b"]
    store = open_store(directory)
    try:
        assert state(store) == expected
    finally:
        store.close()
    # Closing folds the journal into the file a person reads, and drops it.
    assert read_file(directory)["account_tasks"] == {"acc": ["c", "a", "b"]}
    assert journal_segments(directory) == []


def test_readers_see_the_snapshot_and_the_journal(seeded: tuple[Path, Any]) -> None:
    directory, expected = seeded
    snapshot = read_snapshot(directory)
    assert snapshot.records == expected[0]
    assert snapshot.account_tasks == expected[1]
    assert validate_state_file(directory / "dispatch_config.json") == []


@pytest.mark.parametrize("cut", ["torn", "checksum", "half a commit"])
def test_a_torn_or_failing_tail_is_dropped_with_a_warning(
    seeded: tuple[Path, Any], cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory, expected = seeded
    path = segment(directory)
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if cut == "torn":
        path.write_bytes(data + lines[0][:40])
    elif cut == "checksum":
        path.write_bytes(data + lines[0].replace(b'"seq":', b'"seq": '))
    else:  # the last commit (the reorder: a put and an order line) loses its last line
        path.write_bytes(b"".join(lines[:-1]))
        expected = None
    with caplog.at_level(logging.WARNING):
        store = open_store(directory)
    try:
        if expected is None:  # the reorder never happened
            assert store.table.account_tasks() == {"acc": ["a", "b", "c"]}
        else:
            assert state(store) == expected
        assert any("dropped" in r.getMessage() for r in caplog.records)
        assert not list(directory.glob("*.corrupt-*"))
        # The tail was cut: what is appended next is not behind garbage.
        store.update_task("b", lambda r: r.replace(run_count=4))
        assert store.save()
        crash(store)
        again = open_store(directory)
        assert again.table.get("b").run_count == 4
        again.close()
    finally:
        store.close()


def test_a_bad_line_in_the_middle_is_set_aside_never_skipped(
    seeded: tuple[Path, Any], caplog: pytest.LogCaptureFixture
) -> None:
    directory, _ = seeded
    path = segment(directory)
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4  # pause a | add c | reorder c (put, order)
    lines[1] = lines[1].replace(b'"task_id":"c"', b'"task_id":"C"')  # fails its checksum
    path.write_bytes(b"".join(lines))

    problems = validate_state_file(directory / "dispatch_config.json")
    assert [p.where for p in problems] == ["journal"]
    assert "damaged" in problems[0].message
    with caplog.at_level(logging.ERROR):
        store = open_store(directory)
    try:
        # What came before the damage is restored; nothing after it is applied.
        assert store.table.get("a").status is TaskStatus.PAUSED
        assert store.table.find("c") is None
        assert any("journal is damaged" in r.getMessage() for r in caplog.records)
        (aside,) = directory.glob(f"{JOURNAL_PREFIX}*.corrupt-*")
        assert aside.read_bytes() == b"".join(lines)  # kept for a person, as it was
        assert read_file(directory)["journal_seq"] == 1  # the restored part is in the file
        store.add_tasks([record("d")])
        assert store.save()
        crash(store)
        again = open_store(directory)
        assert [r.task_id for r in again.table.records()] == ["a", "b", "d"]
        again.close()
    finally:
        store.close()


@pytest.mark.parametrize("step", ["before the snapshot", "before the journal is dropped"])
def test_a_crash_at_any_step_of_a_compaction_loses_nothing_and_applies_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    store = open_store(tmp_path, max_bytes=1)
    store.add_tasks([record("a"), record("b"), record("c", account="x")])
    assert store.save()
    storage = store._storage
    assert isinstance(storage, JournalStorage)
    if step == "before the snapshot":
        monkeypatch.setattr(storage, "_write_snapshot", lambda *a: None)
    monkeypatch.setattr(storage, "_drop_segments", lambda seq: None)
    # Changes that replaying twice would get wrong: a move, a removal, a re-add.
    store.reorder("b", 0)
    assert store.save()  # asks for a compaction (the threshold is one byte)
    store.remove_task("a")
    store.add_tasks([record("a", account="x")])
    assert store.save()
    store.reorder("a", 0)
    assert store.save()
    expected = state(store)
    assert_reloads_after_a_crash(store, tmp_path, expected)


def test_the_journal_is_folded_in_the_background_past_its_threshold(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_bytes=2000)
    store.add_tasks([record(f"t{n}") for n in range(5)])
    assert store.save()
    storage = store._storage
    assert isinstance(storage, JournalStorage)
    for n in range(30):
        store.update_task(f"t{n % 5}", ran(n))
        assert store.save()
    storage._wait_compaction()
    assert storage.compactions >= 2
    assert len(journal_segments(tmp_path)) <= 1  # the covered segments are gone
    assert read_state(tmp_path)["tasks"] == [r.to_json_dict() for r in store.table.records()]
    store.close()


def test_let_go_empties_a_list_a_piece_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    items = list(range(100))
    monkeypatch.setattr(pacing, "pause", lambda: sizes.append(len(items)))
    pacing.let_go(items, 32)
    assert (items, sizes) == ([], [68, 36, 4])  # a pause between pieces, none after the last


def test_a_compaction_lets_go_of_the_encoded_snapshot_piecemeal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Freeing the whole encoded snapshot at once (76 MB at 100,000 tasks) held the
    # interpreter, and the event loop, for milliseconds at the end of every compaction.
    released: list[list[tuple[int, int]]] = []
    real = pacing.let_go

    def spy(items: list[Any], piece: int = 32) -> None:
        released.append([(len(items[i]), sys.getrefcount(items[i])) for i in range(len(items))])
        real(items, piece)

    monkeypatch.setattr(snapshot_write, "let_go", spy)  # the snapshot's writer lets go
    store = open_store(tmp_path, max_bytes=2000)
    store.add_tasks([record(f"t{n:04d}") for n in range(600)])
    assert store.save()
    probe(store)._wait_compaction()
    assert probe(store).compactions == 1
    (parts,) = released
    # The chunks of 256, 256 and 88 tasks; the list is their last holder (2: the list and
    # getrefcount's argument), so emptying it piecemeal is what frees them.
    chunks = [holders for size, holders in parts if size > 20_000]
    assert chunks == [2, 2, 2]
    assert read_state(tmp_path)["tasks"] == [r.to_json_dict() for r in store.table.records()]
    store.close()


def test_enospc_while_appending_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    store.add_tasks([record("a")])
    assert store.save()
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 20:
            real_write(fd, bytes(data[: len(data) // 2]))  # part of the commit lands ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then the disk is full

    monkeypatch.setattr(os, "write", half_then_full)
    store.update_task("a", lambda r: r.replace(run_count=1))
    assert not store.save()
    monkeypatch.setattr(os, "write", real_write)
    store.update_task("a", lambda r: r.replace(run_count=2))
    assert store.save()
    crash(store)
    again = open_store(tmp_path)
    try:
        assert again.table.get("a").run_count == 2
        assert not list(tmp_path.glob("*.corrupt-*"))
    finally:
        again.close()


def test_an_append_that_cannot_be_undone_is_followed_by_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    store.add_tasks([record("a")])
    assert store.save()
    real_write = os.write

    def garbage(fd: int, data: Any) -> int:
        real_write(fd, b'{"seq":2,"put":{"task')
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", garbage)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    store.update_task("a", lambda r: r.replace(run_count=1))
    assert not store.save()
    monkeypatch.undo()
    store.update_task("a", lambda r: r.replace(run_count=2))
    assert store.save()  # writes the whole snapshot, past the garbage
    assert read_file(tmp_path)["tasks"][0]["run_count"] == 2
    store.add_tasks([record("b")])
    assert store.save()
    crash(store)
    again = open_store(tmp_path)
    try:
        assert [r.run_count for r in again.table.records()] == [2, 0]
        assert not list(tmp_path.glob("*.corrupt-*"))
    finally:
        again.close()


def test_the_snapshot_backend_folds_a_journal_left_behind(seeded: tuple[Path, Any]) -> None:
    directory, expected = seeded
    store = JsonJobStore(directory, timezone=SHANGHAI, now=T0, storage=SnapshotStorage(directory))
    assert state(store) == expected
    store.table.touch()
    assert store.save()
    store.close()
    assert journal_segments(directory) == []
    again = open_store(directory)  # and back: nothing replayed twice
    assert state(again) == expected
    again.close()


def test_changes_made_while_a_save_writes_go_to_the_next_save_in_order(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    ids = [f"t{i:03d}" for i in range(600)]
    store.add_tasks([record(task_id) for task_id in ids])
    assert store.save()
    for task_id in ids:
        store.update_task(task_id, ran(1))
    captured = state(store)

    def meanwhile() -> None:  # past the first chunk of lines: t000 is written, t599 not yet
        store.update_task("t000", ran(2))
        store.update_task("t599", ran(2))
        store.remove_task("t001")
        store.add_tasks([record("new")])
        store.reorder("t599", 0)

    probe(store).during = meanwhile
    assert store.save()
    assert not store.saver.durable
    assert set(store.save_health.unsaved_task_ids) == {"t000", "t599", "t001", "new"}
    assert read_state(tmp_path)["tasks"] == [r.to_json_dict() for r in captured[0]]
    assert read_state(tmp_path)["account_tasks"] == captured[1]
    assert store.save()
    assert store.saver.durable
    expected = state(store)
    assert expected[1]["acc"][:2] == ["t599", "t000"]
    assert expected[1]["acc"][-1] == "new"
    crash(store)
    again = open_store(tmp_path)
    try:
        assert state(again) == expected
        assert [again.table.get(t).run_count for t in ("t000", "t002", "t599")] == [2, 1, 2]
    finally:
        again.close()


def test_a_failed_save_is_written_again_before_the_changes_made_since(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.add_tasks([record("a"), record("b"), record("c")])
    assert store.save()
    store.update_task("a", ran(1))
    store.remove_task("b")
    probe(store).fail = True
    assert not store.save()
    probe(store).fail = False
    assert set(store.save_health.unsaved_task_ids) == {"a", "b"}
    store.add_tasks([record("b"), record("d")])  # b again: last in its account now
    store.update_task("a", ran(2))
    assert store.save()
    expected = state(store)
    assert expected[1] == {"acc": ["a", "c", "b", "d"]}
    crash(store)
    again = open_store(tmp_path)
    try:
        assert state(again) == expected
        assert again.table.get("a").run_count == 2
    finally:
        again.close()


def journal_kinds(directory: Path) -> list[str]:
    lines = segment(directory).read_bytes().splitlines()
    return [line.kind for line in map(decode_journal_line, lines) if line is not None]


@pytest.mark.parametrize("many", [False, True], ids=["moves", "whole order"])
def test_reorders_are_saved_at_a_cost_per_reordered_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    if many:  # past the limit, the account's whole order is written instead
        monkeypatch.setattr(order, "MOVES_PER_ACCOUNT", 2)
    store = open_store(tmp_path)
    store.add_tasks([record(f"t{i}") for i in range(8)] + [record("x", account="other")])
    assert store.save()
    # Reorders that depend on each other, a removal and an addition, in one commit.
    store.reorder("t7", 0)
    store.reorder("t6", 0)  # t6 now stands before t7, which moved too
    store.reorder("t3", 6)
    store.remove_task("t1")
    store.add_tasks([record("new")])
    store.reorder("new", 2)
    assert store.save()
    expected = state(store)
    assert expected[1]["acc"] == ["t6", "t7", "new", "t0", "t2", "t4", "t3", "t5"]
    kinds = journal_kinds(tmp_path)
    assert kinds.count("remove") == 1
    if many:
        assert kinds.count("order") == 1
        assert "move" not in kinds
    else:  # one line per reordered task; the other tasks of the account are not written
        assert kinds.count("move") == 4
        assert "order" not in kinds
    assert_reloads_after_a_crash(store, tmp_path, expected)


@pytest.mark.parametrize("host_enabled", [True, False])
def test_a_store_leaves_the_hosts_collector_alone(
    tmp_path: Path, host_enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading, starting and closing a store, however large, never freezes, enables or
    disables the process-wide cyclic collector: that is the host's."""
    import gc

    from jobstores import jsonfile

    store = open_store(tmp_path)
    store.add_tasks([record(f"t{i}") for i in range(50)])
    assert store.save()
    store.close()
    # Whatever size a store once counted as large, this one is (no attribute: no threshold).
    monkeypatch.setattr(jsonfile, "FREEZE_AT", 2, raising=False)
    frozen = gc.get_freeze_count()
    was_enabled = gc.isenabled()
    (gc.enable if host_enabled else gc.disable)()
    host = (host_enabled, frozen)
    seen: list[tuple[bool, int]] = []

    def accept(record: TaskRecord) -> None:  # called while the store loads
        seen.append((gc.isenabled(), gc.get_freeze_count()))

    try:
        store = JsonJobStore(
            tmp_path, timezone=SHANGHAI, now=T0, storage=JournalStorage(tmp_path), accept=accept
        )
        assert len(store.table.records()) == 50
        assert set(seen) == {host}
        assert (gc.isenabled(), gc.get_freeze_count()) == host
        store.start(BackgroundScheduler(timezone=SHANGHAI), "default")
        assert len(store.get_all_jobs()) == 50
        assert (gc.isenabled(), gc.get_freeze_count()) == host
        store.close()
        assert (gc.isenabled(), gc.get_freeze_count()) == host
    finally:
        (gc.enable if was_enabled else gc.disable)()
        gc.unfreeze()


# ---------------------------------------------------------------------- the threshold


def the_file(directory: Path) -> tuple[list[Any], dict[str, list[str]]]:
    """What dispatch_config.json alone says, read as a host reads it (``json.load``); no
    file yet is no task."""
    path = directory / "dispatch_config.json"
    if not path.exists():
        return [], {}
    with path.open(encoding="utf-8") as file:
        data = json.load(file)
    return data["tasks"], data["account_tasks"]


def in_memory(store: JsonJobStore) -> tuple[list[Any], dict[str, list[str]]]:
    return [r.to_json_dict() for r in store.table.records()], store.table.account_tasks()


def test_below_the_threshold_every_commit_writes_the_file_itself(tmp_path: Path) -> None:
    store = open_store(tmp_path, snapshot_below=10)
    changes: list[Callable[[], object]] = [
        lambda: store.add_tasks([record("a"), record("b"), record("c", account="x")]),
        lambda: store.update_task("a", lambda r: lifecycle.paused(r, T0)),
        lambda: store.reorder("b", 0),
        lambda: store.remove_task("c"),
        lambda: store.update_task("b", ran(3)),
    ]
    for change in changes:
        change()
        assert store.save()
        assert the_file(tmp_path) == in_memory(store)
        assert journal_segments(tmp_path) == []
    assert probe(store).compactions == len(changes)
    store.close()


def test_crossing_the_threshold_up_and_down(tmp_path: Path) -> None:
    store = open_store(tmp_path, snapshot_below=3)
    store.add_tasks([record("a"), record("b")])
    assert store.save()
    written = the_file(tmp_path)
    assert written == in_memory(store)
    store.add_tasks([record("c")])  # 3 tasks: the journal takes the change
    assert store.save()
    assert the_file(tmp_path) == written
    assert len(journal_segments(tmp_path)) == 1
    assert read_state(tmp_path)["tasks"] == in_memory(store)[0]
    store.update_task("c", ran(1))
    assert store.save()
    assert the_file(tmp_path) == written
    store.remove_task("a")  # 2 again: this commit writes the file, the journal goes
    assert store.save()
    assert the_file(tmp_path) == in_memory(store)
    assert journal_segments(tmp_path) == []
    expected = state(store)
    crash(store)
    again = open_store(tmp_path, snapshot_below=3)
    try:
        assert state(again) == expected
    finally:
        again.close()


@pytest.mark.parametrize("threshold", [0, 3, 4])
def test_a_small_store_loaded_with_a_journal_beside_its_file_folds_it_at_once(
    seeded: tuple[Path, Any], threshold: int
) -> None:
    directory, expected = seeded  # three tasks, a journal of three commits
    store = open_store(directory, snapshot_below=threshold)
    try:
        assert state(store) == expected
        if threshold > 3:
            assert the_file(directory) == in_memory(store)
            assert journal_segments(directory) == []
        else:  # a large store: the journal stays (the file follows later)
            assert the_file(directory) != in_memory(store)
            assert len(journal_segments(directory)) == 1
    finally:
        crash(store)
    again = open_store(directory)
    try:
        assert state(again) == expected
    finally:
        again.close()


async def test_above_the_threshold_the_file_follows_within_max_age_with_no_further_change(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path, max_age=0.3)
    store.add_tasks([record("a"), record("b")])
    assert await store.save_async()  # the first commit writes the file
    store.update_task("a", ran(5))
    assert await store.save_async()  # a journal line; nothing else happens from here on
    assert the_file(tmp_path) != in_memory(store)

    async def followed() -> None:
        while the_file(tmp_path) != in_memory(store):  # noqa: ASYNC110 - bounded below
            await asyncio.sleep(0.02)

    await asyncio.wait_for(followed(), 10)
    probe(store)._wait_compaction()
    assert probe(store).compactions == 2
    store.close()


# ---------------------------------------------------------------------- the property

operation = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 7), st.sampled_from(["a", "b"])),
    st.tuples(st.just("remove"), st.integers(0, 7), st.none()),
    st.tuples(st.just("update"), st.integers(0, 7), st.integers(0, 5)),
    st.tuples(st.just("reorder"), st.integers(0, 7), st.integers(0, 7)),
    st.tuples(st.just("save"), st.none(), st.none()),
    st.tuples(st.just("fail"), st.none(), st.none()),
    st.tuples(st.just("compact"), st.none(), st.none()),
    st.tuples(st.just("crash"), st.none(), st.none()),
    st.tuples(st.just("close"), st.none(), st.none()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(operation, max_size=40),
    st.sampled_from([1, 400, 1 << 20]),
    st.sampled_from([0, 2, order.MOVES_PER_ACCOUNT]),
    st.sampled_from([0, 3, 100]),
)
def test_any_interleaving_of_changes_and_compactions_reloads_as_it_was(
    operations: list[tuple[str, Any, Any]],
    threshold: int,
    moves_per_account: int,
    snapshot_below: int,
) -> None:
    # Reorders are saved as moves, or as whole orders past moves_per_account in an account;
    # with snapshot_below 3 the store crosses the threshold both ways.
    import tempfile
    from unittest import mock

    with (
        tempfile.TemporaryDirectory() as name,
        mock.patch.object(order, "MOVES_PER_ACCOUNT", moves_per_account),
    ):
        directory = Path(name)
        store = open_store(directory, max_bytes=threshold, snapshot_below=snapshot_below)
        for kind, n, arg in operations:
            task_id = f"t{n}"
            if kind == "add" and not store.table.taken(task_id):
                store.add_tasks([record(task_id, account=arg)])
            elif kind == "remove" and store.table.find(task_id):
                store.remove_task(task_id)
            elif kind == "update" and store.table.find(task_id):
                store.update_task(task_id, ran(arg))
            elif kind == "reorder" and store.table.find(task_id):
                ids = store.table.account_tasks()[store.table.get(task_id).account_id]
                store.reorder(task_id, arg % len(ids))
            elif kind == "save":
                assert store.save()
                if len(store.table.records()) < snapshot_below:
                    assert the_file(directory) == in_memory(store)
            elif kind == "fail" and not store.saver.durable:
                # A save that writes nothing: the next one writes its changes, first.
                probe(store).fail = True
                assert not store.save()
                probe(store).fail = False
            elif kind == "compact":
                store.table.touch()
                assert store.save()
            elif kind in ("crash", "close"):
                assert store.save()
                expected = state(store)
                crash(store) if kind == "crash" else store.close()
                store = open_store(directory, max_bytes=threshold, snapshot_below=snapshot_below)
                assert state(store) == expected
                if len(store.table.records()) < snapshot_below:  # loaded below: folded at once
                    assert the_file(directory) == in_memory(store)
        assert store.save()
        expected = state(store)
        crash(store)
        again = open_store(directory)
        try:
            assert state(again) == expected
            assert read_snapshot(directory, SHANGHAI).records == expected[0]
        finally:
            again.close()
