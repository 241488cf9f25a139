"""``dispatch_config.json`` in and out of the PostgreSQL store, and the store behind the JSON
job store's storage protocol."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import SHANGHAI, T0, record, seed_file, seed_task

from jobstores import JsonJobStore
from jobstores.format import CorruptFileError
from jobstores.postgres import (
    Fence,
    Leadership,
    NotLeadingError,
    PostgresState,
    PostgresStorage,
    PostgresStoreError,
    StaleLeaderError,
    export_document,
    import_document,
)
from jobstores.storage import SnapshotStorage
from scheduler.errors import NewerFormatError
from tasks import TaskStatus
from tasks.model import TaskRecord

from .test_lease import expired, wait_for


def written_by_the_json_store(directory: Path, *, with_kept: bool) -> bytes:
    """A dispatch_config.json as today's JSON store writes it, after a few changes."""
    directory.mkdir()
    if with_kept:
        # A file with a top-level key of a person's and a record that cannot be restored:
        # the store keeps both and writes the file again at once.
        (directory / "dispatch_config.json").write_text(
            json.dumps(
                {
                    "version": "1.0",
                    "saved_at": "2026-01-08T08:00:00+08:00",
                    "comment": {"by": "ops", "keys": [3, 1]},
                    "tasks": [{"task_id": "broken", "account_id": "acc", "interval": "often"}],
                    "account_tasks": {"acc": ["broken"]},
                },
                ensure_ascii=False,
            )
        )
    store = JsonJobStore(directory, timezone=SHANGHAI, now=T0, storage=SnapshotStorage(directory))
    store.add_tasks(
        [
            record("a", account_name="账号 a", kwargs={"z": 1, "a": [2.5, None], "m": "é"}),
            record("b", at=T0 + timedelta(minutes=5)),
            record("c", account="other", note={"y": 1, "b": 2}),
            record("d"),
        ]
    )
    store.update_task("b", lambda r: r.model_copy(update={"status": TaskStatus.PAUSED}))
    store.reorder("d", 0)
    store.remove_task("a")
    store.add_tasks([record("a", kwargs={"second": True, "first": False})])
    assert store.save()
    store.close()
    return (directory / "dispatch_config.json").read_bytes()


@pytest.mark.parametrize("with_kept", [False, True], ids=["sealed", "with-kept-records"])
def test_a_file_written_by_the_json_store_round_trips_byte_for_byte(
    tmp_path: Path, state: PostgresState, fence: Fence, with_kept: bool
) -> None:
    original = written_by_the_json_store(tmp_path / "json", with_kept=with_kept)
    assert (b'"checksum"' in original) is not with_kept
    summary = import_document(state, fence, original)
    assert (summary.restored, summary.kept) == (4, int(with_kept))
    assert export_document(state) == original


def test_a_seed_file_comes_back_with_the_same_tasks(
    tmp_path: Path, state: PostgresState, fence: Fence
) -> None:
    tasks = [seed_task("t1"), seed_task("t2", account_id="account_2"), seed_task("t3")]
    original = seed_file(tasks, {"account_1": ["t3", "t1", "ghost"], "account_2": ["t2"]})
    import_document(state, fence, original, zone=SHANGHAI)
    exported = export_document(state)
    document = json.loads(exported)
    assert document["tasks"] == tasks  # the seed's objects, as they were
    # The order the dispatcher holds once it loads the file (an unknown id dropped).
    assert document["account_tasks"] == {"account_1": ["t3", "t1"], "account_2": ["t2"]}
    assert document["timezone"] == "Asia/Shanghai"
    assert "checksum" not in document  # not written by this library: validated at load

    def loaded(data: bytes, directory: Path) -> list[TaskRecord]:
        directory.mkdir()
        (directory / "dispatch_config.json").write_bytes(data)
        store = JsonJobStore(directory, timezone=SHANGHAI, now=T0)
        try:
            return store.table.records()
        finally:
            store.close()

    assert loaded(exported, tmp_path / "exported") == loaded(original, tmp_path / "original")


def test_import_refuses_what_it_cannot_read_and_writes_nothing(
    state: PostgresState, fence: Fence
) -> None:
    with pytest.raises(CorruptFileError):
        import_document(state, fence, b"{not json")
    with pytest.raises(NewerFormatError):
        import_document(state, fence, seed_file([seed_task()], version="2.0"))
    assert state.load() is None


def test_import_replaces_a_cluster_holding_tasks_only_when_asked(
    state: PostgresState, fence: Fence
) -> None:
    import_document(state, fence, seed_file([seed_task("t1")]), zone=SHANGHAI)
    with pytest.raises(PostgresStoreError, match="holds 1 task"):
        import_document(state, fence, seed_file([seed_task("t2")]), zone=SHANGHAI)
    import_document(state, fence, seed_file([seed_task("t2")]), zone=SHANGHAI, replace=True)
    stored = state.load()
    assert stored is not None
    assert [t["task_id"] for t in stored.tasks] == ["t2"]


def test_an_import_under_a_deposed_leaders_fence_is_refused(
    state: PostgresState,
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    old = make_leadership(holder="old", lease=0.3)
    assert old.try_acquire()
    fence = old.fence()
    wait_for(expired(connect, cluster))
    assert make_leadership(holder="new").try_acquire()
    with pytest.raises(StaleLeaderError):
        import_document(state, fence, seed_file([seed_task()]), zone=SHANGHAI)
    assert state.load() is None


def test_an_empty_store_exports_an_empty_document(state: PostgresState) -> None:
    document = json.loads(export_document(state))
    assert document["tasks"] == []
    assert document["account_tasks"] == {}
    assert document["version"] == "1.0"


# ---------------------------------------------------------------------- the adapter


def test_the_json_job_store_keeps_its_state_in_postgresql(
    tmp_path: Path, state: PostgresState, make_leadership: Callable[..., Leadership]
) -> None:
    leader = make_leadership()
    assert leader.try_acquire()

    def open_store(directory: Path) -> JsonJobStore:
        return JsonJobStore(
            directory, timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, leader)
        )

    store = open_store(tmp_path / "one")
    store.add_tasks([record("a"), record("b"), record("c", account="other")])
    assert store.save()
    store.update_task("a", lambda r: r.model_copy(update={"interval": 7200}))
    store.reorder("b", 0)
    store.remove_task("c")
    assert store.save()
    records, order = store.table.records(), store.table.account_tasks()
    store.close()
    assert not (tmp_path / "one" / "dispatch_config.json").exists()
    # Another instance (another directory) loads the same state from the database.
    again = open_store(tmp_path / "two")
    try:
        assert again.table.records() == records
        assert again.table.account_tasks() == order == {"acc": ["b", "a"]}
        assert again.table.get("a").interval == 7200
    finally:
        again.close()


def test_a_store_whose_instance_does_not_lead_cannot_save(
    tmp_path: Path, state: PostgresState, make_leadership: Callable[..., Leadership]
) -> None:
    leader = make_leadership()
    assert leader.try_acquire()
    store = JsonJobStore(
        tmp_path, timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, leader)
    )
    try:
        store.add_tasks([record("a")])
        assert store.save()
        leader.release()
        store.add_tasks([record("b")])
        assert not store.save()
        assert "does not lead" in (store.save_health.last_error or "")
        with pytest.raises(NotLeadingError):
            leader.fence()
    finally:
        store.close()
    stored = state.load()
    assert stored is not None
    assert [t["task_id"] for t in stored.tasks] == ["a"]


def test_a_store_whose_instance_was_taken_over_cannot_save(
    tmp_path: Path,
    state: PostgresState,
    make_leadership: Callable[..., Leadership],
    connect: Callable[[], psycopg.Connection[Any]],
    cluster: str,
) -> None:
    old = make_leadership(holder="old", lease=0.3)  # its own clock never moves: it believes
    assert old.try_acquire()
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0, storage=PostgresStorage(state, old))
    try:
        store.add_tasks([record("a")])
        assert store.save()
        old.stop(release=False)  # its renewals stop (a frozen instance)
        wait_for(expired(connect, cluster))
        assert make_leadership(holder="new").try_acquire()
        store.add_tasks([record("b")])
        assert not store.save()
        assert "epoch 1 refused" in (store.save_health.last_error or "")
        assert store.table.unsaved() == ("b",)
    finally:
        store.close()
    stored = state.load()
    assert stored is not None
    assert [t["task_id"] for t in stored.tasks] == ["a"]
