"""``TaskDispatcher(store=...)``: a store object behaves as the default, a URL is resolved by
its scheme (an unknown one is refused naming ``store``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Recorder, read_state
from postgres_support import Databases, postgres_databases, url_of

from jobstores import JournalStorage, SnapshotStorage, StateStore, resolve_store
from scheduler import DirectoryLockedError, DispatcherError, NotLeaderError, TaskDispatcher
from tasks import TaskStatus

__all__ = ["postgres_databases"]  # a fixture of the PostgreSQL tests

GOOD: dict[str, Any] = {
    "sys_type": "mac_intel",
    "task_type": "xhs_type",
    "xhs_account_id": "account_1",
    "interval": 3600,
    "valid_time_range": [8, 22],
}

STORES: dict[str, Callable[[Path], StateStore | None]] = {
    "default": lambda directory: None,
    "journal": JournalStorage,
    "snapshot": SnapshotStorage,
}


@pytest.mark.parametrize("kind", list(STORES))
async def test_a_store_object_behaves_as_the_default(
    tmp_path: Path, recorder: Recorder, kind: str
) -> None:
    directory = tmp_path / "store"
    store = STORES[kind](directory)
    dispatcher = TaskDispatcher(
        directory,
        task_manager_factory=recorder,
        timezone="Asia/Shanghai",
        store=store,
        snapshot_below=0,  # every change to the journal, if the store keeps one
    )
    first = await dispatcher.add_task(**GOOD, task_id="first")
    await dispatcher.add_task(**GOOD, task_id="second")
    dispatcher.pause_task(first)
    dispatcher.reorder_task("second", 0)
    assert dispatcher.state_file == directory / "dispatch_config.json"
    journal = list(directory.glob("dispatch_config.journal-*"))
    assert bool(journal) is (kind != "snapshot")  # the store given is the one that writes
    with pytest.raises(DirectoryLockedError, match="in use"):
        TaskDispatcher(directory, task_manager_factory=recorder, store=STORES[kind](directory))
    dispatcher.close()
    assert [t["task_id"] for t in read_state(directory)["tasks"]] == ["first", "second"]
    assert read_state(directory)["account_tasks"] == {"account_1": ["second", "first"]}

    again = TaskDispatcher(directory, task_manager_factory=recorder, store=STORES[kind](directory))
    try:
        assert again.timezone.key == "Asia/Shanghai"  # type: ignore[attr-defined]
        assert again.get_task("first").status is TaskStatus.PAUSED
        assert again.get_task("second").status is TaskStatus.PENDING
        assert again.account_tasks == {"account_1": ["second", "first"]}
    finally:
        again.close()
    if store is not None:
        assert not store.owned  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("store", "named"),
    [
        ("mysql://user:hunter2@db.example/tasks", "the URL scheme 'mysql'"),
        ("nosuch://host/db", "the URL scheme 'nosuch'"),
        ("dispatcher/dispatch_config.json", "a string that is not a URL"),
    ],
)
def test_an_unknown_store_url_is_refused_naming_store(
    tmp_path: Path, store: str, named: str
) -> None:
    directory = tmp_path / "store"
    with pytest.raises(ValueError, match=r"^store: ") as raised:
        TaskDispatcher(directory, store=store)
    assert named in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert not directory.exists()


def test_a_store_that_is_not_one_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^store: expected a StateStore"):
        TaskDispatcher(tmp_path, store=42)  # type: ignore[arg-type]


def test_the_resolver_gives_the_journal_by_default_and_a_store_as_itself(tmp_path: Path) -> None:
    default = resolve_store(None, tmp_path)
    assert isinstance(default, JournalStorage)
    assert default.path == tmp_path / "dispatch_config.json"
    snapshot = SnapshotStorage(tmp_path)
    assert resolve_store(snapshot, tmp_path) is snapshot


def test_a_postgresql_url_names_the_postgres_store_and_masks_its_password(
    tmp_path: Path,
) -> None:
    # Nothing listens on port 1: the store is chosen, then it cannot take the lease.
    url = "postgresql://user:hunter2@127.0.0.1:1/tasks?lease=3"
    with pytest.raises(DispatcherError, match="cannot take the lease") as raised:
        TaskDispatcher(tmp_path / "store", store=url)
    assert isinstance(raised.value, OSError)
    assert "hunter2" not in str(raised.value)
    assert "postgresql://user:***@127.0.0.1:1/tasks" in str(raised.value)


def test_the_embedded_default_never_imports_psycopg(tmp_path: Path) -> None:
    code = (
        "import sys; from scheduler import TaskDispatcher; "
        f"TaskDispatcher({str(tmp_path / 'store')!r}).close(); "
        "assert 'psycopg' not in sys.modules, 'psycopg imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_dispatcher_keeps_its_tasks_in_postgresql(
    tmp_path: Path, recorder: Recorder, postgres_databases: Databases
) -> None:
    url = url_of(postgres_databases.create())
    first = TaskDispatcher(
        tmp_path / "a", task_manager_factory=recorder, timezone="Asia/Shanghai", store=url
    )
    try:
        assert first.role == "leader"
        await first.add_task(**GOOD, task_id="first")
        await first.add_task(**GOOD, task_id="second")
        first.pause_task("first")
        first.reorder_task("second", 0)
        with pytest.raises(NotLeaderError, match="is in use by") as raised:
            TaskDispatcher(tmp_path / "b", task_manager_factory=recorder, store=url)
        assert raised.value.leader_url is None  # (none advertised)
    finally:
        first.close()
    again = TaskDispatcher(tmp_path / "b", task_manager_factory=recorder, store=url)
    try:
        assert again.timezone.key == "Asia/Shanghai"  # type: ignore[attr-defined]
        assert again.get_task("first").status is TaskStatus.PAUSED
        assert again.account_tasks == {"account_1": ["second", "first"]}
    finally:
        again.close()
