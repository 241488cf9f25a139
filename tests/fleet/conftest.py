"""Fleet fixtures: a real Redis (one database per test), real worker processes, backends.

Redis: 127.0.0.1:6379 if it answers, else a ``redis-server`` started on a free port. Without
either the fleet tests are skipped, except when ``$CI`` is set: then they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet_support import (
    PROBE,
    ROOT,
    TESTS,
    FaultProxy,
    FileInbox,
    Make,
    OpenBackend,
    RedisServer,
    StartWorker,
    Worker,
    answers,
    wait_until,
)

from scheduler import TaskDispatcher
from scheduler.fleet.backend import CeleryRunBackend


@pytest.fixture(scope="session")
def redis_address() -> Iterator[tuple[str, int]]:
    """Host and port of a Redis for the fleet tests."""
    if answers("127.0.0.1", 6379):
        yield "127.0.0.1", 6379
        return
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory)).start()
        try:
            yield "127.0.0.1", server.port
        finally:
            server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` for this test alone (to kill and restart)."""
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def broker_url(redis_address: tuple[str, int]) -> Iterator[str]:
    """A Redis database of this test's own (claimed in database 0, flushed before and after)."""
    host, port = redis_address
    admin = redis.Redis(host, port, db=0)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 120
    number = 0
    while not number:
        for candidate in range(1, 16):
            if admin.set(f"td-test:db:{candidate}", token, nx=True, ex=1800):
                number = candidate
                break
        else:
            if time.monotonic() > deadline:
                pytest.fail("no free Redis database for this test")
            time.sleep(0.2)
    db = redis.Redis(host, port, db=number)
    db.flushdb()
    try:
        yield f"redis://{host}:{port}/{number}"
    finally:
        db.flushdb()
        if admin.get(f"td-test:db:{number}") == token.encode():
            admin.delete(f"td-test:db:{number}")


@pytest.fixture
def start_worker(broker_url: str, tmp_path: Path) -> Iterator[StartWorker]:
    """Start ``task-dispatcher worker`` processes; each is ready (consuming) when returned."""
    started: list[Worker] = []

    def start(
        name: str,
        *sys_types: str,
        concurrency: int = 2,
        factory: str | None = PROBE,
        broker: str | None = None,
        visibility_timeout: float | None = None,
        check_broker: bool = False,
    ) -> Worker:
        url = broker or broker_url
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
            "TD_TEST_WORKER": name,
        }
        env.pop("TASK_DISPATCHER_BROKER", None)
        env.pop("TASK_DISPATCHER_FACTORY", None)
        command = [sys.executable, "-m", "scheduler", "worker", "--broker", url]
        for sys_type in sys_types:
            command += ["--sys-type", sys_type]
        command += ["--hostname", name, "--concurrency", str(concurrency)]
        command += ["--loglevel", "INFO"]
        if factory is not None:
            command += ["--factory", factory]
        if not check_broker:
            # The shared test Redis keeps no append-only file.
            command += ["--allow-non-durable-broker"]
        if visibility_timeout is not None:
            command += ["--visibility-timeout", str(visibility_timeout)]
        log_path = tmp_path / f"worker-{name}-{len(started)}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        worker = Worker(name, process, log_path, log_file)
        started.append(worker)
        client = redis.Redis.from_url(url)

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"worker {name} exited early:\n{worker.log()[-3000:]}")
            return bool(client.exists(f"td:worker:{name}"))

        wait_until(ready, 30, f"worker {name} to consume")
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
async def open_backend(broker_url: str) -> AsyncIterator[OpenBackend]:
    """Open :class:`CeleryRunBackend` instances on the test's broker; closed at the end."""
    opened: list[CeleryRunBackend] = []

    async def make(inbox: FileInbox, **options: Any) -> CeleryRunBackend:
        url = options.pop("broker_url", broker_url)
        options.setdefault("lost_after", 3.0)
        backend = CeleryRunBackend(url, **options)
        await backend.open(inbox)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.close(1.0)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` for this test alone with an append-only file (kept across restarts)."""
    directory = tmp_path / "aof-redis"
    directory.mkdir()
    server = RedisServer(directory, aof=True).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def fault_proxy(redis_address: tuple[str, int]) -> Iterator[FaultProxy]:
    """A loopback TCP proxy in front of the test Redis that can cut a connection on cue."""
    proxy = FaultProxy(redis_address[1], redis_address[0]).start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
async def make(broker_url: str, tmp_path: Path) -> AsyncIterator[Make]:
    """Build dispatchers on the test's broker (stopped at the end)."""
    made: list[TaskDispatcher] = []

    def build(directory: Path | None = None, **options: Any) -> TaskDispatcher:
        backend = CeleryRunBackend(
            options.pop("broker_url", broker_url),
            lost_after=options.pop("lost_after", 3.0),
            start_timeout=options.pop("start_timeout", None),
            poll_interval=options.pop("poll_interval", None),
            **{k: options.pop(k) for k in ("resend_after",) if k in options},
        )
        dispatcher = TaskDispatcher(
            directory or tmp_path / "ops", run_backend=backend, timezone="UTC", **options
        )
        made.append(dispatcher)
        return dispatcher

    yield build
    for dispatcher in made:
        await dispatcher.stop(grace_period=0)
