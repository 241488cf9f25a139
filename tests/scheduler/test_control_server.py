"""``serve_control``: real listeners on the dispatcher's socket and on TCP, in this process."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from click.testing import CliRunner

from scheduler import ListenError, TaskDispatcher, cli
from scheduler.control import ControlServer, check_listen, create_app
from scheduler.control.guard import TOKEN_FILE, issue_token
from scheduler.control.server import _Listener

API = "/api/v1"
TASK = {
    "task_type": "xhs_type",
    "sys_type": "mac_intel",
    "account_id": "acc",
    "interval": 3600,
    "valid_time_range": [8, 22],
    "password": "hunter2",
}


def over_socket(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://localhost"
    )


async def test_the_socket_is_owner_only_trusted_and_gone_after_stop(
    started: TaskDispatcher,
) -> None:
    server = await started.serve_control()
    path = started.directory / "control.sock"
    assert server.socket_path == path
    mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert not [p for p in started.directory.iterdir() if p.name.startswith(".ctl-")]
    async with over_socket(path) as api:
        added = await api.post(f"{API}/tasks", json={**TASK, "task_id": "t"})
        assert added.status_code == 201
        # The socket's caller is the directory's owner: it may see secrets.
        shown = await api.get(f"{API}/tasks/t", params={"show_secrets": "true"})
        assert shown.json()["kwargs"]["password"] == "hunter2"
        assert (await api.get(f"{API}/health")).json()["status"] == "ok"
    await started.stop()
    assert not path.exists()


async def test_list_reads_a_large_listing_in_pages(
    started: TaskDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    await started.serve_control()
    await started.add_tasks(
        {**TASK, "task_id": f"t{i}", "account_id": f"acc{i % 3}"} for i in range(7)
    )
    monkeypatch.setattr(cli, "LIST_PAGE", 2)
    listed = await asyncio.to_thread(
        CliRunner().invoke, cli.main, ["--dir", str(started.directory), "list", "--json"]
    )
    assert listed.exit_code == 0, listed.output
    records = orjson.loads(listed.stdout)
    assert [r["task_id"] for r in records] == ["t0", "t3", "t6", "t1", "t4", "t2", "t5"]
    assert {r["kwargs"]["password"] for r in records} == {"***"}


async def test_a_stale_socket_is_replaced_and_anything_else_refused(
    make_dispatcher: Callable[..., TaskDispatcher], state_dir: Path
) -> None:
    state_dir.mkdir(mode=0o700)
    path = state_dir / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # what a killed owner leaves behind
    dead.close()
    dispatcher = make_dispatcher()
    await dispatcher.start()
    try:
        await dispatcher.serve_control()
        async with over_socket(path) as api:
            assert (await api.get(f"{API}/health")).status_code == 200
    finally:
        await dispatcher.stop()

    path.write_text("not a socket")
    dispatcher = make_dispatcher()
    await dispatcher.start()
    try:
        with pytest.raises(ListenError, match="not a socket"):
            await dispatcher.serve_control()
        assert path.read_text() == "not a socket"
    finally:
        await dispatcher.stop()


async def test_tcp_without_a_token_gets_a_drawn_one_kept_owner_only(
    started: TaskDispatcher,
) -> None:
    server = await started.serve_control(socket=False, listen="127.0.0.1:0")
    assert server.socket_path is None
    assert not (started.directory / "control.sock").exists()
    assert server.address is not None
    assert server.address[1] > 0
    token = server.token
    assert token is not None
    assert len(token) >= 40  # secrets.token_urlsafe(32)
    assert token == started.control_token
    stored = started.directory / TOKEN_FILE
    assert stored.read_text().strip() == token
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert server.login_url is None  # no dashboard here
    # Another local user knows the address, not the token: nothing gets through.
    async with httpx.AsyncClient(base_url=str(server.url)) as anonymous:
        refused = await anonymous.post(f"{API}/tasks", json={**TASK, "task_id": "t"})
        assert refused.status_code == 401
        wrong = await anonymous.post(
            f"{API}/tasks",
            json={**TASK, "task_id": "t"},
            headers={"Authorization": f"Bearer {token[:-1]}x"},
        )
        assert wrong.status_code == 401
        assert (await anonymous.get(f"{API}/health")).status_code == 401
        assert (await anonymous.get("/metrics")).status_code == 401
    assert started.peek_tasks() == []
    async with httpx.AsyncClient(
        base_url=str(server.url), headers={"Authorization": f"Bearer {token}"}
    ) as holder:
        added = await holder.post(f"{API}/tasks", json={**TASK, "task_id": "t"})
        assert added.status_code == 201
        shown = await holder.get(f"{API}/tasks/t", params={"show_secrets": "true"})
        assert shown.json()["kwargs"]["password"] == "hunter2"
    await started.stop()
    assert not stored.exists()  # the token died with its listener


async def test_a_token_left_by_a_dead_dispatcher_is_removed(started: TaskDispatcher) -> None:
    stale = started.directory / TOKEN_FILE
    stale.write_text("dead-token\n")
    server = await started.serve_control(listen="127.0.0.1:0", token="tok-123")
    assert server.token == "tok-123"
    assert not stale.exists()


async def test_the_token_file_is_never_readable_by_others(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created 0600 under a temporary name and renamed into place: at no instant does a
    file holding the token exist with wider permissions, whatever the umask."""
    state_dir.mkdir(parents=True, exist_ok=True)
    real_open, real_replace = os.open, os.replace
    created: list[int] = []
    replaced: list[int] = []

    def watch_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kw: Any) -> int:
        if Path(path).parent == state_dir and flags & os.O_CREAT:
            created.append(mode)
        return real_open(path, flags, mode, *args, **kw)

    def watch_replace(source: Any, target: Any, *args: Any, **kw: Any) -> None:
        if Path(target) == state_dir / TOKEN_FILE:
            replaced.append(stat.S_IMODE(os.stat(source).st_mode))
        real_replace(source, target, *args, **kw)

    monkeypatch.setattr(os, "open", watch_open)
    monkeypatch.setattr(os, "replace", watch_replace)
    old_umask = os.umask(0)
    try:
        token = issue_token(state_dir)
    finally:
        os.umask(old_umask)
    assert created == [0o600]
    assert replaced == [0o600]
    assert stat.S_IMODE((state_dir / TOKEN_FILE).stat().st_mode) == 0o600
    assert (state_dir / TOKEN_FILE).read_text() == token + "\n"
    assert issue_token(state_dir) != token  # drawn afresh each time
    assert [p.name for p in state_dir.iterdir()] == [TOKEN_FILE]  # no temporary file left


async def test_an_embedded_control_app_needs_the_dispatchers_token(
    make_dispatcher: Callable[..., TaskDispatcher],
) -> None:
    dispatcher = make_dispatcher()
    app = dispatcher.control_app()
    token = dispatcher.control_token
    assert (dispatcher.directory / TOKEN_FILE).read_text().strip() == token
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        assert (await c.get(f"{API}/tasks")).status_code == 401
        ok = await c.get(f"{API}/tasks", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    dispatcher.close()
    assert not (dispatcher.directory / TOKEN_FILE).exists()


async def test_no_tcp_listener_without_a_token(started: TaskDispatcher) -> None:
    app = create_app(started)  # an app built without a token
    with pytest.raises(ListenError, match="needs a token"):
        ControlServer(app, socket_path=None, listen="127.0.0.1:0")
    # Served through TCP all the same (as a listener of ours marks it), it refuses.
    tcp = _Listener(app, "tcp")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=tcp), base_url="http://127.0.0.1"
    ) as c:
        refused = await c.get(f"{API}/tasks")
        assert refused.status_code == 401
        assert "no token" in refused.json()["message"]


async def test_tcp_with_a_token_needs_it_from_every_caller(started: TaskDispatcher) -> None:
    server = await started.serve_control(listen="127.0.0.1:0", token="tok-123")
    async with httpx.AsyncClient(base_url=str(server.url)) as anonymous:
        assert (await anonymous.get(f"{API}/tasks")).status_code == 401
        assert (await anonymous.get("/openapi.json")).status_code == 401
    headers = {"Authorization": "Bearer tok-123"}
    async with httpx.AsyncClient(base_url=str(server.url), headers=headers) as holder:
        added = await holder.post(f"{API}/tasks", json={**TASK, "task_id": "t"})
        assert added.status_code == 201
        shown = await holder.get(f"{API}/tasks/t", params={"show_secrets": "true"})
        assert shown.json()["kwargs"]["password"] == "hunter2"
    # The socket stays the owner's way in, token or not.
    async with over_socket(started.directory / "control.sock") as owner:
        assert (await owner.get(f"{API}/tasks")).status_code == 200


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_off_loopback_needs_a_token(listen: str) -> None:
    with pytest.raises(ListenError, match="not a loopback address"):
        check_listen(listen, None)
    assert check_listen(listen, "tok-123")[1] == 0


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:8765", ("127.0.0.1", 8765)), ("[::1]:80", ("::1", 80)), ("localhost:1", None)],
)
def test_listen_addresses(listen: str, expected: tuple[str, int] | None) -> None:
    host, port = check_listen(listen, None)
    if expected is not None:
        assert (host, port) == expected


@pytest.mark.parametrize("listen", ["8765", "127.0.0.1", "127.0.0.1:x", ":8765", "h:99999"])
def test_bad_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ListenError, match="HOST:PORT"):
        check_listen(listen, None)


async def test_off_loopback_refused_before_anything_listens(started: TaskDispatcher) -> None:
    with pytest.raises(ListenError):
        await started.serve_control(listen="0.0.0.0:0")
    assert not (started.directory / "control.sock").exists()
    server = await started.serve_control(listen="0.0.0.0:0", token="tok-123")
    assert server.address is not None


async def test_a_taken_port_is_a_listen_error_and_nothing_is_left(started: TaskDispatcher) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match="cannot listen"):
            await started.serve_control(listen=f"127.0.0.1:{port}")
        assert not (started.directory / "control.sock").exists()
    finally:
        taken.close()


async def test_served_once_and_close_refused_while_serving(
    make_dispatcher: Callable[..., TaskDispatcher],
) -> None:
    dispatcher = make_dispatcher()
    await dispatcher.serve_control()
    with pytest.raises(RuntimeError, match="already served"):
        await dispatcher.serve_control()
    with pytest.raises(RuntimeError, match="await stop"):
        dispatcher.close()
    await dispatcher.stop()
    assert dispatcher.closed


async def test_a_socket_path_too_long_is_refused_plainly(
    make_dispatcher: Callable[..., TaskDispatcher], tmp_path: Path
) -> None:
    dispatcher = make_dispatcher(dispatcher_dir=tmp_path / ("d" * 120))
    with pytest.raises(ListenError, match="too long for a Unix socket"):
        await dispatcher.serve_control()
    await dispatcher.stop()


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of the state (journal appends and snapshots) fails: the disk is full."""

    def write(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


async def test_a_change_not_saved_is_507_and_the_cli_exits_1(
    started: TaskDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await started.serve_control()
    await started.add_tasks([{**TASK, "task_id": "t1"}, {**TASK, "task_id": "t2"}])
    full_disk(monkeypatch)
    assert server.socket_path is not None
    async with over_socket(server.socket_path) as api:
        refused = await api.post(f"{API}/tasks/t1/pause")
        assert refused.status_code == 507, refused.text
        body = refused.json()
        assert (body["error"], body["field"]) == ("not_saved", None)
        assert "t1" in body["message"]
        assert "No space left" in body["message"]
        # In effect all the same (and retried in the background), as the library says.
        assert (await api.get(f"{API}/tasks/t1")).json()["status"] == "paused"
    paused = await asyncio.to_thread(
        CliRunner().invoke, cli.main, ["--dir", str(started.directory), "pause", "t2"]
    )
    assert paused.exit_code == 1, paused.output
    assert paused.stdout == ""
    assert paused.stderr.startswith("task-dispatcher: error: pause: change to task(s) t2 ")
    assert "No space left" in paused.stderr
    assert paused.stderr.count("\n") == 1
    assert started.get_task("t2").status == "paused"
    monkeypatch.undo()


# ---------------------------------------------------------------------- why a task waits


async def _eventually(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check()`` (an awaitable's factory) until it returns something true, for at
    most 10 seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        found = await check()
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.02)


async def test_the_task_view_says_why_a_task_waits_over_tcp(
    started: TaskDispatcher, recorder: Any
) -> None:
    server = await started.serve_control(listen="127.0.0.1:0", token="tok-123")
    recorder.gates["first"] = asyncio.Event()
    recorder.started["first"] = asyncio.Event()
    headers = {"Authorization": "Bearer tok-123"}
    async with httpx.AsyncClient(base_url=str(server.url), headers=headers) as api:
        for task_id in ("first", "second"):
            added = await api.post(
                f"{API}/tasks", json={**TASK, "task_id": task_id, "valid_time_range": [0, 24]}
            )
            assert added.status_code == 201, added.text
        await asyncio.wait_for(recorder.started["first"].wait(), 10)

        async def second_waits_for_the_lane() -> dict[str, Any] | None:
            body: dict[str, Any] = (await api.get(f"{API}/tasks/second")).json()
            waiting = body["waiting"]
            return body if waiting is not None and waiting["kind"] == "lane" else None

        second = await _eventually(second_waits_for_the_lane, "second queued for the lane")
        run_id = started.get_task("first").active_run.run_id  # type: ignore[union-attr]
        message = second["waiting"]["message"]
        assert message.startswith("its due run waits for account acc's lane, behind task first's")
        assert f"run {run_id} (executing since " in message
        assert second["kwargs"]["password"] == "***"

        first = (await api.get(f"{API}/tasks/first")).json()["waiting"]
        assert first["kind"] == "running"
        assert first["message"].startswith(f"run {run_id} executing since ")
        assert first["since"] is not None

        listing = (await api.get(f"{API}/tasks")).json()
        kinds = {t["task_id"]: (t["waiting"] or {}).get("kind") for t in listing["tasks"]}
        assert kinds == {"first": "running", "second": "lane"}

        await api.post(f"{API}/tasks/second/pause")
        paused = (await api.get(f"{API}/tasks/second")).json()["waiting"]
        assert paused == {
            "kind": "paused",
            "message": "paused: no run starts until it is resumed",
            "since": None,
            "until": None,
        }
        schema = (await api.get("/openapi.json")).json()["components"]["schemas"]
        assert "waiting" in schema["TaskView"]["properties"]
    recorder.gates["first"].set()


def _waiting_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("waiting:")]
    assert len(lines) == 1, output
    return lines[0]


async def test_show_says_why_a_task_waits_alike_live_and_stopped(
    started: TaskDispatcher, recorder: Any
) -> None:
    """``show`` through the running dispatcher's API and on the stopped store: the same
    reason, where the record alone decides it (a pause after failures, hours not open)."""
    await started.serve_control()
    hour = datetime.now(ZoneInfo("Asia/Shanghai")).hour
    opens = (hour + 2) % 24
    recorder.fail.add("failing")
    await started.add_tasks(
        [
            {
                **TASK,
                "task_id": "failing",
                "valid_time_range": [0, 24],
                "run_policy": {"pause_after_failures": 1},
            },
            {**TASK, "task_id": "later", "valid_time_range": [opens, opens + 1]},
        ]
    )

    async def paused() -> bool:
        return started.get_task("failing").status == "paused"

    await _eventually(paused, "the failing task paused")

    def show(task_id: str) -> str:
        result = CliRunner().invoke(cli.main, ["--dir", str(started.directory), "show", task_id])
        assert result.exit_code == 0, result.output
        return _waiting_line(result.stdout)

    live = {task_id: await asyncio.to_thread(show, task_id) for task_id in ("failing", "later")}
    assert live["failing"] == (
        "waiting: paused by the dispatcher after 1 failed runs in a row; the last: "
        "ValueError: boom in failing: no run starts until it is resumed [paused_after_failures]"
    )
    assert live["later"].startswith(
        f"waiting: outside its hours ({opens:02d}-{opens + 1:02d}) until "
    )
    await started.stop()
    assert not (started.directory / "control.sock").exists()
    stopped = {task_id: show(task_id) for task_id in ("failing", "later")}
    assert stopped == live
