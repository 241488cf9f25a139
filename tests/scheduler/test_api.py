"""The public API's contract: names, errors, bad input, snapshots, ownership of the directory."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import SHANGHAI, Recorder, read_state, seed_file, seed_task

from jobstores import JsonJobStore
from scheduler import (
    DirectoryLockedError,
    InvalidTaskError,
    TaskDispatcher,
    TaskExistsError,
    TaskNotFoundError,
    UnknownTaskTypeError,
)
from tasks import TaskManager, TaskRecord, TaskStatus, TaskTypeRegistry

MakeDispatcher = Callable[..., TaskDispatcher]

GOOD: dict[str, Any] = {
    "sys_type": "mac_intel",
    "task_type": "xhs_type",
    "xhs_account_id": "account_1",
    "interval": 3600,
}


def test_public_names() -> None:
    from apscheduler.jobstores.base import BaseJobStore

    assert issubclass(TaskNotFoundError, KeyError)
    assert issubclass(JsonJobStore, BaseJobStore)
    assert issubclass(TaskStatus, str)
    assert [s.value for s in TaskStatus] == ["pending", "running", "paused", "completed", "error"]
    assert TaskStatus("paused") is TaskStatus.PAUSED
    assert TaskRecord.__name__ == "TaskRecord"
    assert isinstance(Recorder()(task_id="x", task_type="t", sys_type="s"), TaskManager)


async def test_add_task_returns_an_id_and_saves(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    task_id = await dispatcher.add_task(**GOOD)
    assert isinstance(task_id, str)
    assert read_state(state_dir)["tasks"][0]["task_id"] == task_id
    record = dispatcher.get_task(task_id)
    assert record.account_id == "account_1"
    assert record.account_name is None
    assert record.valid_time_range == (0, 24)
    assert record.task_end_time is None
    assert record.status is TaskStatus.PENDING
    for moment in (record.created_at, record.updated_at, record.next_execution_time):
        assert moment is not None
        assert moment.utcoffset() is not None


@pytest.mark.parametrize(
    ("options", "account_id", "account_name"),
    [
        ({"account_id": "A", "account_name": "Alice"}, "A", "Alice"),
        ({"xhs_account_id": "X", "xhs_account_name": "Xi"}, "X", "Xi"),
        ({"account_id": "A", "xhs_account_id": "X"}, "A", None),
    ],
)
async def test_the_account_comes_from_keywords(
    make_dispatcher: MakeDispatcher,
    options: dict[str, Any],
    account_id: str,
    account_name: str | None,
) -> None:
    dispatcher = make_dispatcher()
    task_id = await dispatcher.add_task(sys_type="s", task_type="t", interval=60, **options)
    record = dispatcher.get_task(task_id)
    assert (record.account_id, record.account_name) == (account_id, account_name)
    assert record.kwargs == {**options, "task_id": task_id, "task_type": "t"}


async def test_interval_accepts_timedelta_and_floats(make_dispatcher: MakeDispatcher) -> None:
    dispatcher = make_dispatcher()
    a = await dispatcher.add_task(**{**GOOD, "interval": datetime.timedelta(minutes=30)})
    b = await dispatcher.add_task(**{**GOOD, "interval": 1.5})
    assert dispatcher.get_task(a).interval == 1800
    assert dispatcher.get_task(b).interval == 1.5


def _factory_raises(**kwargs: Any) -> Any:
    raise RuntimeError("cannot log in")


class NoRun:
    def __init__(self, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": -5}, "interval"),
        ({"interval": "hourly"}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"interval": True}, "interval"),
        ({"interval": None}, "interval"),
        ({"valid_time_range": [8, 8]}, "valid_time_range"),
        ({"valid_time_range": [8, 25]}, "valid_time_range"),
        ({"valid_time_range": [-1, 8]}, "valid_time_range"),
        ({"valid_time_range": [8]}, "valid_time_range"),
        ({"valid_time_range": [8, 12, 20]}, "valid_time_range"),
        ({"valid_time_range": "8-22"}, "valid_time_range"),
        ({"valid_time_range": [8.5, 22]}, "valid_time_range"),
        ({"valid_time_range": [24, 0]}, "valid_time_range"),
        ({"interval": 1e-7}, "interval"),
        ({"interval": 0.999}, "interval"),
        ({"interval": datetime.timedelta(milliseconds=500)}, "interval"),
        ({"xhs_account_id": " padded "}, "account_id"),
        ({"xhs_account_id": "tab\there"}, "account_id"),
        ({"xhs_account_id": "a" * 257}, "account_id"),
        ({"status": "paused"}, "status"),
        ({"run_count": 5}, "run_count"),
        ({"next_execution_time": "2026-01-08T10:00:00+08:00"}, "next_execution_time"),
        ({"kwargs": {"a": 1}}, "kwargs"),
        ({"last_error": "x"}, "last_error"),
        ({"task_end_time": datetime.date(2020, 1, 1)}, "task_end_time"),
        ({"task_end_time": datetime.datetime(2020, 1, 1, 12, 0)}, "task_end_time"),
        ({"task_end_time": "tomorrow"}, "task_end_time"),
        ({"sys_type": None}, "sys_type"),
        ({"task_type": None}, "task_type"),
        ({"sys_type": ""}, "sys_type"),
        ({"xhs_account_id": None, "account_id": None}, "account_id"),
        ({"task_id": ""}, "task_id"),
        ({"task_id": " padded "}, "task_id"),
        ({"cookie_jar": object()}, "kwargs.cookie_jar"),
        ({"options": {"when": datetime.datetime(2026, 1, 1)}}, "kwargs.options.when"),
        ({"options": {1: "x"}}, "kwargs.options"),
        ({"ratio": float("inf")}, "kwargs.ratio"),
        ({"big": 2**70}, "kwargs.big"),
        ({"note": "a\ud800b"}, "kwargs.note"),
        ({"options": {"k": "ok\udcff"}}, "kwargs.options.k"),
        ({"pair": (1, 2)}, "kwargs.pair"),
        ({"other_account_id": "B"}, "account_id"),
        ({"valid_time_rage": [8, 22], "valid_time_range": [8, 22]}, "valid_time_rage"),
    ],
)
async def test_bad_input_names_the_field_and_saves_nothing(
    make_dispatcher: MakeDispatcher, state_dir: Path, changes: dict[str, Any], field: str
) -> None:
    dispatcher = make_dispatcher()
    existing = await dispatcher.add_task(**GOOD)
    before = (state_dir / "dispatch_config.json").read_bytes()
    options = {**GOOD, **changes}
    options = {k: v for k, v in options.items() if v is not None or k in ("interval",)}
    if "account_id" in changes:
        options.pop("xhs_account_id", None)
        options.pop("account_id", None)
    warns = (
        pytest.warns(DeprecationWarning, match="valid_time_rage")
        if "valid_time_rage" in changes
        else contextlib.nullcontext()
    )
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as raised, warns:
        await dispatcher.add_task(**options)
    assert isinstance(raised.value, InvalidTaskError)
    assert raised.value.field == field
    assert (state_dir / "dispatch_config.json").read_bytes() == before
    assert [r.task_id for r in dispatcher.list_tasks()] == [existing]


async def test_duplicate_task_id_is_refused(make_dispatcher: MakeDispatcher) -> None:
    dispatcher = make_dispatcher()
    await dispatcher.add_task(**GOOD, task_id="same")
    with pytest.raises(TaskExistsError, match="task_id: a task with id 'same' exists"):
        await dispatcher.add_task(**GOOD, task_id="same")


async def test_a_duplicate_inside_one_batch_says_so(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    with pytest.raises(TaskExistsError, match="'twin' appears more than once in this batch"):
        await dispatcher.add_tasks([{**GOOD, "task_id": "twin"}, {**GOOD, "task_id": "twin"}])
    assert dispatcher.list_tasks() == []
    assert not (state_dir / "dispatch_config.json").exists()


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("a/b", "contains '/'"),
        (".", "relative path segment"),
        ("..", "relative path segment"),
        (" padded", "whitespace"),
        ("bell\x07", "unprintable"),
        (7, "must be a string"),
    ],
)
async def test_an_id_no_url_can_carry_is_refused_when_added(
    make_dispatcher: MakeDispatcher, state_dir: Path, task_id: Any, message: str
) -> None:
    dispatcher = make_dispatcher()
    await dispatcher.add_task(**GOOD, task_id="first")
    before = (state_dir / "dispatch_config.json").read_bytes()
    with pytest.raises(InvalidTaskError, match=message) as raised:
        await dispatcher.add_task(**GOOD, task_id=task_id)
    assert raised.value.field == "task_id"
    assert str(raised.value).startswith("task_id: ")
    assert "\n" not in str(raised.value)
    with pytest.raises(InvalidTaskError, match=message):  # all or nothing in a batch too
        await dispatcher.add_tasks([{**GOOD, "task_id": "fine"}, {**GOOD, "task_id": task_id}])
    assert [r.task_id for r in dispatcher.list_tasks()] == ["first"]
    assert (state_dir / "dispatch_config.json").read_bytes() == before


async def test_a_chinese_task_id_is_added_saved_and_loaded_again(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    assert await dispatcher.add_task(**GOOD, task_id="账号1-运营") == "账号1-运营"
    dispatcher.pause_task("账号1-运营")
    dispatcher.close()
    again = make_dispatcher()
    assert again.get_task("账号1-运营").status is TaskStatus.PAUSED
    assert read_state(state_dir)["account_tasks"] == {"account_1": ["账号1-运营"]}


async def test_a_saved_task_whose_id_add_refuses_now_stays_manageable(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    # Written before such ids were refused: loaded, listed, changed and removed as any other.
    legacy = ["a/b", ".", "..", "ok"]
    state_dir.mkdir()
    (state_dir / "dispatch_config.json").write_bytes(
        seed_file([seed_task(task_id, task_end_time="2999-01-01") for task_id in legacy])
    )
    dispatcher = make_dispatcher()
    assert [r.task_id for r in dispatcher.list_tasks()] == legacy
    dispatcher.pause_task("a/b")
    dispatcher.resume_task("a/b")
    assert dispatcher.update_task("..", interval=7200).interval == 7200
    dispatcher.reorder_task(".", 0)
    assert dispatcher.account_tasks["account_1"] == [".", "a/b", "..", "ok"]
    dispatcher.remove_task(".")
    dispatcher.close()
    assert read_state(state_dir)["account_tasks"] == {"account_1": ["a/b", "..", "ok"]}


@pytest.mark.parametrize("method", ["get_task", "pause_task", "resume_task", "remove_task"])
async def test_a_task_id_that_is_not_a_string_is_a_type_error(
    make_dispatcher: MakeDispatcher, method: str
) -> None:
    dispatcher = make_dispatcher()
    with pytest.raises(TypeError, match="task_id: must be a string, not list"):
        getattr(dispatcher, method)([1])
    with pytest.raises(TypeError, match="task_id: must be a string, not list"):
        dispatcher.reorder_task([1], 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", [_factory_raises, NoRun])
async def test_a_factory_that_fails_is_refused(
    make_dispatcher: MakeDispatcher, state_dir: Path, factory: Any
) -> None:
    dispatcher = make_dispatcher(task_manager_factory=factory)
    with pytest.raises(ValueError, match="task_manager_factory"):
        await dispatcher.add_task(**GOOD)
    assert dispatcher.list_tasks() == []
    assert not (state_dir / "dispatch_config.json").exists()


class _Undecodable:
    """A task manager whose runs fail with undecodable bytes in the message (a lone
    surrogate, as ``os.fsdecode`` makes of them)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def run(self) -> None:
        raise RuntimeError("no file " + b"caf\xe9".decode("utf-8", "surrogateescape"))


async def test_an_error_holding_undecodable_bytes_is_saved(
    clock: Any, make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    dispatcher = make_dispatcher(task_manager_factory=_Undecodable)
    task_id = await dispatcher.add_task(**GOOD, valid_time_range=[8, 22])
    await dispatcher.start()
    try:
        clock.move_to(datetime.datetime(2026, 1, 8, 8, 0, tzinfo=SHANGHAI))
        await dispatcher.run_pending()
        assert dispatcher.save_health.ok
    finally:
        await dispatcher.stop()
    (saved,) = read_state(state_dir)["tasks"]
    assert saved["task_id"] == task_id
    assert saved["last_error"] == "RuntimeError: no file caf\ufffd"


async def test_no_run_possible_before_the_end_is_refused(
    clock: Any, make_dispatcher: MakeDispatcher
) -> None:
    # 07:00 today, window 22-23 but the task ends at 21:00 today.
    dispatcher = make_dispatcher()
    with pytest.raises(ValueError, match="task_end_time"):
        await dispatcher.add_task(
            **GOOD,
            valid_time_range=[22, 23],
            task_end_time=datetime.datetime(2026, 1, 8, 21, 0, tzinfo=SHANGHAI),
        )


async def test_the_default_factory_knows_registered_types(
    make_dispatcher: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import registry

    fresh = TaskTypeRegistry()
    monkeypatch.setattr(registry, "default_registry", fresh)
    import scheduler.backends.local as local_backend

    monkeypatch.setattr(local_backend, "default_registry", fresh)
    recorder = Recorder()
    fresh.register("xhs_type", recorder)
    dispatcher = make_dispatcher(task_manager_factory=None)
    task_id = await dispatcher.add_task(**GOOD)
    assert recorder.created[0]["task_id"] == task_id
    with pytest.raises(UnknownTaskTypeError, match=r"'nope'.*xhs_type"):
        await dispatcher.add_task(**{**GOOD, "task_type": "nope"})
    with pytest.raises(ValueError, match="already registered"):
        fresh.register("xhs_type", recorder)


async def test_unknown_ids_raise_task_not_found(make_dispatcher: MakeDispatcher) -> None:
    dispatcher = make_dispatcher()
    calls: list[Callable[[], Any]] = [
        lambda: dispatcher.get_task("nope"),
        lambda: dispatcher.pause_task("nope"),
        lambda: dispatcher.resume_task("nope"),
        lambda: dispatcher.remove_task("nope"),
        lambda: dispatcher.reorder_task("nope", 0),
    ]
    for call in calls:
        with pytest.raises(TaskNotFoundError, match="nope") as raised:
            call()
        assert isinstance(raised.value, KeyError)


@pytest.mark.parametrize(
    ("position", "error"),
    [(1.0, TypeError), ("0", TypeError), (True, TypeError), (5, ValueError), (-1, ValueError)],
)
async def test_reorder_rejects_bad_positions(
    make_dispatcher: MakeDispatcher, position: Any, error: type[Exception]
) -> None:
    dispatcher = make_dispatcher()
    task_id = await dispatcher.add_task(**GOOD)
    await dispatcher.add_task(**GOOD)
    with pytest.raises(error, match="position"):
        dispatcher.reorder_task(task_id, position)


async def test_snapshots_are_copies(make_dispatcher: MakeDispatcher) -> None:
    dispatcher = make_dispatcher()
    task_id = await dispatcher.add_task(**GOOD, options={"depth": 1})
    record = dispatcher.get_task(task_id)
    record.kwargs["options"]["depth"] = 99
    with pytest.raises(Exception, match="frozen"):
        record.status = TaskStatus.PAUSED
    dispatcher.list_tasks()[0].kwargs.clear()
    dispatcher.account_tasks["account_1"].append("ghost")
    assert dispatcher.get_task(task_id).kwargs["options"] == {"depth": 1}
    assert dispatcher.account_tasks == {"account_1": [task_id]}


async def test_peeking_shows_the_current_records_without_copying(
    make_dispatcher: MakeDispatcher,
) -> None:
    dispatcher = make_dispatcher()
    first = await dispatcher.add_task(**GOOD)
    second = await dispatcher.add_task(**GOOD)
    seen = dispatcher.peek_tasks()
    assert [r.task_id for r in seen] == [first, second]
    assert seen == dispatcher.list_tasks()
    again = dispatcher.peek_tasks()
    assert [a is b for a, b in zip(seen, again, strict=True)] == [True, True]  # no copies
    dispatcher.pause_task(first)  # a change replaces the record; the one seen stays as it was
    assert dispatcher.peek_tasks()[0].status is TaskStatus.PAUSED
    assert seen[0].status is not TaskStatus.PAUSED
    assert dispatcher.peek_tasks()[1] is seen[1]


async def test_a_second_dispatcher_on_the_directory_fails_fast(
    make_dispatcher: MakeDispatcher, state_dir: Path
) -> None:
    first = make_dispatcher()
    with pytest.raises(DirectoryLockedError, match="in use") as raised:
        make_dispatcher()
    assert str(state_dir) in str(raised.value)
    await first.stop()
    make_dispatcher().close()


def test_default_directory_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASK_DISPATCHER_DIR", str(tmp_path / "from-env"))
    dispatcher = TaskDispatcher(timezone="UTC")
    try:
        assert dispatcher.directory == tmp_path / "from-env"
        assert dispatcher.state_file == tmp_path / "from-env" / "dispatch_config.json"
    finally:
        dispatcher.close()


def test_unknown_timezone_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone"):
        TaskDispatcher(tmp_path, timezone="Mars/Olympus")
