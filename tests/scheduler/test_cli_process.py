"""`task-dispatcher run` as a real process: runs happen, SIGINT stops it cleanly, one owner."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

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
    assert read_state(directory)["tasks"][0]["status"] == "pending"
