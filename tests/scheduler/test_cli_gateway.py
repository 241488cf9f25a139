"""The CLI's one gateway: the same operations give the same answers on a stopped store and
through a running dispatcher's control socket, and ``open_gateway`` picks the right one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import SHANGHAI

from scheduler import TaskDispatcher
from scheduler.cli_gateway import Gateway, LocalGateway, RemoteGateway, open_gateway
from scheduler.cli_parse import Options

SHELL = {"task_type": "shell", "sys_type": "local", "account_id": "ops", "interval": 3600}


def closed_now() -> tuple[int, int]:
    """An hour window that opens two hours from now: the running dispatcher runs nothing while
    the transcript is taken, so statuses depend on the operations alone."""
    hour = datetime.now(SHANGHAI).hour
    return (hour + 2) % 24, (hour + 4) % 24


def call(directory: Path, operation: Callable[[Gateway], Any], *, change: bool = False) -> Any:
    """One command's worth: a gateway opened for ``operation`` alone, as each command does."""
    options = Options(directory=directory, timezone="Asia/Shanghai")
    with open_gateway(options, change=change) as gateway:
        return operation(gateway)


def transcript(directory: Path, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    """Every operation of the protocol, with what each answered (times left out: they move)."""
    seen: list[Any] = []

    def change(operation: Callable[[Gateway], Any]) -> Any:
        return call(directory, operation, change=True)

    for task_id in ("a1", "a2", "a3"):
        keywords = {
            **SHELL,
            "task_id": task_id,
            "valid_time_range": closed_now(),
            "command": "date",
            "api_token": "abc123",
        }

        def add(gateway: Gateway, keywords: dict[str, Any] = keywords) -> str:
            return gateway.add_task(keywords)

        seen.append(change(add))
    seen.append(change(lambda g: g.pause_task("a2").status.value))
    seen.append(call(directory, lambda g: g.next_runs("a2", 2).if_resumed))
    seen.append(change(lambda g: g.resume_task("a2").status.value))
    seen.append(change(lambda g: g.reorder_task("a3", 0)))
    seen.append(change(lambda g: g.update_task("a1", {"interval": 5400}).interval))
    seen.append(call(directory, lambda g: g.get_task("a1", show_secrets=True).kwargs))
    seen.append(call(directory, lambda g: g.get_task("a1").kwargs["api_token"]))
    seen.append(call(directory, lambda g: len(g.next_runs("a1", 3).runs)))
    seen.append(call(directory, lambda g: g.account_tasks("ops")))
    seen.append(change(lambda g: g.pause_account("ops")))
    seen.append(change(lambda g: g.resume_account("ops")))
    change(lambda g: g.remove_task("a2"))
    listing = call(
        directory,
        lambda g: g.list_tasks(account="ops", status="pending", show_secrets=False, page=1),
    )
    seen.append(
        (
            [r.task_id for r in listing.records],
            listing.store_empty,
            str(listing.zone),
            Path(listing.state_file).name,
        )
    )
    seen.append(call(directory, lambda g: str(g.zone())))
    seen.append(call(directory, lambda g: g.state_file().replace(str(directory), "DIR")))
    seen.append(call(directory, lambda g: g.state_file(), change=True) == str(state(directory)))
    # An unknown id is the library's error, told in one line by the gateway's caller.
    for operation, changes in ((lambda g: g.pause_task("nope"), True), (None, False)):
        with pytest.raises(SystemExit) as exited:
            call(directory, operation or (lambda g: g.get_task("nope")), change=changes)
        seen.append((exited.value.code, capsys.readouterr().err.replace(str(directory), "DIR")))
    return seen


def state(directory: Path) -> Path:
    return directory / "dispatch_config.json"


EXPECTED: list[Any] = [
    "a1",
    "a2",
    "a3",
    "paused",
    True,
    "pending",
    ("ops", ["a3", "a1", "a2"]),
    5400,
    {
        "account_id": "ops",
        "task_id": "a1",
        "task_type": "shell",
        "command": "date",
        "api_token": "abc123",
    },
    "***",
    3,
    ["a3", "a1", "a2"],
    [("a3", "paused", True), ("a1", "paused", True), ("a2", "paused", True)],
    [("a3", "pending", True), ("a1", "pending", True), ("a2", "pending", True)],
    (["a3", "a1"], False, "Asia/Shanghai", "dispatch_config.json"),
    "Asia/Shanghai",
    "DIR/dispatch_config.json",
    True,
    (2, "task-dispatcher: error: no task with id 'nope'\n"),
    (2, "task-dispatcher: error: no task with id 'nope'\n"),
]


async def test_a_stopped_store_answers_as_the_protocol_says(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    TaskDispatcher(state_dir, timezone="Asia/Shanghai", history=False).close()
    assert type(call(state_dir, lambda g: g)) is LocalGateway
    assert await asyncio.to_thread(transcript, state_dir, capsys) == EXPECTED


async def test_a_running_dispatcher_answers_the_same(
    started: TaskDispatcher, capsys: pytest.CaptureFixture[str]
) -> None:
    await started.serve_control()
    directory = started.directory
    assert type(await asyncio.to_thread(call, directory, lambda g: g)) is RemoteGateway
    assert await asyncio.to_thread(transcript, directory, capsys) == EXPECTED


async def test_run_now_needs_a_running_dispatcher(
    started: TaskDispatcher, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await started.add_tasks([{**SHELL, "task_id": "t", "command": "date"}])
    await started.serve_control()
    asked = await asyncio.to_thread(call, state_dir, lambda g: g.run_now("t"))
    assert asked.run_requested is not None
    await started.stop()
    with pytest.raises(SystemExit) as exited:
        call(state_dir, lambda g: g.run_now("t"))
    assert exited.value.code == 1
    assert "run-now needs one" in capsys.readouterr().err


def test_a_change_on_a_missing_directory_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo"
    with pytest.raises(SystemExit) as exited:
        call(missing, lambda g: g.pause_task("t"), change=True)
    assert exited.value.code == 2
    assert "no dispatcher directory" in capsys.readouterr().err
    assert not missing.exists()
