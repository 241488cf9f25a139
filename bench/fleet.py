"""The fleet side by side with bare Celery on the same Redis broker, in one run.

(a) task-dispatcher: N tasks of a no-op task type, all due at once, run by a ``TaskDispatcher``
with ``CeleryRunBackend`` on 2 ``task-dispatcher worker`` processes (threads pool, concurrency 4
each), each outcome saved back into the state file. The paced case (runs due at 50/s) submits
straight to the backend, since a dispatcher's first runs cannot be spread that finely.
(b) bare Celery: an ``apply_async`` loop of N no-op tasks to 2 plain Celery workers with the
same pool and concurrency (no claims, no outcomes: the floor).
Latency is from the instant the runs were due to their start on a worker (one clock: all
processes run on this machine).

The burst runs in rounds, each side taking turns, and the median round is reported with every
round's ratio: one round's ratio swings by a third on a machine shared with Redis and the
workers.

    python -m bench --fleet            # needs Redis (default redis://127.0.0.1:6379, a free db)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from scheduler.fleet.worker import make_app

__all__ = [
    "bare_app",
    "fleet_table",
    "median_round",
    "noop_factory",
    "redis_reachable",
    "run_fleet",
]

ROOT = Path(__file__).resolve().parent.parent
BROKER_ENV = "TASK_DISPATCHER_BENCH_BROKER"
BARE_QUEUE = "bench.bare"
STARTS = "bench:starts"
WORKERS = 2
CONCURRENCY = 4

bare_app = make_app(os.environ.get(BROKER_ENV) or None)


_clients: dict[str, redis.Redis] = {}


@bare_app.task(name="bench.noop", ignore_result=True)
def bare_noop(due: float) -> None:
    """The floor's task: record when it started (one pooled client, as our worker has)."""
    started = time.time()
    url = str(bare_app.conf.broker_url)
    client = _clients.get(url) or _clients.setdefault(url, redis.Redis.from_url(url))
    client.rpush(STARTS, f"{due},{started}")


class NoopManager:
    """Our no-op task manager."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def run(self) -> None:
        """Do nothing."""


def noop_factory(**kwargs: Any) -> NoopManager:
    """The workers' ``--factory bench.fleet:noop_factory``."""
    return NoopManager(**kwargs)


def redis_reachable(host: str = "127.0.0.1", port: int = 6379) -> bool:
    """Whether a Redis answers there."""
    try:
        return bool(redis.Redis(host, port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@contextmanager
def _database(host: str, port: int) -> Iterator[str]:
    """A Redis database of our own (claimed in database 0 like the tests do)."""
    admin = redis.Redis(host, port)
    token = uuid.uuid4().hex
    for number in range(15, 0, -1):
        if admin.set(f"td-test:db:{number}", token, nx=True, ex=3600):
            break
    else:
        raise RuntimeError("no free Redis database for the benchmark")
    db = redis.Redis(host, port, db=number)
    db.flushdb()
    try:
        yield f"redis://{host}:{port}/{number}"
    finally:
        db.flushdb()
        admin.delete(f"td-test:db:{number}")


def _cpu_seconds(pids: list[int]) -> float | None:
    """CPU time (user + system) the processes ``pids`` used so far (None: not on Linux)."""
    total = 0.0
    try:
        for pid in pids:
            # The fields after the command name (which may hold spaces), from the 3rd on.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


@contextmanager
def _workers(commands: list[list[str]], url: str, ready: Any) -> Iterator[list[int]]:
    env = {**os.environ, BROKER_ENV: url, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for command in commands
    ]
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError("benchmark workers did not start")
            time.sleep(0.1)
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@dataclass
class FleetResult:
    """Throughput and start latencies of one side."""

    runs_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_here: float | None = None
    """CPU seconds of this process (the dispatcher, or the publisher) while the runs ran."""
    cpu_workers: float | None = None
    """CPU seconds of the worker processes while the runs ran."""


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return (
        ordered[len(ordered) // 2] * 1000,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    )


class _Inbox:
    def __init__(self, n: int) -> None:
        self.starts: dict[str, datetime] = {}
        self.finished = 0
        self.n = n
        self.done = asyncio.Event()

    async def deliver(self, event: Any) -> None:
        if event.kind.value == "started":
            self.starts[event.run_id] = event.at
        else:
            self.finished += 1
            if self.finished >= self.n:
                self.done.set()


def _our_workers(url: str) -> tuple[list[list[str]], Any]:
    client = redis.Redis.from_url(url)
    commands = [
        [
            *(sys.executable, "-m", "scheduler", "worker", "--broker", url, "--sys-type", "bench"),
            *("--concurrency", str(CONCURRENCY), "--hostname", f"bench-{i}"),
            *("--factory", "bench.fleet:noop_factory", "--loglevel", "WARNING"),
            "--allow-non-durable-broker",  # the shared Redis: same persistence for both sides
        ]
        for i in range(WORKERS)
    ]

    def ready() -> bool:
        return all(client.exists(f"td:worker:bench-{i}") for i in range(WORKERS))

    return commands, ready


async def _ours_dispatcher(url: str, n: int, root: Path) -> FleetResult:
    """N tasks due at once through a real TaskDispatcher (ledger, lanes, durable outcomes)."""
    from scheduler import CeleryRunBackend, RunFailed, RunSucceeded, TaskDispatcher

    commands, ready = _our_workers(url)
    with _workers(commands, url, ready) as pids:
        dispatcher = TaskDispatcher(
            root / "fleet-bench",
            run_backend=CeleryRunBackend(url),
            timezone="UTC",
            max_concurrent_runs=100,
        )
        ids = await dispatcher.add_tasks(
            {
                "sys_type": "bench",
                "task_type": "noop",
                "account_id": f"account-{i}",
                "interval": 3600,
            }
            for i in range(n)
        )
        planned = {t: dispatcher.get_task(t).next_execution_time for t in ids}
        # Counted by a listener, not by polling list_tasks(): a copy of 1,000 records five
        # times a second took CPU from the workers on a small machine.
        outcomes = 0
        finished_at = 0.0
        all_done = asyncio.Event()

        def count(_: object) -> None:
            nonlocal outcomes, finished_at
            outcomes += 1
            if outcomes >= n:
                finished_at = time.perf_counter()
                all_done.set()

        dispatcher.add_listener(count, [RunSucceeded, RunFailed])
        workers_before = _cpu_seconds(pids)
        here_before = time.process_time()
        began = time.perf_counter()
        await dispatcher.start()
        try:
            await asyncio.wait_for(all_done.wait(), 300)
        except TimeoutError:
            raise RuntimeError("fleet runs did not all finish") from None
        elapsed = finished_at - began
        cpu_here = time.process_time() - here_before
        workers_after = _cpu_seconds(pids)
        records = {r.task_id: r for r in dispatcher.list_tasks()}
        await dispatcher.stop()
    samples = []
    for task_id, due in planned.items():
        started = records[task_id].last_execution_time
        if due is not None and started is not None:
            samples.append((started - due).total_seconds())
    p50, p99 = _percentiles(samples)
    return FleetResult(n / elapsed, p50, p99, cpu_here, _delta(workers_before, workers_after))


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def _ours(url: str, n: int, pace: float) -> FleetResult:
    """N runs submitted straight to the backend at their due times (the transport alone)."""
    from scheduler.fleet.backend import CeleryRunBackend
    from tasks.runs import RunRequest

    commands, ready = _our_workers(url)
    with _workers(commands, url, ready):
        inbox = _Inbox(n)
        backend = CeleryRunBackend(url)
        await backend.open(inbox)
        first = datetime.now(UTC)
        due = {f"bench-{i}": first + timedelta(seconds=i * pace) for i in range(n)}
        began = time.perf_counter()

        async def submit(i: int) -> None:
            scheduled = due[f"bench-{i}"]
            await asyncio.sleep(max(0.0, (scheduled - datetime.now(UTC)).total_seconds()))
            await backend.submit(
                RunRequest(
                    run_id=f"bench-{i}",
                    task_id=f"task-{i}",
                    account_id=f"account-{i}",
                    sys_type="bench",
                    task_type="noop",
                    kwargs={"task_id": f"task-{i}", "task_type": "noop"},
                    scheduled_at=scheduled,
                    submitted_at=datetime.now(UTC),
                )
            )

        await asyncio.gather(*(submit(i) for i in range(n)))
        await asyncio.wait_for(inbox.done.wait(), 300)
        elapsed = time.perf_counter() - began
        await backend.close(1)
    p50, p99 = _percentiles([(at - due[run]).total_seconds() for run, at in inbox.starts.items()])
    return FleetResult(n / elapsed, p50, p99)


def _bare(url: str, n: int, pace: float) -> FleetResult:
    client = redis.Redis.from_url(url)
    commands = [
        [
            *(sys.executable, "-m", "celery", "-A", "bench.fleet:bare_app", "worker"),
            *("-Q", BARE_QUEUE, "-P", "threads", "-c", str(CONCURRENCY)),
            *("-n", f"bare-{i}@%h", "--without-mingle", "--loglevel", "WARNING"),
        ]
        for i in range(WORKERS)
    ]
    bare_app.conf.broker_url = url

    def ready() -> bool:
        replies = bare_app.control.ping(timeout=0.5) or []
        return len(replies) >= WORKERS

    with _workers(commands, url, ready) as pids:
        workers_before = _cpu_seconds(pids)
        here_before = time.process_time()
        first = time.time()
        began = time.perf_counter()
        for i in range(n):
            due = first + i * pace
            time.sleep(max(0.0, due - time.time()))
            bare_noop.apply_async(args=[due], queue=BARE_QUEUE)
        deadline = time.monotonic() + 300
        while client.llen(STARTS) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("bare Celery runs did not all start")
            time.sleep(0.01)
        elapsed = time.perf_counter() - began
        cpu_here = time.process_time() - here_before
        workers_after = _cpu_seconds(pids)
    samples = []
    raw_starts: list[bytes] = client.lrange(STARTS, 0, -1)  # type: ignore[assignment]
    for raw in raw_starts:
        planned, started = (float(x) for x in raw.decode().split(","))
        samples.append(started - planned)
    p50, p99 = _percentiles(samples)
    return FleetResult(n / elapsed, p50, p99, cpu_here, _delta(workers_before, workers_after))


ROUNDS = 5
"""Burst rounds per side, alternating: on a machine shared with Redis and the workers, one
round's ratio swings by a third; the median of several is the figure."""


def run_fleet(
    n: int = 1_000, host: str = "127.0.0.1", port: int = 6379, rounds: int = ROUNDS
) -> str:
    """Both sides on one broker: N due at once, ``rounds`` times each side taking turns (the
    median round reported, with every round's ratio), then N/5 due at 50/s; a Markdown
    table."""
    paced_n, pace = max(1, n // 5), 0.02
    bursts: list[tuple[FleetResult, FleetResult]] = []
    with _database(host, port) as url, tempfile.TemporaryDirectory() as root:
        client = redis.Redis.from_url(url)
        for number in range(rounds):
            ours = asyncio.run(_ours_dispatcher(url, n, Path(root) / f"round-{number}"))
            client.flushdb()
            bare = _bare(url, n, 0.0)
            client.flushdb()
            bursts.append((ours, bare))
        ours_paced = asyncio.run(_ours(url, paced_n, pace))
        client.flushdb()
        bare_paced = _bare(url, paced_n, pace)
        client.flushdb()
    return fleet_table(n, bursts, (ours_paced, bare_paced), pace)


def median_round(
    bursts: list[tuple[FleetResult, FleetResult]],
) -> tuple[FleetResult, FleetResult, list[float]]:
    """The round whose throughput ratio is the median (the lower middle one of an even
    count), and every round's ratio in the order they ran."""
    ratios = [ours.runs_per_s / bare.runs_per_s for ours, bare in bursts]
    middle = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
    ours, bare = bursts[middle]
    return ours, bare, ratios


def fleet_table(
    n: int,
    bursts: list[tuple[FleetResult, FleetResult]],
    paced: tuple[FleetResult, FleetResult],
    pace: float,
) -> str:
    """The fleet's Markdown table: the median burst round, each round's ratio, the paced
    case."""
    ours, bare, ratios = median_round(bursts)
    paced_n = max(1, n // 5)
    rows = [
        "| N | measurement | (a) task-dispatcher fleet | (b) bare Celery | a/b |",
        "|---:|---|---:|---:|---:|",
        f"| {n:,} | all due at once: runs/s (median of {len(bursts)} rounds) | "
        f"{ours.runs_per_s:,.0f}/s | {bare.runs_per_s:,.0f}/s | "
        f"{ours.runs_per_s / bare.runs_per_s:.2f}x |",
        f"| {n:,} | all due at once: a/b of each round, in turn | "
        f"{', '.join(f'{ratio:.2f}x' for ratio in ratios)} | | "
        f"{min(ratios):.2f}x to {max(ratios):.2f}x |",
    ]
    for name, x, y in (
        ("CPU per 1,000 runs, dispatcher (a) / publisher (b)", ours.cpu_here, bare.cpu_here),
        ("CPU per 1,000 runs, workers", ours.cpu_workers, bare.cpu_workers),
    ):
        if x is not None and y is not None and y > 0:
            x, y = x * 1000 / n, y * 1000 / n
            rows.append(
                f"| {n:,} | all due at once: {name} | {x:.2f} s | {y:.2f} s | {x / y:.2f}x |"
            )
    ours_paced, bare_paced = paced
    for label, count, a, b in (
        ("all due at once", n, ours, bare),
        (f"due at {1 / pace:.0f}/s", paced_n, ours_paced, bare_paced),
    ):
        for name, x, y in (("p50", a.p50_ms, b.p50_ms), ("p99", a.p99_ms, b.p99_ms)):
            rows.append(
                f"| {count:,} | {label}: due -> start {name} | {x:.1f} ms | {y:.1f} ms | "
                f"{x / y:.2f}x |"
            )
    return "\n".join(rows)
