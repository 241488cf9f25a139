"""An operator's actions against a running `task-dispatcher run`: run now, and pausing or
resuming a whole account, through the command line (socket and --url) and the HTTP API."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from helpers import Running, cli, read_state, served

TOKEN = "tok-operator-0123456789"


def closed_hours() -> str:
    """An hour window that opens two hours from now (the local zone): closed for a while."""
    hour = datetime.now().astimezone().hour
    return f"{(hour + 2) % 24}-{(hour + 4) % 24}"


def add(directory: Path, task_id: str, account: str, hours: str, shell: str) -> None:
    added = cli(
        directory,
        *("add", "--type", "shell", "--account", account, "--interval", "1h"),
        *("--hours", hours, "--id", task_id, "--kw", f"command={shell}"),
    )
    assert (added.returncode, added.stdout) == (0, f"{task_id}\n"), added.stderr


def tasks(directory: Path) -> dict[str, dict[str, Any]]:
    return {task["task_id"]: task for task in read_state(directory)["tasks"]}


def history(directory: Path, *args: str) -> list[dict[str, Any]]:
    listed = cli(directory, "runs", "--json", *args)
    assert listed.returncode == 0, listed.stderr
    runs: list[dict[str, Any]] = orjson.loads(listed.stdout)
    return runs


def wait_for_runs(
    directory: Path, task_id: str, predicate: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while not predicate(runs := history(directory, task_id)):
        assert time.monotonic() < deadline, f"runs of {task_id} so far: {runs}"
        time.sleep(0.2)
    return runs


def finished_manual(runs: list[dict[str, Any]]) -> bool:
    return any(r["trigger"] == "manual" and r["outcome"] != "running" for r in runs)


@pytest.mark.timeout(180)
def test_run_now_and_account_actions_through_the_cli_and_the_api(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    hours = closed_hours()
    marker = tmp_path / "ran"
    add(directory, "t1", "ops", hours, f"sh -c 'echo t1 >> {marker}'")
    add(directory, "t2", "ops", hours, "true")
    add(directory, "t3", "other", hours, "true")

    refused = cli(directory, "run-now", "t1")
    assert refused.returncode == 1
    assert "no dispatcher is running" in refused.stderr
    assert tasks(directory)["t1"]["run_requested"] is None

    process = running("--listen", "127.0.0.1:0", env={"TASK_DISPATCHER_TOKEN": TOKEN})
    url = served(process)
    planned = tasks(directory)["t1"]["next_execution_time"]

    # Through the socket.
    asked = cli(directory, "run-now", "t1")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.startswith("t1: run asked for at ")
    runs = wait_for_runs(directory, "t1", finished_manual)
    assert [(r["trigger"], r["outcome"]) for r in runs] == [("manual", "succeeded")]
    assert marker.read_text() == "t1\n"
    assert tasks(directory)["t1"]["next_execution_time"] == planned
    assert tasks(directory)["t1"]["run_requested"] is None

    # Over TCP: the command line with --url and the token, and raw HTTP.
    elsewhere = tmp_path / "elsewhere"
    env = {"TASK_DISPATCHER_TOKEN": TOKEN}
    remote = cli(elsewhere, "--url", url, "run-now", "t2", env=env)
    assert remote.returncode == 0, remote.stderr
    wait_for_runs(directory, "t2", finished_manual)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    answer = httpx.post(f"{url}/api/v1/tasks/t3/run", headers=headers)
    assert answer.status_code == 202
    assert answer.json()["run_requested"] is not None
    wait_for_runs(directory, "t3", finished_manual)
    missing = httpx.post(f"{url}/api/v1/tasks/nope/run", headers=headers)
    assert (missing.status_code, missing.json()["field"]) == (404, "task_id")
    assert httpx.post(f"{url}/api/v1/tasks/t3/run").status_code == 401

    # A whole account: the command line through the socket, then the API.
    paused = cli(directory, "pause", "--account", "ops")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout == "ops: 2 of 2 task(s) paused\n  t1: paused\n  t2: paused\n"
    statuses = {task_id: task["status"] for task_id, task in tasks(directory).items()}
    assert statuses == {"t1": "paused", "t2": "paused", "t3": "pending"}
    again = cli(elsewhere, "--url", url, "pause", "--account", "ops", env=env)
    assert again.stdout == "ops: 0 of 2 task(s) paused\n  t1: paused (unchanged)\n" + (
        "  t2: paused (unchanged)\n"
    )
    resumed = httpx.post(f"{url}/api/v1/accounts/ops/resume", headers=headers)
    assert resumed.status_code == 200
    assert resumed.json() == {
        "account_id": "ops",
        "tasks": [
            {"task_id": "t1", "status": "pending", "changed": True},
            {"task_id": "t2", "status": "pending", "changed": True},
        ],
    }
    assert tasks(directory)["t1"]["status"] == "pending"
    unknown = httpx.post(f"{url}/api/v1/accounts/nobody/pause", headers=headers)
    assert (unknown.status_code, unknown.json()["field"]) == (404, "account_id")
    both = cli(directory, "pause", "t1", "--account", "ops")
    assert both.returncode == 2

    process.process.send_signal(signal.SIGINT)
    assert process.process.wait(30) == 0
    # Without a dispatcher, an account is paused on the file, in one commit.
    offline = cli(directory, "pause", "--account", "ops")
    assert offline.stdout == "ops: 2 of 2 task(s) paused\n  t1: paused\n  t2: paused\n"


@pytest.mark.timeout(180)
def test_a_run_asked_for_survives_a_kill_and_runs_once(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    marker = tmp_path / "ran"
    # The account's lane is busy with a long run when the manual run is asked for.
    add(directory, "busy", "ops", "0-24", "sleep 4")
    add(directory, "t1", "ops", closed_hours(), f"sh -c 'echo t1 >> {marker}'")
    process = running()
    process.wait_for_line("control API on unix socket")
    process.wait_for_line("of task busy (account ops, shell) started")
    asked = cli(directory, "run-now", "t1")
    assert asked.returncode == 0, asked.stderr
    assert tasks(directory)["t1"]["run_requested"] is not None
    os.kill(process.process.pid, signal.SIGKILL)
    process.process.wait(10)
    assert not marker.exists()

    restarted = running()
    restarted.wait_for_line("control API on unix socket")
    wait_for_runs(directory, "t1", finished_manual)
    assert marker.read_text() == "t1\n"
    assert [r["trigger"] for r in history(directory, "t1")] == ["manual"]
    assert tasks(directory)["t1"]["run_requested"] is None
