"""`task-dispatcher run` as a real process: runs happen, SIGINT stops it cleanly, one owner."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from helpers import (
    ROOT,
    Running,
    add_shell_task,
    cli,
    read_state,
    seed_file,
    seed_task,
    task_in_file,
)


@pytest.mark.timeout(120)
def test_run_executes_a_one_second_shell_task_and_stops_on_sigint(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    marker = tmp_path / "ticks"
    add_shell_task(directory, "tick", "1s", f"command=sh -c 'echo tick >> {marker}'")
    process = running()
    process.wait_for(lambda lines: process.finished_runs(lines) >= 2)
    process.process.send_signal(signal.SIGINT)
    assert process.process.wait(30) == 0
    process.wait_for(lambda lines: any("stopped; state saved" in line for line in lines))
    saved = read_state(directory)["tasks"][0]
    assert saved["run_count"] >= 2
    assert saved["status"] == "pending"
    assert saved["last_error"] is None
    assert marker.read_text().count("tick") == saved["run_count"]
    assert "Traceback" not in "".join(process.seen)


@pytest.mark.timeout(120)
def test_one_owner_across_processes_and_a_killed_owner_frees_the_directory(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    add_shell_task(directory, "t1", "1h", "command=date")
    process = running()
    process.wait_for(lambda lines: any("running 1 task(s)" in line for line in lines))

    # The owner is steered through its control socket, not refused.
    paused = cli(directory, "pause", "t1")
    assert (paused.returncode, paused.stdout) == (0, "t1: paused\n"), paused.stderr
    second = cli(directory, "run", "--no-live")
    assert second.returncode == 2
    assert "in use" in second.stderr
    listed = cli(directory, "list", "--json")
    assert listed.returncode == 0
    assert '"t1"' in listed.stdout

    os.kill(process.process.pid, signal.SIGKILL)
    process.process.wait(10)
    assert (directory / "control.sock").exists()  # stale: nobody answers it
    resumed = cli(directory, "resume", "t1")
    assert resumed.returncode == 0, resumed.stderr


def cli_in(
    directory: Path, *args: str, zone: str = "UTC", file_size_limit: int | None = None
) -> subprocess.CompletedProcess[str]:
    """The command as a process on a machine in ``zone``."""
    return cli(directory, *args, env={"TZ": zone}, file_size_limit=file_size_limit)


def test_editing_keeps_the_files_zone_on_a_machine_in_another(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    added = cli_in(
        directory, "--timezone", "Asia/Shanghai", "add", "--type", "shell", "--account", "a",
        "--interval", "1h", "--hours", "8-22", "--id", "t1", "--kw", "command=true",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    for step in ("pause", "resume"):
        result = cli_in(directory, step, "t1")  # no --timezone: the machine is in UTC
        assert result.returncode == 0, result.stderr
    state = read_state(directory)
    assert state["timezone"] == "Asia/Shanghai"
    planned = datetime.fromisoformat(state["tasks"][0]["next_execution_time"])
    assert 8 <= planned.astimezone(ZoneInfo("Asia/Shanghai")).hour < 22
    refused = cli_in(directory, "--timezone", "UTC", "pause", "t1")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert "'Asia/Shanghai', not 'UTC'" in refused.stderr
    assert "--convert-timezone" in refused.stderr
    converted = cli_in(directory, "pause", "t1", "--timezone", "UTC", "--convert-timezone")
    assert converted.returncode == 0, converted.stderr
    assert read_state(directory)["timezone"] == "UTC"


def test_a_change_that_cannot_be_saved_exits_1_and_says_so(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    added = cli_in(
        directory, "add", "--type", "shell", "--account", "a", "--interval", "1h", "--id", "t1",
        "--kw", "command=true",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    before = (directory / "dispatch_config.json").read_bytes()
    paused = cli_in(directory, "pause", "t1", file_size_limit=64)
    assert (paused.returncode, paused.stdout) == (1, "")
    assert paused.stderr.count("\n") == 1, paused.stderr
    assert paused.stderr.startswith("task-dispatcher: error: pause t1: not saved to ")
    assert "File too large" in paused.stderr
    added = cli_in(
        directory, "add", "--type", "shell", "--account", "a", "--interval", "1h", "--id", "t2",
        "--kw", "command=true", file_size_limit=64,
    )  # fmt: skip
    assert (added.returncode, added.stdout) == (1, "")
    assert added.stderr.count("\n") == 1, added.stderr
    assert "add t2: not saved" in added.stderr
    assert (directory / "dispatch_config.json").read_bytes() == before
    assert read_state(directory)["tasks"][0]["status"] == "pending"


# ---------------------------------------------------------------------- ids through the socket

ADD = ("add", "--type", "shell", "--account", "账号1", "--interval", "1h", "--kw", "command=true")


def ok(directory: Path, *args: str) -> str:
    done = cli(directory, *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def refused(directory: Path, *args: str) -> str:
    """The one line a refused command prints (exit status 2, nothing on stdout)."""
    done = cli(directory, *args)
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("task-dispatcher: error: ")
    return done.stderr


@pytest.mark.timeout(180)
def test_a_chinese_task_id_through_the_running_dispatcher(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    ok(directory, *ADD, "--id", "first")
    process = running()
    process.wait_for_line("control API on unix socket")
    assert ok(directory, *ADD, "--id", "账号1-运营") == "账号1-运营\n"
    process.wait_for_line("task 账号1-运营 added")  # the running dispatcher added it
    assert "a task with id '账号1-运营' exists" in refused(directory, *ADD, "--id", "账号1-运营")
    assert ok(directory, "pause", "账号1-运营") == "账号1-运营: paused\n"
    process.wait_for_line("task 账号1-运营 (account 账号1) is paused")
    assert task_in_file(directory, "账号1-运营")["status"] == "paused"
    assert ok(directory, "resume", "账号1-运营").startswith("账号1-运营: pending, next run ")
    assert "task_id: 账号1-运营" in ok(directory, "show", "账号1-运营")
    assert ok(directory, "reorder", "账号1-运营", "0") == "账号1: 账号1-运营 first\n"
    assert ok(directory, "remove", "账号1-运营") == "账号1-运营: removed\n"
    process.wait_for_line("task 账号1-运营 (account 账号1) removed")
    assert read_state(directory)["account_tasks"] == {"账号1": ["first"]}
    assert "Traceback" not in "".join(process.seen)


@pytest.mark.timeout(180)
def test_ids_no_url_can_carry_are_refused_and_saved_ones_stay_manageable(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    legacy = ["a/b", ".", ".."]
    tasks = [
        seed_task(
            task_id,
            task_type="shell",
            task_end_time=None,
            valid_time_range=[0, 24],
            kwargs={
                "xhs_account_id": "account_1",
                "command": "true",
                "task_id": task_id,
                "task_type": "shell",
            },
        )
        for task_id in [*legacy, "ok"]
    ]
    (directory / "dispatch_config.json").write_bytes(seed_file(tasks))
    # The file alone (no dispatcher running): listed, shown, changed.
    listed = ok(directory, "list", "--json")
    assert [task["task_id"] for task in json.loads(listed)] == [*legacy, "ok"]
    assert ok(directory, "pause", "a/b") == "a/b: paused\n"
    process = running()
    process.wait_for_line("control API on unix socket")
    for command in ADD, ("add", "--type", "shell", "--account", "x/y", "--interval", "1h"):
        assert "task_id: 'a/b' contains '/'" in refused(directory, *command, "--id", "a/b")
    for task_id in (".", ".."):
        assert f"task_id: '{task_id}' cannot be a task id" in refused(
            directory, *ADD, "--id", task_id
        )
    # Through the running dispatcher: every command addresses them.
    for task_id in legacy:
        shown = ok(directory, "show", task_id)
        assert re.search(rf"task_id: {re.escape(task_id)}\n", shown), shown
        assert ok(directory, "pause", task_id) == f"{task_id}: paused\n"
        resumed = ok(directory, "resume", task_id)  # overdue: it may be running already
        assert re.match(rf"{re.escape(task_id)}: (pending|running), next run ", resumed)
    assert ok(directory, "reorder", "..", "0") == "account_1: .. a/b . ok\n"
    for task_id in legacy:
        assert ok(directory, "remove", task_id) == f"{task_id}: removed\n"
    assert read_state(directory)["account_tasks"] == {"account_1": ["ok"]}
    assert "Traceback" not in "".join(process.seen)


@pytest.mark.timeout(120)
def test_the_empty_store_hint_names_a_command_that_works_while_run_runs(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    process = running()
    hint = process.wait_for_line("no tasks in")
    process.wait_for_line("control API on unix socket")
    assert "while this runs" in hint
    match = re.search(r"task-dispatcher (--dir .*?)  \(", hint)
    assert match is not None, hint
    args = shlex.split(match.group(1))
    assert args[:2] == ["--dir", str(directory)]
    added = cli(directory, *args[2:]).stdout.strip()  # exactly what the hint says to run
    assert added
    process.wait_for_line(f"task {added} added")
    assert [task["task_id"] for task in read_state(directory)["tasks"]] == [added]


@pytest.mark.timeout(120)
def test_the_demo_log_shows_what_each_run_printed(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    process = running("--demo")
    process.wait_for_line("task demo-second printed: second task of demo-a")
    clock = process.wait_for_line("task demo-clock printed: ")
    assert re.search(r"printed: .*\d\d:\d\d:\d\d", clock), clock  # date's output


def test_validate_refuses_a_remote_dispatcher(tmp_path: Path) -> None:
    # ./dispatcher here is some other store: checking it would answer for the wrong one.
    directory = tmp_path / "dispatcher"
    add_shell_task(directory, "t", "1h", "command=true")
    env = {k: v for k, v in os.environ.items() if k != "TASK_DISPATCHER_DIR"}
    done = subprocess.run(
        [sys.executable, "-m", "scheduler", "--url", "http://127.0.0.1:9", "validate"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, ""), done
    assert done.stderr.startswith(
        "task-dispatcher: error: validate checks a state file on this machine, "
        "not the dispatcher at --url"
    )
    assert done.stderr.count("\n") == 1
    # A file or directory named here is checked here, --url or not.
    named = cli(directory, "--url", "http://127.0.0.1:9", "validate")
    assert named.returncode == 0, named.stderr
    assert named.stdout == f"{directory / 'dispatch_config.json'}: ok\n"
