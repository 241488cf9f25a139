"""The command line against a running `task-dispatcher run`: through its socket and over TCP."""

from __future__ import annotations

import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from helpers import ROOT, Running, cli, command, read_state, served

from jobstores.snapshot import validate_state_file

TOKEN = "tok-0123456789"
ADD = ("add", "--type", "shell", "--account", "ops", "--interval", "1h", "--hours", "0-24")


def add(directory: Path, task_id: str, *extra: str) -> None:
    added = cli(directory, *ADD, "--id", task_id, "--kw", "command=date", *extra)
    assert (added.returncode, added.stdout) == (0, f"{task_id}\n"), added.stderr


@pytest.mark.timeout(180)
def test_every_command_goes_through_the_running_dispatcher(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    # The same commands on a directory no dispatcher runs on: today's output, for comparison.
    offline = tmp_path / "offline"
    for target in (directory, offline):
        add(target, "a1", "--kw", "api_token=abc123")
        add(target, "a2")
    process = running("--listen", "127.0.0.1:0")
    served(process)

    def both(*args: str) -> tuple[subprocess.CompletedProcess[str], ...]:
        return cli(directory, *args), cli(offline, *args)

    added = cli(directory, *ADD, "--id", "a3", "--kw", "command=date")
    assert (added.returncode, added.stdout) == (0, "a3\n"), added.stderr
    add(offline, "a3")
    assert read_state(directory)["account_tasks"]["ops"] == ["a1", "a2", "a3"]

    changes: list[tuple[str, ...]] = [("pause", "a2"), ("reorder", "a3", "0"), ("remove", "a1")]
    for args in changes:
        live, file = both(*args)
        assert (live.returncode, live.stdout, live.stderr) == (0, file.stdout, ""), args
    assert read_state(directory)["account_tasks"]["ops"] == ["a3", "a2"]
    assert {t["task_id"]: t["status"] for t in read_state(directory)["tasks"]}["a2"] == "paused"

    live, file = both("resume", "a2")
    assert live.returncode == 0
    assert live.stdout.startswith("a2: ")
    assert live.stdout.split(",")[0] == file.stdout.split(",")[0]

    live, file = both("update", "a3", "--interval", "2h", "--kw", "note=x", "--policy", "retries=1")
    assert (live.returncode, live.stderr) == (0, ""), live.stderr
    assert live.stdout.split(",")[0] == file.stdout.split(",")[0] == "a3: pending"
    edited = {t["task_id"]: t for t in read_state(directory)["tasks"]}["a3"]
    assert (edited["interval"], edited["kwargs"]["note"], edited["kwargs"]["command"]) == (
        7200,
        "x",
        "date",
    )
    assert edited["run_policy"]["retries"] == 1

    mistakes: list[tuple[str, ...]] = [
        ("pause", "nope"),
        ("reorder", "a3", "9"),
        ("remove", "nope"),
        ("update", "a3", "--hours", "24-0"),
        (*ADD, "--id", "a3", "--kw", "command=date"),
        ("add", "--type", "shell", "--account", "ops", "--interval", "-5"),
    ]
    for args in mistakes:
        live, file = both(*args)
        assert (live.returncode, live.stdout) == (2, ""), args
        assert live.stderr == file.stderr, args

    listed_live, listed_file = both("list", "--json")
    live_records = orjson.loads(listed_live.stdout)
    assert [r["task_id"] for r in live_records] == ["a3", "a2"]
    assert list(live_records[0]) == list(orjson.loads(listed_file.stdout)[0])
    table = cli(directory, "list")
    assert table.returncode == 0
    assert "a3" in table.stdout
    assert "paused" not in table.stdout  # resumed above

    shown_live, shown_file = both("show", "a3", "--runs", "2")
    assert shown_live.returncode == 0

    def keys(output: str) -> list[str]:
        # Why it waits differs: the offline copy's a3 never ran (due), the live one ran.
        shown = [line[:22].strip() for line in output.splitlines() if line[:22].strip()]
        return [key for key in shown if key != "waiting"]

    assert keys(shown_live.stdout) == keys(shown_file.stdout)
    assert "position: 0" in shown_live.stdout
    missing_live, missing_file = both("show", "nope")
    assert missing_live.returncode == 2
    assert missing_live.stderr == missing_file.stderr.replace(str(offline), str(directory))

    # Secrets: masked by default; the socket's caller is the owner and may see them.
    add(directory, "s1", "--kw", "api_token=abc123")
    masked = cli(directory, "show", "s1")
    assert "abc123" not in masked.stdout
    assert '"api_token":"***"' in masked.stdout
    assert "abc123" in cli(directory, "show", "s1", "--show-secrets").stdout
    assert "abc123" in cli(directory, "list", "--json", "--show-secrets").stdout

    process.process.send_signal(signal.SIGINT)
    assert process.process.wait(30) == 0
    assert not (directory / "control.sock").exists()
    assert validate_state_file(directory / "dispatch_config.json") == []


@pytest.mark.timeout(180)
def test_remote_commands_over_tcp_need_the_token(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    add(directory, "r1", "--kw", "password=pw")
    process = running("--listen", "127.0.0.1:0", env={"TASK_DISPATCHER_TOKEN": TOKEN})
    url = served(process)
    elsewhere = tmp_path / "elsewhere"  # a remote caller has no access to the directory

    refused = cli(elsewhere, "--url", url, "pause", "r1", env={"TASK_DISPATCHER_TOKEN": ""})
    assert refused.returncode == 2
    assert "needs a token" in refused.stderr
    wrong = cli(elsewhere, "--url", url, "--token", "nope", "list")
    assert wrong.returncode == 2

    env = {"TASK_DISPATCHER_URL": url, "TASK_DISPATCHER_TOKEN": TOKEN}
    paused = cli(elsewhere, "pause", "r1", env=env)
    assert (paused.returncode, paused.stdout) == (0, "r1: paused\n"), paused.stderr
    assert read_state(directory)["tasks"][0]["status"] == "paused"
    shown = cli(elsewhere, "show", "r1", "--show-secrets", env=env)
    assert '"password":"pw"' in shown.stdout
    # r1 ran when `run` started; its history comes over the API (no file is reachable here).
    deadline = time.monotonic() + 30
    while not (history := orjson.loads(cli(elsewhere, "runs", "--json", env=env).stdout)):
        assert time.monotonic() < deadline, "r1's run never showed in the history"
    assert [(r["task_id"], r["outcome"]) for r in history] == [("r1", "succeeded")]
    assert "r1" in cli(elsewhere, "runs", "r1", "--account", "ops", env=env).stdout
    bad_since = cli(elsewhere, "runs", "--since", "2026-01-08T09:00", env=env)
    assert bad_since.returncode == 0  # naive times are read in the local zone, as on the file
    assert not elsewhere.exists()

    # The same over raw HTTP, as curl would do it.
    assert httpx.get(f"{url}/api/v1/tasks").status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    listing = httpx.get(f"{url}/api/v1/tasks", headers=headers).json()
    assert listing["tasks"][0]["kwargs"]["password"] == "***"
    too_big = httpx.post(
        f"{url}/api/v1/tasks/bulk", headers=headers, content=b" " * (2 * 1024 * 1024)
    )
    assert too_big.status_code == 413
    unreachable = cli(elsewhere, "--url", "http://127.0.0.1:9", "list")
    assert unreachable.returncode == 2
    assert "cannot reach the dispatcher" in unreachable.stderr


@pytest.mark.timeout(180)
def test_two_operators_pausing_and_reordering_at_once(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    directory = tmp_path / "store"
    ids = [f"t{i}" for i in range(6)]
    for task_id in ids:
        add(directory, task_id)
    process = running()
    process.wait_for_line("control API on unix socket")
    process.wait_for_line("running 6 task(s)")

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            command(directory, *args),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # Each round: one operator pauses a task while the other moves another to the front.
    rounds = [("t0", "t5"), ("t2", "t4"), ("t1", "t3")]
    for paused, moved in rounds:
        first = start("pause", paused)
        second = start("reorder", moved, "0")
        for operator in (first, second):
            out, err = operator.communicate(timeout=60)
            assert operator.returncode == 0, err
        assert out.startswith("ops: ")

    state = read_state(directory)
    assert state["account_tasks"]["ops"][:3] == ["t3", "t4", "t5"]
    assert sorted(state["account_tasks"]["ops"]) == ids
    statuses = {t["task_id"]: t["status"] for t in state["tasks"]}
    assert [statuses[t] for t in ("t0", "t1", "t2")] == ["paused"] * 3
    assert validate_state_file(directory / "dispatch_config.json") == []
    live = orjson.loads(cli(directory, "list", "--json").stdout)
    assert [r["task_id"] for r in live] == state["account_tasks"]["ops"]


@pytest.mark.timeout(60)
def test_run_refuses_tcp_off_loopback_without_a_token(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    refused = cli(directory, "run", "--no-live", "--listen", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "not a loopback address" in refused.stderr
    assert "TASK_DISPATCHER_TOKEN" in refused.stderr
    assert not (directory / "dispatch_config.json").exists()  # refused before starting


@pytest.mark.timeout(120)
def test_run_with_a_token_listens_off_loopback(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    process = running("--listen", "0.0.0.0:0", env={"TASK_DISPATCHER_TOKEN": TOKEN})
    line = process.wait_for_line("control API on http://")
    port = line.rsplit(":", 1)[1].strip()
    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/health")
    assert response.status_code == 401


@pytest.mark.timeout(120)
def test_run_without_the_control_extra(tmp_path: Path, running: Callable[..., Running]) -> None:
    blocker = tmp_path / "no-control"
    (blocker / "fastapi").mkdir(parents=True)
    (blocker / "fastapi" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": f"{blocker}:{ROOT}"}
    directory = tmp_path / "store"
    refused = cli(directory, "run", "--no-live", "--listen", "127.0.0.1:0", env=env)
    assert refused.returncode == 2
    assert "pip install 'task-dispatcher[control]'" in refused.stderr

    process = running(env=env)
    line = process.wait_for_line("control API is not installed")
    assert "WARNING" in line
    assert "pip install 'task-dispatcher[control]'" in line
    process.wait_for_line("running 0 task(s)")
    assert not (directory / "control.sock").exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "[::1]"])
def test_run_listen_draws_a_token_and_refuses_everyone_without_it(
    tmp_path: Path, running: Callable[..., Running], host: str
) -> None:
    """Another local user knows the port, not the token: the README's first command must not
    let them run a shell command as the dispatcher's user."""
    directory = tmp_path / "store"
    pwned = tmp_path / "pwned"
    process = running("--listen", f"{host}:0", env={"TASK_DISPATCHER_TOKEN": ""})
    dashboard = process.wait_for_line("dashboard on http://").split("dashboard on ")[1].strip()
    login_line = process.wait_for_line("log in to the dashboard")
    login_url = login_line.rsplit(" ", 1)[1].strip()
    process.wait_for_line("running ")
    base = dashboard.rstrip("/")
    assert base.startswith(f"http://{host}:")
    stored = directory / "control.token"
    token = stored.read_text().strip()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert login_url == f"{base}/login?token={token}"
    # The token is printed once, in that line, and never logged.
    assert [line for line in process.seen if token in line] == [login_line]

    attack = {
        "task_type": "shell",
        "sys_type": "local",
        "account_id": "mallory",
        "interval": 60,
        "command": f"touch {pwned}",
    }
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        posted = httpx.post(f"{base}/api/v1/tasks", json=attack, headers=headers)
        assert posted.status_code == 401, posted.text
        assert httpx.get(f"{base}/api/v1/tasks", headers=headers).status_code == 401
        page = httpx.get(base + "/", headers={**headers, "accept": "text/html"})
        assert page.status_code in (303, 401)
        if page.status_code == 303:
            assert page.headers["location"].startswith("/login")
    near = httpx.post(
        f"{base}/api/v1/tasks", json=attack, headers={"Authorization": f"Bearer {token[:-1]}"}
    )
    assert near.status_code == 401
    # The owner's CLI on this machine goes through the socket, no token needed.
    listed = cli(directory, "list", "--json")
    assert (listed.returncode, orjson.loads(listed.stdout)) == (0, []), listed.stderr
    # From elsewhere, --url with $TASK_DISPATCHER_TOKEN.
    elsewhere = tmp_path / "elsewhere"
    remote = cli(elsewhere, "--url", base, "list", "--json", env={"TASK_DISPATCHER_TOKEN": token})
    assert (remote.returncode, orjson.loads(remote.stdout)) == (0, []), remote.stderr
    # The printed URL logs a client in and moves on to the dashboard without the token.
    with httpx.Client() as browser:
        opened = browser.get(login_url, headers={"accept": "text/html"})
        assert opened.status_code == 303
        assert opened.headers["location"] == "/"
        shown = browser.get(dashboard, headers={"accept": "text/html"})
        assert shown.status_code == 200
        assert 'data-page="overview"' in shown.text
    assert not pwned.exists()

    process.process.send_signal(signal.SIGINT)
    assert process.process.wait(30) == 0
    assert not stored.exists()  # the token died with the process
