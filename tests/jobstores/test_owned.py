"""``OwnedStore``: a stopped store owned for a change: its lock, a load that creates no task
manager, the core's commands, and a commit through the ``StateStore`` port."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import orjson
import pytest
from helpers import SHANGHAI, read_state, seed_file, seed_task

from jobstores.commands import PauseTask
from jobstores.journal import JournalStorage
from jobstores.owned import OwnedStore
from jobstores.table import StateImage
from scheduler import TaskDispatcher
from tasks.errors import DirectoryLockedError


def seeded(directory: Path, *extra: object) -> Path:
    """A stopped store holding the seed's task ``t1`` (type ``xhs_type``, which no registry
    of this process knows) and ``extra`` raw task objects."""
    directory.mkdir(parents=True, exist_ok=True)
    tasks = [seed_task("t1", task_end_time=None), *extra]
    (directory / "dispatch_config.json").write_bytes(seed_file(tasks))
    return directory


def test_a_change_is_durable_once_saved_and_the_store_is_let_go(tmp_path: Path) -> None:
    directory = seeded(tmp_path / "store")
    with OwnedStore(JournalStorage(directory), SHANGHAI) as owned:
        # Loaded without creating a manager: a task type unknown here is restored.
        assert owned.table.get("t1").task_type == "xhs_type"
        applied = owned.apply(PauseTask("t1"))
        assert applied.record.status == "paused"
        assert owned.save()
        assert read_state(directory)["tasks"][0]["status"] == "paused"
    with OwnedStore(JournalStorage(directory), SHANGHAI) as again:  # the lock was released
        assert again.table.get("t1").status == "paused"


def test_refused_while_a_dispatcher_owns_the_store(tmp_path: Path) -> None:
    directory = seeded(tmp_path / "store")
    owner = TaskDispatcher(directory, timezone="Asia/Shanghai", history=False)
    try:
        with pytest.raises(DirectoryLockedError, match="in use by another dispatcher"):
            OwnedStore(JournalStorage(directory), SHANGHAI)
    finally:
        owner.close()
    OwnedStore(JournalStorage(directory), SHANGHAI).close()


class FailingJournal(JournalStorage):
    """A store whose disk refuses every commit after the load."""

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        raise OSError(28, "No space left on device")


def test_a_failed_commit_says_so_and_leaves_the_durable_state(tmp_path: Path) -> None:
    directory = seeded(tmp_path / "store")
    owned = OwnedStore(JournalStorage(directory), SHANGHAI)
    owned.close()  # the seed's file made whole, in this version's format
    before = (directory / "dispatch_config.json").read_bytes()
    owned = OwnedStore(FailingJournal(directory), SHANGHAI)
    owned.apply(PauseTask("t1"))
    assert not owned.save()
    assert owned.save_health.last_error == "OSError: [Errno 28] No space left on device"
    assert owned.save_health.unsaved_task_ids == ("t1",)
    owned.close()
    assert (directory / "dispatch_config.json").read_bytes() == before
    assert read_state(directory)["tasks"][0]["status"] == "pending"


def test_records_that_cannot_be_restored_are_kept_through_a_change(tmp_path: Path) -> None:
    broken = seed_task("t2", task_end_time=None, interval=-5)
    directory = seeded(tmp_path / "store", broken)
    with OwnedStore(JournalStorage(directory), SHANGHAI) as owned:
        assert owned.table.find("t2") is None
        owned.apply(PauseTask("t1"))
        assert owned.save()
    saved = orjson.loads((directory / "dispatch_config.json").read_bytes())
    by_id = {task["task_id"]: task for task in saved["tasks"]}
    assert by_id["t1"]["status"] == "paused"
    assert by_id["t2"] == broken
