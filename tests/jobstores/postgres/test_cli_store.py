"""``task-dispatcher --store URL import FILE`` and ``export [PATH]``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from helpers import Recorder, at, seed_file, seed_task
from postgres_support import url_of

from jobstores.postgres import Leadership, connector
from scheduler import TaskDispatcher
from scheduler.cli import main

TASK: dict[str, Any] = {
    "sys_type": "mac_intel",
    "task_type": "xhs_type",
    "xhs_account_id": "account_1",
    "interval": 3600,
    "valid_time_range": [8, 22],
}


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result]:
    def invoke(*args: str, expect: int = 0, env: dict[str, str] | None = None) -> Result:
        result = CliRunner(env=env).invoke(main, ["--timezone", "Asia/Shanghai", *args])
        assert result.exit_code == expect, (result.output, result.stderr, result.exception)
        return result

    return invoke


def test_a_dispatcher_directorys_file_goes_in_and_comes_back_out_unchanged(
    cli: Callable[..., Result], tmp_path: Path, empty_database: str
) -> None:
    directory = str(tmp_path / "store")
    for account in ("a1", "a2", "a1"):
        cli(
            "--dir",
            directory,
            "add",
            "--type",
            "shell",
            "--account",
            account,
            "--interval",
            "1h",
            "--kw",
            "command=date",
        )
    original = tmp_path / "store" / "dispatch_config.json"
    imported = cli("--store", empty_database, "import", str(original))
    assert imported.stdout == f"{original}: imported 3 task(s)\n"
    out = tmp_path / "out.json"
    exported = cli("export", str(out), env={"TASK_DISPATCHER_STORE": empty_database})
    assert exported.stdout == f"{out}: exported 3 task(s)\n"
    assert out.read_bytes() == original.read_bytes()
    # Without a path, to standard output.
    assert cli("--store", empty_database, "export").stdout_bytes == original.read_bytes()


def test_import_keeps_what_it_cannot_restore_and_replaces_only_when_asked(
    cli: Callable[..., Result], tmp_path: Path, empty_database: str
) -> None:
    path = tmp_path / "seed.json"
    path.write_bytes(seed_file([seed_task("t1"), {"task_id": "bad"}]))
    result = cli("--store", empty_database, "import", str(path))
    assert result.stdout == f"{path}: imported 1 task(s), 1 kept unrestorable\n"
    refused = cli("--store", empty_database, "import", str(path), expect=2)
    assert "holds 2 task(s) already" in refused.stderr
    cli("--store", empty_database, "import", "--replace", str(path))


def test_import_refuses_a_store_a_dispatcher_leads(
    cli: Callable[..., Result], tmp_path: Path, empty_database: str
) -> None:
    path = tmp_path / "seed.json"
    path.write_bytes(seed_file([seed_task("t1")]))
    leader = Leadership(connector(empty_database))
    assert leader.try_acquire()
    try:
        result = cli("--store", empty_database, "import", str(path), expect=1)
    finally:
        leader.stop()
    assert "led by a running dispatcher" in result.stderr
    assert cli("--store", empty_database, "export").stdout.count('"task_id"') == 0


def test_the_store_commands_need_a_store(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("export", expect=2)
    assert "name it with --store URL (or $TASK_DISPATCHER_STORE)" in result.stderr


def test_an_unreachable_store_is_one_line_without_its_password(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    path = tmp_path / "seed.json"
    path.write_bytes(seed_file([seed_task("t1")]))
    url = "postgresql://postgres:s3cret@127.0.0.1:1/postgres?connect_timeout=2"
    result = cli("--store", url, "import", str(path), expect=1)
    assert result.stderr.startswith("task-dispatcher: error: cannot reach the store:")
    assert "s3cret" not in result.stderr
    assert result.stderr.count("\n") == 1


async def test_list_show_and_runs_of_a_stopped_store_read_the_postgresql_store(
    cli: Callable[..., Result],
    tmp_path: Path,
    empty_database: str,
    clock: Any,
    recorder: Recorder,
) -> None:
    url = url_of(empty_database)
    dispatcher = TaskDispatcher(
        tmp_path / "leader", task_manager_factory=recorder, timezone="Asia/Shanghai", store=url
    )
    ran = await dispatcher.add_task(**TASK)
    idle = await dispatcher.add_task(**{**TASK, "xhs_account_id": "account_2"})
    await dispatcher.start()
    try:
        clock.move_to(at(2026, 1, 8, 8, 0))
        await dispatcher.run_pending()
    finally:
        await dispatcher.stop()
    assert recorder.count(ran) == 1
    # Another directory, no dispatcher running: the commands read the store they are given.
    elsewhere = ["--dir", str(tmp_path / "elsewhere")]
    listed = cli(*elsewhere, "--store", url, "list")
    assert ran in listed.stdout
    assert idle in listed.stdout
    shown = cli(*elsewhere, "show", idle, env={"TASK_DISPATCHER_STORE": url})
    assert "account_2" in shown.stdout
    runs = json.loads(cli(*elsewhere, "--store", url, "runs", "--json").stdout)
    assert sorted((run["task_id"], run["outcome"]) for run in runs) == sorted(
        [(ran, "succeeded"), (idle, "succeeded")]
    )
    only = json.loads(cli(*elsewhere, "--store", url, "runs", ran, "--json").stdout)
    assert [run["task_id"] for run in only] == [ran]
    assert not (tmp_path / "elsewhere").exists()  # nothing was read or made there


def test_a_change_of_a_stopped_store_is_made_in_the_postgresql_store(
    cli: Callable[..., Result], tmp_path: Path, empty_database: str
) -> None:
    url = url_of(empty_database)
    path = tmp_path / "seed.json"
    path.write_bytes(seed_file([seed_task("t1")]))
    cli("--store", url, "import", str(path))
    elsewhere = ["--dir", str(tmp_path / "elsewhere")]
    cli(*elsewhere, "--store", url, "pause", "t1")
    exported = json.loads(cli("--store", url, "export").stdout)
    assert exported["tasks"][0]["status"] == "paused"
    assert not (tmp_path / "elsewhere").exists()
    # A store a dispatcher leads is changed through that dispatcher, not here.
    leader = Leadership(connector(empty_database), holder="host-a:1:leader")
    assert leader.try_acquire()
    try:
        refused = cli(*elsewhere, "--store", url, "resume", "t1", expect=2)
    finally:
        leader.stop()
    assert "in use by 'host-a:1:leader'" in refused.stderr
    assert json.loads(cli("--store", url, "export").stdout)["tasks"][0]["status"] == "paused"
