"""The PostgreSQL case: our store side by side with APScheduler's SQLAlchemyJobStore, one server.

(a) ``TaskDispatcher(store="postgresql://...")``, (b) ``AsyncIOScheduler`` with a
``SQLAlchemyJobStore`` (``postgresql+psycopg://``), each in a fresh database of the same
PostgreSQL server, created for the run and dropped after it. Same tasks as the file case
(interval jobs, one hour). Each durable change is one committed transaction on both sides.

    python -m bench --postgres [URL]            # N = 10,000 (URL: a role that may create
                                                # databases; default the local server)
    python -m bench --postgres --large          # and N = 100,000 (not the takeover step)
    python -m bench --postgres --sizes 20 --steps mutations cold_start
    python -m bench --postgres --steps takeover # only the takeover time

Steps: ``mutations`` (pause/resume and ``add_task``, each change awaited and durable, on a
store of N tasks built in bulk; each change of ours next to the same change of the peer, the
two taking turns to go first), ``cold_start`` (a started dispatcher with every task loaded
and its manager created, against a started scheduler holding N jobs, every job loaded), and
``takeover`` (``task-dispatcher --store URL run`` processes: a leader SIGKILLed with a standby
running, :data:`KILLS` times, lease :data:`TAKEOVER_LEASE`; from the kill to the standby
serving ``"role": "leader"`` on its health endpoint, and to its ``leading`` log line).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from psycopg import sql

from bench.run import (
    COUNTER,
    MUTATIONS,
    ZONE,
    Row,
    Started,
    _cell,
    _percentiles,
    _ratio,
    building_alone,
    factory,
    in_fresh_process,
    peer_add,
    peer_load,
    settle,
    task,
    this_process,
)
from jobstores.postgres import PostgresState, connector
from scheduler import TaskDispatcher

__all__ = [
    "DEFAULT_URL",
    "STEPS",
    "fresh_database",
    "main",
    "noop_factory",
    "peer_url",
    "report",
    "run_postgres",
    "server_version",
    "store_url",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
STEPS = ("mutations", "cold_start", "takeover")
LARGE_STEPS = ("mutations", "cold_start")
"""What runs at N = 100,000 (``--large``): the takeover step runs at the other sizes."""
KILLS = 20
TAKEOVER_LEASE = 2.0


def noop_factory(**kwargs: Any) -> Any:
    """The ``run`` processes' ``--factory bench.postgres:noop_factory``."""
    return factory(**kwargs)


# ---------------------------------------------------------------------- databases


@contextmanager
def fresh_database(admin_url: str, label: str) -> Iterator[str]:
    """A new, empty database on ``admin_url``'s server (its libpq URL), dropped after."""
    name = f"td_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def store_url(dsn: str, **parameters: Any) -> str:
    """Our ``store=`` URL of a libpq connection string (with ``cluster``/``lease``)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = quote(str(info.get("user") or "postgres"), safe="")
    password = f":{quote(str(info['password']), safe='')}" if info.get("password") else ""
    host = info.get("host") or "127.0.0.1"
    port = info.get("port") or 5432
    query = "&".join(f"{key}={value}" for key, value in parameters.items())
    return f"postgresql://{user}{password}@{host}:{port}/{info['dbname']}" + (
        f"?{query}" if query else ""
    )


def peer_url(dsn: str) -> str:
    """SQLAlchemy's URL of the same database (the psycopg 3 dialect)."""
    return store_url(dsn).replace("postgresql://", "postgresql+psycopg://", 1)


# ---------------------------------------------------------------------- set-ups


def ours(directory: Path, url: str) -> TaskDispatcher:
    return TaskDispatcher(
        directory,
        task_manager_factory=factory,
        timezone=ZONE,
        max_concurrent_runs=100,
        store=url,
    )


def peer(url: str) -> AsyncIOScheduler:
    return AsyncIOScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=url)},
        timezone="UTC",
        job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
    )


async def build(n: int, our_url: str, their_url: str, root: Path) -> None:
    """Both stores holding N tasks, each written in bulk (the build is not measured)."""
    dispatcher = ours(root / "a-build", our_url)
    await dispatcher.add_tasks(task(i) for i in range(n))
    dispatcher.close()
    scheduler = peer(their_url)
    scheduler.start(paused=True)
    peer_load(scheduler, n)
    scheduler.shutdown(wait=False)
    await settle()


# ---------------------------------------------------------------------- measurements


async def mutations(n: int, our_url: str, their_url: str, root: Path) -> list[Row]:
    """Each change of ours next to the same change of the peer, the sides taking turns to
    go first: all see the same load, however the machine's load drifts during the run.

    The peer's ``add_job`` blocks the event loop for its whole commit; ours is awaited off
    it. The last row is the peer's ``add_job`` awaited off the loop too
    (``asyncio.to_thread``), as a host that keeps its loop free would call it."""
    pause50 = Row("durable pause/resume of one task: p50", n, unit="ms")
    pause99 = Row("durable pause/resume of one task: p99", n, unit="ms")
    add50 = Row("one awaited add_task, sequential, into the loaded store: p50", n, unit="ms")
    add99 = Row("one awaited add_task, sequential, into the loaded store: p99", n, unit="ms")
    off50 = Row("  the same, the peer's add_job off the event loop (to_thread): p50", n, unit="ms")

    dispatcher = ours(root / "a-mutations", our_url)
    scheduler = peer(their_url)
    scheduler.start(paused=True)
    pauses: dict[str, list[float]] = {"ours": [], "sqlalchemy": []}
    adds: dict[str, list[float]] = {"ours": [], "sqlalchemy": [], "off the loop": []}

    async def ours_change(call: Any, task_id: str) -> None:
        call(task_id)

    async def ours_add(i: int) -> None:
        await dispatcher.add_task(**task(i))

    async def their_change(call: Any, task_id: str) -> None:
        call(task_id)

    async def their_add(i: int) -> None:
        peer_add(scheduler, i)

    async def their_add_off_the_loop(i: int) -> None:
        await asyncio.to_thread(peer_add, scheduler, i)

    async def turn(samples: dict[str, list[float]], first: int, *sides: tuple[str, Any]) -> None:
        for side, action in [*sides[first:], *sides[:first]]:
            start = time.perf_counter()
            await action()
            samples[side].append(time.perf_counter() - start)

    for i in range(MUTATIONS // 2):
        task_id = f"task-{i % n:06d}"  # each paused and resumed (N may be small)
        for k, (call, their_call) in enumerate(
            [
                (dispatcher.pause_task, scheduler.pause_job),
                (dispatcher.resume_task, scheduler.resume_job),
            ]
        ):
            await turn(
                pauses,
                (i + k) % 2,
                ("ours", functools.partial(ours_change, call, task_id)),
                ("sqlalchemy", functools.partial(their_change, their_call, task_id)),
            )
    added = [f"task-{n + i:06d}" for i in range(MUTATIONS // 2)]
    for i in range(MUTATIONS // 2):
        await turn(
            adds,
            i % 3,
            ("ours", functools.partial(ours_add, n + i)),
            ("sqlalchemy", functools.partial(their_add, n + i)),
            ("off the loop", functools.partial(their_add_off_the_loop, n + MUTATIONS + i)),
        )
    for i in range(MUTATIONS // 2):  # back to N tasks on both sides
        dispatcher.remove_task(added[i])
        scheduler.remove_job(added[i])
        scheduler.remove_job(f"task-{n + MUTATIONS + i:06d}")
    dispatcher.close()
    scheduler.shutdown(wait=False)
    for side in ("ours", "sqlalchemy"):
        pause50.values[side], pause99.values[side] = _percentiles(pauses[side])
        add50.values[side], add99.values[side] = _percentiles(adds[side])
    off50.values["ours"] = add50.values["ours"]
    off50.values["sqlalchemy"] = _percentiles(adds["off the loop"])[0]
    return [pause50, pause99, add50, add99, off50]


async def cold_start(n: int, our_url: str, their_url: str, root: Path) -> list[Row]:
    """Each side started on its store of N tasks in a fresh process (see
    :func:`bench.run.in_fresh_process`), one after the other."""
    row = Row("cold start on a store of N tasks", n)
    for side, url in (("ours", our_url), ("sqlalchemy", their_url)):
        seconds, row.started[side] = await asyncio.to_thread(
            in_fresh_process, cold_start_alone, side, n, url, str(root)
        )
        row.values[side] = seconds
    state = PostgresState(connector(our_url))
    try:
        stored = state.load(defer_tasks=True)
    finally:
        state.close()
    sealed = None if stored is None else stored.sealed_tasks
    assert sealed is not None, "every task of the bulk build is sealed"
    return [row, await building_alone(sealed, n, row)]


def cold_start_alone(side: str, n: int, url: str, root: str) -> tuple[float, Started]:
    """Seconds of one side's cold start (``ours`` or ``sqlalchemy``, its store at ``url``) in
    this process, from its constructor until every task is listed, and the process as the
    timing began."""
    return asyncio.run(_cold_start(side, n, url, Path(root)))


async def _cold_start(side: str, n: int, url: str, root: Path) -> tuple[float, Started]:
    before = this_process()
    if side == "ours":
        start = time.perf_counter()
        dispatcher = ours(root / "a-cold", url)
        await dispatcher.start()
        assert len(dispatcher.scheduler.get_jobs()) == n
        seconds = time.perf_counter() - start
        await dispatcher.stop()
        return seconds, before
    start = time.perf_counter()
    scheduler = peer(url)
    scheduler.start(paused=True)
    assert len(scheduler.get_jobs()) == n
    seconds = time.perf_counter() - start
    scheduler.shutdown(wait=False)
    return seconds, before


# ---------------------------------------------------------------------- takeover


class Instance:
    """One ``task-dispatcher --store URL run`` process with a directory of its own; its log
    lines are read by a thread and stamped on arrival."""

    def __init__(self, directory: Path, url: str) -> None:
        self.directory = directory
        self.socket = directory / "control.sock"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TASK_DISPATCHER_STORE": url}
        env.pop("TASK_DISPATCHER_TOKEN", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scheduler",
                "--dir",
                str(directory),
                "--factory",
                "bench.postgres:noop_factory",
                "run",
                "--no-live",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line))

    def logged(self, text: str, after: float = 0.0) -> float | None:
        """When a line holding ``text`` arrived (at or after ``after``), or None."""
        return next((at for at, line in list(self.lines) if text in line and at >= after), None)

    def role(self) -> str | None:
        """The role its health endpoint reports, or None while nothing answers."""
        if not self.socket.exists():
            return None
        request = b"GET /api/v1/health HTTP/1.0\r\nHost: localhost\r\n\r\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(2)
                client.connect(str(self.socket))
                client.sendall(request)
                answer = b"".join(iter(lambda: client.recv(65536), b""))
        except OSError:
            return None
        head, _, body = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            return None
        role: str | None = json.loads(body).get("role")
        return role

    def wait_role(self, role: str, timeout: float) -> float:
        """Poll the health endpoint until it reports ``role``: that instant (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = "".join(line for _, line in self.lines[-20:])
                raise RuntimeError(f"task-dispatcher run exited:\n{log}")
            if self.role() == role:
                return time.monotonic()
            time.sleep(0.01)
        raise TimeoutError(f"{self.directory.name}: not {role} within {timeout:.0f} s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        if self.process.stderr is not None:
            self._reader.join(5)
            self.process.stderr.close()


async def seed_ran(n: int, url: str, root: Path) -> None:
    """N tasks in the store, each run once (so none is due while the processes take over)."""
    dispatcher = ours(root / "seed", url)
    await dispatcher.add_tasks(task(i) for i in range(n))
    COUNTER.reset(n)
    await dispatcher.start()
    await asyncio.wait_for(COUNTER.done.wait(), 600)
    await dispatcher.stop()


def takeover(n: int, admin_url: str, root: Path, kills: int = KILLS) -> list[Row]:
    """SIGKILL the leader ``kills`` times, a standby running each time."""
    serving50 = Row(f"takeover, SIGKILL to serving as leader (lease {TAKEOVER_LEASE:g} s): p50", n)
    serving99 = Row(f"takeover, SIGKILL to serving as leader (lease {TAKEOVER_LEASE:g} s): p99", n)
    logged50 = Row("  SIGKILL to the standby's 'leading' log line: p50", n)
    logged99 = Row("  SIGKILL to the standby's 'leading' log line: p99", n)
    with fresh_database(admin_url, "takeover") as dsn:
        url = store_url(dsn, lease=f"{TAKEOVER_LEASE:g}")
        asyncio.run(seed_ran(n, url, root))
        budget = 60 + n / 1000
        started: list[Instance] = []
        try:
            leader = Instance(root / "i0", url)
            started.append(leader)
            leader.wait_role("leader", budget)
            serving: list[float] = []
            logged: list[float] = []
            for k in range(1, kills + 1):
                standby = Instance(root / f"i{k}", url)
                started.append(standby)
                standby.wait_role("standby", budget)
                leader.kill()
                killed = time.monotonic()
                serving.append(standby.wait_role("leader", budget) - killed)
                line = standby.logged("leading cluster", after=killed)
                if line is not None:
                    logged.append(line - killed)
                leader = standby
                print(f"    takeover {k}/{kills}: {serving[-1]:.2f} s", flush=True)
        finally:
            for instance in started:
                instance.kill()
    serving50.values["ours"], serving99.values["ours"] = (v / 1000 for v in _percentiles(serving))
    if logged:
        logged50.values["ours"], logged99.values["ours"] = (v / 1000 for v in _percentiles(logged))
    return [serving50, serving99, logged50, logged99]


# ---------------------------------------------------------------------- the run


async def _measure(n: int, admin_url: str, steps: list[str], root: Path) -> list[Row]:
    rows: list[Row] = []
    with (
        fresh_database(admin_url, "ours") as ours_dsn,
        fresh_database(admin_url, "sqlalchemy") as peer_dsn,
    ):
        our_url, their_url = store_url(ours_dsn), peer_url(peer_dsn)
        await build(n, our_url, their_url, root)
        print(f"  PostgreSQL N={n:,}: stores built", flush=True)
        for step in steps:
            rows.extend(await globals()[step](n, our_url, their_url, root))
            await settle()
            print(f"  PostgreSQL N={n:,}: {step} done", flush=True)
    return rows


def run_postgres(
    admin_url: str, sizes: list[int], large: list[int], only: list[str] | None = None
) -> list[Row]:
    """Every step asked for at each size (:data:`LARGE_STEPS` at the ``large`` ones)."""
    rows: list[Row] = []
    for n in [*sizes, *large]:
        every = STEPS if n in sizes else LARGE_STEPS
        steps = [step for step in every if only is None or step in only]
        with tempfile.TemporaryDirectory(prefix="bench-pg-") as name:
            root = Path(name)
            measured = [step for step in steps if step != "takeover"]
            if measured:
                rows.extend(asyncio.run(_measure(n, admin_url, measured, root)))
            if "takeover" in steps:
                rows.extend(takeover(n, admin_url, root))
                print(f"  PostgreSQL N={n:,}: takeover done", flush=True)
    return rows


def report(rows: list[Row]) -> str:
    lines = [
        "| N | measurement | (a) ours on PostgreSQL | (b) SQLAlchemyJobStore on PostgreSQL | a/b |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        a, b = row.values.get("ours"), row.values.get("sqlalchemy")
        lines.append(
            f"| {row.n:,} | {row.metric} | {_cell(a, row.unit)} | {_cell(b, row.unit)} | "
            f"{_ratio(a, b)} |"
        )
    return "\n".join(lines)


def server_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, connect_timeout=5) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench --postgres",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=DEFAULT_URL,
        required=True,
        metavar="URL",
        help="the server (a role that may create databases; default %(const)s)",
    )
    parser.add_argument("--large", action="store_true", help="also N = 100,000")
    parser.add_argument("--sizes", type=int, nargs="*", help="explicit N values")
    parser.add_argument(
        "--steps", nargs="*", choices=STEPS, help="only these measurements (and no others)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    sizes = args.sizes or [10_000]
    large = [100_000] if args.large and not args.sizes else []
    started = time.perf_counter()
    rows = run_postgres(args.postgres, sizes, large, args.steps)
    print()
    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{platform.processor() or platform.platform()}, {os.cpu_count()} cores; "
        f"{server_version(args.postgres)}; {time.perf_counter() - started:.0f} s in all"
    )
    print(report(rows))
