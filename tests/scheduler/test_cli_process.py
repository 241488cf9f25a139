"""`task-dispatcher run` as a real process: runs happen, SIGINT stops it cleanly, one owner."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from helpers import Running, add_shell_task, cli, read_state


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[[], Running]]:
    started: list[Running] = []

    def start() -> Running:
        started.append(Running(tmp_path / "store"))
        return started[-1]

    yield start
    for process in started:
        process.close()


@pytest.mark.timeout(120)
def test_run_executes_a_one_second_shell_task_and_stops_on_sigint(
    tmp_path: Path, running: Callable[[], Running]
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
    tmp_path: Path, running: Callable[[], Running]
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
