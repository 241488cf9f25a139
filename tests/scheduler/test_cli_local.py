"""The CLI's local gateway: a stopped store changed through its core, with no dispatcher.

A change owns the store for the command (:class:`~jobstores.owned.OwnedStore`) and nothing
else is built: no task manager, no scheduler, no run backend. A ``pause`` answers with the
record the core formed and committed, formed once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta, tzinfo
from pathlib import Path
from typing import Any, Self

import pytest
from click.testing import CliRunner
from helpers import SHANGHAI, read_state, recording_factory

from jobstores.commands import RunOpened
from jobstores.journal import JournalStorage
from jobstores.owned import OwnedStore
from jobstores.state import StoredState
from scheduler import TaskDispatcher
from scheduler.cli import main
from scheduler.cli_local import LocalGateway
from scheduler.cli_parse import Options
from tasks.model import ActiveRun, TaskRecord

SHELL = {"task_type": "shell", "sys_type": "local", "account_id": "ops", "command": "date"}


# ---------------------------------------------------------------------- counting records


class _Formed(threading.local):
    count = 0
    depth = 0


FORMED = _Formed()
"""Records of :class:`CountingRecord` formed on this thread."""


def _counted(form: Callable[[], Any]) -> Any:
    """Run one forming call; only the outermost counts (a copy that validates inside it, or
    a ``replace`` written with ``model_copy``, forms one record)."""
    if FORMED.depth == 0:
        FORMED.count += 1
    FORMED.depth += 1
    try:
        return form()
    finally:
        FORMED.depth -= 1


class CountingRecord(TaskRecord):
    """A task record counting every record of its class formed by the model's ways of
    forming one (validation, construction, copies, ``replace``, ``snapshot``): a record
    changed by the core keeps its class, so every record formed from a loaded one counts."""

    def replace(self, **changes: Any) -> TaskRecord:
        result: TaskRecord = _counted(lambda: super(CountingRecord, self).replace(**changes))
        return result

    def snapshot(self) -> TaskRecord:
        result: TaskRecord = _counted(lambda: super(CountingRecord, self).snapshot())
        return result

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        result: Self = _counted(
            lambda: super(CountingRecord, self).model_copy(update=update, deep=deep)
        )
        return result

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        result: Self = _counted(
            lambda: super(CountingRecord, cls).model_validate(obj, *args, **kwargs)
        )
        return result

    @classmethod
    def model_construct(cls, _fields_set: set[str] | None = None, **values: Any) -> Self:
        result: Self = _counted(
            lambda: super(CountingRecord, cls).model_construct(_fields_set, **values)
        )
        return result


class CountingJournal(JournalStorage):
    """The default store, loading its records as :class:`CountingRecord`."""

    def load(self, zone: tzinfo | None, **options: Any) -> StoredState:
        state = super().load(zone, **options)
        state.records = [
            CountingRecord.model_validate(record.to_json_dict(), context={"zone": state.timezone})
            for record in state.records
        ]
        return state


# ---------------------------------------------------------------------- the gateway


@pytest.fixture
def stopped(state_dir: Path) -> Path:
    """A stopped store holding task ``t1`` (shell, every hour)."""
    owner = TaskDispatcher(state_dir, timezone="Asia/Shanghai", history=False)
    try:
        asyncio.run(owner.add_tasks([{**SHELL, "task_id": "t1", "interval": 3600}]))
    finally:
        owner.close()
    return state_dir


@pytest.fixture
def owned(stopped: Path) -> Iterator[OwnedStore]:
    store = OwnedStore(CountingJournal(stopped), SHANGHAI)
    yield store
    store.close()


def test_the_records_of_the_counting_store_count(owned: OwnedStore) -> None:
    record = owned.table.get("t1")
    assert type(record) is CountingRecord
    FORMED.count = 0
    record.replace(run_count=1)
    record.snapshot()
    CountingRecord.model_validate(record.to_json_dict(), context={"zone": SHANGHAI})
    assert FORMED.count == 3


def test_a_pause_forms_the_record_once_for_its_answer(owned: OwnedStore, stopped: Path) -> None:
    gateway = LocalGateway(Options(directory=stopped), owned)
    FORMED.count = 0
    answer = gateway.pause_task("t1")
    assert FORMED.count == 1
    assert answer is owned.table.get("t1")  # the record committed, not a copy of it
    assert answer.status == "paused"
    owned.close()
    assert read_state(stopped)["tasks"][0]["status"] == "paused"


def test_editing_commands_create_no_task_manager(tmp_path: Path) -> None:
    directory = tmp_path / "host"
    host = ["--dir", str(directory), "--factory", "helpers:recording_factory"]
    recording_factory.created.clear()
    added = CliRunner().invoke(
        main, [*host, "add", "--type", "xhs_type", "--account", "a", "--interval", "1h"]
    )
    assert added.exit_code == 0, added.output
    task_id = added.stdout.strip()
    assert len(recording_factory.created) == 1  # the task added is checked by its manager
    recording_factory.created.clear()
    for command in (
        ["pause", task_id],
        ["resume", task_id],
        ["reorder", task_id, "0"],
        ["update", task_id, "--interval", "2h"],
        ["pause", "--account", "a"],
        ["resume", "--account", "a"],
    ):
        result = CliRunner().invoke(main, [*host, *command])
        assert result.exit_code == 0, (command, result.output)
    assert recording_factory.created == []
    # New keywords are checked by the host's manager, as a running dispatcher checks them.
    edited = CliRunner().invoke(main, [*host, "update", task_id, "--kw", "user_query=hi"])
    assert edited.exit_code == 0, edited.output
    assert [made["user_query"] for made in recording_factory.created] == ["hi"]
    recording_factory.created.clear()
    removed = CliRunner().invoke(main, [*host, "remove", task_id])
    assert removed.exit_code == 0, removed.output
    assert recording_factory.created == []


def test_a_run_left_out_stays_for_the_dispatcher_to_take_back(stopped: Path) -> None:
    """A run out when the dispatcher stopped (a worker may still run it) is not the CLI's to
    settle: a pause keeps it, and the dispatcher's next start decides its fate."""
    with OwnedStore(JournalStorage(stopped), SHANGHAI) as store:
        now = store.now()
        run = ActiveRun(run_id="r1", scheduled_at=now - timedelta(minutes=1), submitted_at=now)
        store.apply(RunOpened("t1", run, started=False), now)
        assert store.save()
    result = CliRunner().invoke(main, ["--dir", str(stopped), "pause", "t1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "t1: paused\n"
    (task,) = read_state(stopped)["tasks"]
    assert task["status"] == "paused"
    assert task["active_run"]["run_id"] == "r1"
