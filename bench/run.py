"""task-dispatcher side by side with APScheduler 3's own job stores, in one process run (each
side's cold start in a fresh process of its own).

(a) TaskDispatcher with its JSON job store, (b) AsyncIOScheduler + SQLAlchemyJobStore on a
SQLite file (the durable peer), (c) AsyncIOScheduler + MemoryJobStore (no durability: the
floor). Same no-op async task everywhere. Ratios are what count; these machines are noisy.

    python -m bench                 # N = 1,000 and 10,000; 100,000 for per-change, cold start
                                    # and memory (the SQLite peer's table loaded in one go)
    python -m bench --large         # every measurement at 100,000 too
    python -m bench --sizes 1000 100000 --steps add_one_by_one mutations
                                    # only some measurements (add_one_by_one builds the
                                    # stores the others use; without it they are built
                                    # in bulk first)
    python -m bench --history-only  # only the run history case (bench/history.py)
    python -m bench --fleet-only    # only the fleet against bare Celery (needs Redis)
    python -m bench --postgres [URL]
                                    # only the PostgreSQL case: our store against
                                    # SQLAlchemyJobStore on one server (bench/postgres.py)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.job import Job
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bench import history
from jobstores.format import decode_document
from jobstores.journal import JournalStorage
from jobstores.loading import STATE_FILENAME, records_from_json
from scheduler import TaskDispatcher
from tasks.model import TaskRecord

ACCOUNTS = 100
ZONE = "UTC"
"""The dispatcher's zone in every set-up."""
MUTATIONS = 200


class Counter:
    """Counts runs; ``done`` is set when ``target`` is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()

    def reset(self, target: int) -> None:
        self.count, self.target = 0, target
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()


COUNTER = Counter()


async def noop() -> None:
    """The peers' job function (importable, so SQLAlchemyJobStore can pickle a reference)."""
    COUNTER.hit()


class NoopManager:
    """Our task manager: one shared instance, so manager memory is not counted."""

    async def run(self) -> None:
        COUNTER.hit()


MANAGER = NoopManager()


def factory(**kwargs: Any) -> NoopManager:
    return MANAGER


def task(i: int, accounts: int = ACCOUNTS) -> dict[str, Any]:
    return {
        "sys_type": "mac_intel",
        "task_type": "xhs_type",
        "xhs_account_id": f"account_{i % accounts}",
        "xhs_account_name": f"Account {i % accounts}",
        "user_query": "start operating the account",
        "task_id": f"task-{i:06d}",
        "interval": 3600,
    }


# ---------------------------------------------------------------------- set-ups


def ours(directory: Path) -> TaskDispatcher:
    return TaskDispatcher(
        directory, task_manager_factory=factory, timezone=ZONE, max_concurrent_runs=100
    )


def peer(kind: str, directory: Path) -> AsyncIOScheduler:
    store = (
        SQLAlchemyJobStore(url=f"sqlite:///{directory / 'jobs.sqlite'}")
        if kind == "sqlalchemy"
        else MemoryJobStore()
    )
    return AsyncIOScheduler(
        jobstores={"default": store},
        timezone=UTC,
        job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
    )


def peer_load(scheduler: AsyncIOScheduler, n: int) -> None:
    """Fill the started SQLite peer with N jobs in one transaction (what N ``add_job`` calls
    would store), as a user would import a large table."""
    import pickle

    template = peer("memory", Path("."))
    template.start(paused=True)
    for i in range(n):
        peer_add(template, i)
    store = scheduler._lookup_jobstore("default")
    rows = [
        {
            "id": job.id,
            "next_run_time": job.next_run_time.timestamp() if job.next_run_time else None,
            "job_state": pickle.dumps(job.__getstate__(), store.pickle_protocol),
        }
        for job in template.get_jobs()
    ]
    template.shutdown(wait=False)
    with store.engine.begin() as connection:
        connection.execute(store.jobs_t.insert(), rows)


def peer_add(scheduler: AsyncIOScheduler, i: int, next_run_time: datetime | None = None) -> None:
    options: dict[str, Any] = {} if next_run_time is None else {"next_run_time": next_run_time}
    scheduler.add_job(noop, "interval", seconds=3600, id=f"task-{i:06d}", **options)


# ---------------------------------------------------------------------- measurements


@dataclass
class Row:
    metric: str
    n: int
    values: dict[str, float | None] = field(default_factory=dict)
    unit: str = "s"
    started: dict[str, Started] = field(default_factory=dict)
    """Where each side's timing began, for a measurement timed in a process of its own."""


@dataclass(frozen=True)
class Started:
    """The process a measurement was timed in, as the timing began."""

    pid: int
    leftovers: int
    """Tasks and APScheduler jobs alive in that process (none: nothing built before)."""


def in_fresh_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a new Python process (spawned: nothing in it but its imports).

    A cold start timed there is what a host starting up sees, not a process still holding
    what the benchmark built before (the collector walks every object alive, and a peer's
    shutdown frees its jobs on a later turn of the loop) or the other side's start.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def this_process() -> Started:
    """This process, with the count of its tasks and jobs alive (after a collection)."""
    gc.collect()
    alive = sum(1 for item in gc.get_objects() if isinstance(item, TaskRecord | Job))
    return Started(os.getpid(), alive)


async def timed(action: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await action()
    return time.perf_counter() - start


async def add_one_by_one(n: int, root: Path) -> list[Row]:
    sequential = Row("add N one by one, sequential (total)", n)
    concurrent = Row("add N one by one, concurrent callers (total)", n)
    bulk = Row("add N through the bulk path (total)", n)

    async def ours_sequential() -> None:
        dispatcher = ours(root / "a-seq")
        for i in range(n):
            await dispatcher.add_task(**task(i))
        dispatcher.close()

    async def ours_concurrent() -> None:
        dispatcher = ours(root / "a-con")
        await asyncio.gather(*(dispatcher.add_task(**task(i)) for i in range(n)))
        dispatcher.close()

    async def ours_bulk() -> None:
        dispatcher = ours(root / "a-bulk")
        await dispatcher.add_tasks(task(i) for i in range(n))
        dispatcher.close()

    sequential.values["ours"] = await timed(ours_sequential) if n <= 10_000 else None
    concurrent.values["ours"] = await timed(ours_concurrent) if n <= 10_000 else None
    bulk.values["ours"] = await timed(ours_bulk)
    for kind in ("sqlalchemy", "memory"):
        scheduler = peer(kind, _fresh(root / f"{kind}-add"))
        scheduler.start(paused=True)

        async def add_all(scheduler: AsyncIOScheduler = scheduler) -> None:
            for i in range(n):
                peer_add(scheduler, i)

        seconds = await timed(add_all) if kind == "memory" or n <= 10_000 else None
        if seconds is None:
            peer_load(scheduler, n)
        sequential.values[kind] = seconds
        concurrent.values[kind] = seconds
        scheduler.shutdown(wait=False)
    return [sequential, concurrent, bulk]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000


async def pause_resume_add(dispatcher: TaskDispatcher, n: int) -> tuple[list[float], list[float]]:
    """Seconds of each durable pause and resume of the first tasks of a loaded store of ``n``
    tasks, and of each sequential ``add_task`` after them (the added tasks are removed again,
    leaving ``n``)."""
    pauses = []
    for i in range(MUTATIONS // 2):
        task_id = f"task-{i % n:06d}"  # each paused and resumed (N may be small)
        for call in (dispatcher.pause_task, dispatcher.resume_task):
            start = time.perf_counter()
            call(task_id)
            pauses.append(time.perf_counter() - start)
    adds = []
    for i in range(MUTATIONS // 2):
        start = time.perf_counter()
        await dispatcher.add_task(**task(n + i))
        adds.append(time.perf_counter() - start)
    for i in range(MUTATIONS // 2):  # back to N tasks
        dispatcher.remove_task(f"task-{n + i:06d}")
    return pauses, adds


async def mutations(n: int, root: Path) -> list[Row]:
    p50 = Row("pause/resume of one task: p50", n, unit="ms")
    p99 = Row("pause/resume of one task: p99", n, unit="ms")
    add50 = Row("one awaited add_task into the loaded store: p50", n, unit="ms")
    add99 = Row("one awaited add_task into the loaded store: p99", n, unit="ms")
    other50 = Row("remove / reorder of one task (ours): p50", n, unit="ms")
    other99 = Row("remove / reorder of one task (ours): p99", n, unit="ms")
    one50 = Row("  the same, all N tasks in one account: p50", n, unit="ms")
    one99 = Row("  the same, all N tasks in one account: p99", n, unit="ms")
    percentiles = _percentiles

    async def remove_reorder(dispatcher: TaskDispatcher, accounts: int) -> list[float]:
        await dispatcher.add_tasks(task(n + i, accounts) for i in range(MUTATIONS // 4))
        samples = []
        for i in range(MUTATIONS // 4):
            start = time.perf_counter()
            dispatcher.remove_task(f"task-{n + i:06d}")
            samples.append(time.perf_counter() - start)
            start = time.perf_counter()
            dispatcher.reorder_task(f"task-{i:06d}", 0)
            samples.append(time.perf_counter() - start)
        return samples

    dispatcher = ours(root / "a-bulk")
    pauses, adds = await pause_resume_add(dispatcher, n)
    p50.values["ours"], p99.values["ours"] = percentiles(pauses)
    add50.values["ours"], add99.values["ours"] = percentiles(adds)
    other50.values["ours"], other99.values["ours"] = percentiles(
        await remove_reorder(dispatcher, ACCOUNTS)
    )
    dispatcher.close()
    # One account of N tasks: what a reorder or removal costs must not grow with it.
    dispatcher = ours(root / "a-one-account")
    await dispatcher.add_tasks(task(i, 1) for i in range(n))
    one50.values["ours"], one99.values["ours"] = percentiles(await remove_reorder(dispatcher, 1))
    dispatcher.close()
    for kind in ("sqlalchemy", "memory"):
        directory = root / f"{kind}-add"
        scheduler = peer(kind, directory)
        scheduler.start(paused=True)
        if kind == "memory":
            for i in range(n):
                peer_add(scheduler, i)
        samples = []
        for i in range(MUTATIONS // 2):
            for call in (scheduler.pause_job, scheduler.resume_job):
                start = time.perf_counter()
                call(f"task-{i:06d}")
                samples.append(time.perf_counter() - start)
        p50.values[kind], p99.values[kind] = percentiles(samples)
        samples = []
        for i in range(MUTATIONS // 2):
            start = time.perf_counter()
            peer_add(scheduler, n + i)
            samples.append(time.perf_counter() - start)
        add50.values[kind], add99.values[kind] = percentiles(samples)
        for i in range(MUTATIONS // 2):
            scheduler.remove_job(f"task-{n + i:06d}")
        scheduler.shutdown(wait=False)
    return [p50, p99, add50, add99, other50, other99, one50, one99]


async def cold_start(n: int, root: Path) -> list[Row]:
    """Each side started on its store of N tasks in a fresh process (see
    :func:`in_fresh_process`), one after the other."""
    row = Row("cold start on a store of N tasks", n)
    for side in ("ours", "sqlalchemy"):
        seconds, row.started[side] = await asyncio.to_thread(
            in_fresh_process, cold_start_alone, side, n, str(root)
        )
        row.values[side] = seconds
    row.values["memory"] = None
    path = root / "a-bulk" / STATE_FILENAME
    sealed = decode_document(path.read_bytes(), path, defer_tasks=True).sealed_tasks
    assert sealed is not None, "the bulk store is written whole, with its checksum"
    return [row, await building_alone(sealed, n, row)]


async def building_alone(tasks: bytes, n: int, cold: Row) -> Row:
    """The one step of our cold start that pydantic does, timed alone in a fresh process:
    building the N records from the JSON array ``tasks`` as the loader does
    (:func:`jobstores.loading.records_from_json`), next to the peer's whole ``cold``
    start. No design that validates each record with pydantic starts faster than this."""
    row = Row("  of which pydantic building the N records, against the peer's whole start", n)
    row.values["ours"], row.started["ours"] = await asyncio.to_thread(
        in_fresh_process, build_records, tasks, n
    )
    row.values["sqlalchemy"] = cold.values["sqlalchemy"]
    return row


def build_records(tasks: bytes, n: int) -> tuple[float, Started]:
    """Seconds to build the N records of the JSON array ``tasks`` (as the loader of
    :func:`ours` does, in its zone), and the process as the timing began."""
    zone = ZoneInfo(ZONE)
    before = this_process()
    start = time.perf_counter()
    records = records_from_json(tasks, zone, {})
    seconds = time.perf_counter() - start
    assert records is not None
    assert len(records) == n
    return seconds, before


def cold_start_alone(side: str, n: int, root: str) -> tuple[float, Started]:
    """Seconds of one side's cold start (``ours`` or ``sqlalchemy``) in this process, from
    its constructor until every task is listed, and the process as the timing began."""
    return asyncio.run(_cold_start(side, n, Path(root)))


async def _cold_start(side: str, n: int, root: Path) -> tuple[float, Started]:
    before = this_process()
    if side == "ours":
        start = time.perf_counter()
        dispatcher = ours(root / "a-bulk")
        await dispatcher.start()
        assert len(dispatcher.scheduler.get_jobs()) == n
        seconds = time.perf_counter() - start
        await dispatcher.stop()
        return seconds, before
    start = time.perf_counter()
    scheduler = peer("sqlalchemy", root / "sqlalchemy-add")
    scheduler.start(paused=True)
    assert len(scheduler.get_jobs()) == n
    seconds = time.perf_counter() - start
    scheduler.shutdown(wait=False)
    return seconds, before


async def throughput(n: int, root: Path) -> list[Row]:
    seconds = Row("N runs all due at once: time until all finished", n)
    rate = Row("  runs per second", n, unit="/s")
    # The same runs, all of one account (they run one at a time, in the account's order):
    # what a run costs must not grow with the size of its account.
    one_seconds = Row("  the same, all tasks of one account", n)
    one_rate = Row("  runs per second (one account)", n, unit="/s")

    async def ours_run(accounts: int = ACCOUNTS) -> float:
        dispatcher = ours(_fresh(root / f"a-due-{accounts}"))
        await dispatcher.add_tasks(task(i, accounts) for i in range(n))
        COUNTER.reset(n)
        start = time.perf_counter()
        await dispatcher.start()
        await asyncio.wait_for(COUNTER.done.wait(), 600)
        elapsed = time.perf_counter() - start
        await dispatcher.stop()
        return elapsed

    async def peer_run(kind: str) -> float:
        scheduler = peer(kind, _fresh(root / f"{kind}-due"))
        scheduler.start(paused=True)
        now = datetime.now(UTC)
        for i in range(n):
            peer_add(scheduler, i, next_run_time=now)
        COUNTER.reset(n)
        start = time.perf_counter()
        scheduler.resume()
        await asyncio.wait_for(COUNTER.done.wait(), 600)
        elapsed = time.perf_counter() - start
        scheduler.shutdown(wait=False)
        return elapsed

    seconds.values["ours"] = await ours_run()
    seconds.values["sqlalchemy"] = await peer_run("sqlalchemy") if n <= 10_000 else None
    seconds.values["memory"] = await peer_run("memory")
    one_seconds.values["ours"] = await ours_run(accounts=1)
    one_seconds.values["sqlalchemy"] = None
    one_seconds.values["memory"] = await peer_run("memory")  # the peer has no accounts
    for total, per_second in ((seconds, rate), (one_seconds, one_rate)):
        for name, value in total.values.items():
            per_second.values[name] = None if not value else n / value
    return [seconds, rate, one_seconds, one_rate]


async def memory(n: int, root: Path) -> list[Row]:
    row = Row("memory per task (tracemalloc)", n, unit="B")
    bare = Row("  the same, ours without the lines kept for the next write", n, unit="B")

    async def measure(build: Callable[[], Awaitable[Any]]) -> float:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        keep = await build()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        if isinstance(keep, TaskDispatcher):
            # Below KEEP_LINES_BELOW tasks a snapshot written at a commit keeps each task's
            # encoded line (about 0.9 KB a task) so that the next one re-encodes only the
            # changed tasks: the same store without them.
            storage = keep._store._storage
            assert isinstance(storage, JournalStorage)
            storage._writer.forget_lines()
            gc.collect()
            bare.values["ours"] = (tracemalloc.get_traced_memory()[0] - base) / n
        tracemalloc.stop()
        if isinstance(keep, TaskDispatcher):
            await keep.stop()
        else:
            keep.shutdown(wait=False)
        return used / n

    async def ours_build() -> Any:
        dispatcher = ours(root / "a-bulk")
        assert len(dispatcher._store.table) == n
        await dispatcher.start()
        dispatcher.scheduler.pause()  # scheduled, but no run in flight while measuring
        dispatcher._store.table.touch()
        await dispatcher._store.save_async()  # steady state: saved fragments are cached
        return dispatcher

    row.values["ours"] = await measure(ours_build)
    for kind in ("sqlalchemy", "memory"):

        async def peer_build(kind: str = kind) -> Any:
            scheduler = peer(kind, _fresh(root / f"{kind}-add"))
            scheduler.start(paused=True)
            if kind == "memory":
                for i in range(n):
                    peer_add(scheduler, i)
            scheduler.listed = scheduler.get_jobs()  # what it holds once its jobs are listed
            return scheduler

        row.values[kind] = await measure(peer_build)
    bare.values.update(sqlalchemy=row.values["sqlalchemy"], memory=row.values["memory"])
    return [row, bare]


async def loop_lag(n: int, root: Path) -> list[Row]:
    """Largest event-loop delay while a save of every one of N changed tasks is in progress."""
    row = Row("event-loop lag during a save of N changed tasks (max)", n, unit="ms")
    save = Row("  that save's duration", n)
    dispatcher = ours(root / "a-bulk")
    store = dispatcher._store
    now = datetime.now(UTC)
    for record in store.table.records():
        store.update_task(record.task_id, lambda r: r.replace(updated_at=now))
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            expected = loop.time() + 0.001
            await asyncio.sleep(0.001)
            lags.append(loop.time() - expected)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    save.values["ours"] = await timed(store.save_async)
    stop.set()
    await tick
    row.values["ours"] = max(lags) * 1000
    row.values["sqlalchemy"] = row.values["memory"] = None
    save.values["sqlalchemy"] = save.values["memory"] = None
    # A compaction: the whole state written to dispatch_config.json in the background,
    # while the loop keeps making durable changes.
    compaction = Row("event-loop lag during a background compaction (max)", n, unit="ms")
    storage = store._storage
    lags.clear()
    stop.clear()
    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    store.update_task("task-000000", lambda r: r.replace(updated_at=now))
    wants = storage.wants_full_image

    def always(*, closing: bool = False) -> bool:
        return True

    storage.wants_full_image = always  # type: ignore[method-assign]
    await store.save_async()
    storage.wants_full_image = wants  # type: ignore[method-assign]
    await asyncio.to_thread(getattr(storage, "_wait_compaction", lambda: None))
    stop.set()
    await tick
    compaction.values["ours"] = max(lags) * 1000
    dispatcher.close()
    return [row, save, compaction]


def _fresh(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# ---------------------------------------------------------------------- report


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:,.0f}/s"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def report(rows: list[Row]) -> str:
    lines = [
        "| N | measurement | (a) ours | (b) SQLAlchemy+SQLite | (c) Memory | a/b | a/c |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a, b, c = (row.values.get(k) for k in ("ours", "sqlalchemy", "memory"))
        lines.append(
            f"| {row.n:,} | {row.metric} | {_cell(a, row.unit)} | {_cell(b, row.unit)} | "
            f"{_cell(c, row.unit)} | {_ratio(a, b)} | {_ratio(a, c)} |"
        )
    return "\n".join(lines)


ALL_STEPS = ("add_one_by_one", "mutations", "cold_start", "throughput", "memory", "loop_lag")
LARGE_STEPS = ("add_one_by_one", "mutations", "cold_start", "memory", "loop_lag")
"""What the default run measures at N = 100,000 (add_one_by_one builds the stores; its
one-by-one rows are skipped at that size)."""
READ_STORES = {"mutations", "cold_start", "memory", "loop_lag"}
"""The steps that read the stores add_one_by_one builds (built in bulk without it)."""


async def build_stores(n: int, root: Path) -> None:
    """The stores of N tasks the later steps read, built as ``add_one_by_one`` builds them
    (ours in bulk; the SQLite peer one job at a time up to 10,000, in one transaction
    above), for a run whose steps leave that step out."""
    dispatcher = ours(root / "a-bulk")
    await dispatcher.add_tasks(task(i) for i in range(n))
    dispatcher.close()
    scheduler = peer("sqlalchemy", _fresh(root / "sqlalchemy-add"))
    scheduler.start(paused=True)
    if n <= 10_000:
        for i in range(n):
            peer_add(scheduler, i)
    else:
        peer_load(scheduler, n)
    scheduler.shutdown(wait=False)
    await settle()


async def settle() -> None:
    """Let the loop run what the peers' shutdowns left on it: ``AsyncIOScheduler.shutdown``
    shuts down on the loop's next turn, and only then lets its jobs go (100,000 jobs held
    by the scheduler ``peer_load`` fills in memory are 400,000 objects for the collector
    to walk, and their release, inside the next timed call otherwise)."""
    await asyncio.sleep(0.1)


async def run(sizes: list[int], large: list[int], only: list[str] | None = None) -> list[Row]:
    rows: list[Row] = []
    for n in [*sizes, *large]:
        every: tuple[str, ...] = ALL_STEPS if n in sizes else LARGE_STEPS
        steps = [step for step in every if only is None or step in only]
        with tempfile.TemporaryDirectory(prefix="bench-") as name:
            root = Path(name)
            if "add_one_by_one" not in steps and set(steps) & READ_STORES:
                await build_stores(n, root)
                print(f"  N={n:,}: stores built", flush=True)
            for step in steps:
                rows.extend(await globals()[step](n, root))
                await settle()  # not inside the next step's first timed call
                print(f"  N={n:,}: {step} done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="python -m bench --postgres [URL] --help: the PostgreSQL case and its options",
    )
    parser.add_argument("--large", action="store_true", help="also N = 100,000")
    parser.add_argument("--sizes", type=int, nargs="*", help="explicit N values")
    parser.add_argument("--history-only", action="store_true", help="only the run history case")
    parser.add_argument(
        "--steps", nargs="*", choices=ALL_STEPS, help="only these measurements (and no others)"
    )
    parser.add_argument(
        "--fleet",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fleet against bare Celery (default: when Redis answers on 127.0.0.1:6379)",
    )
    parser.add_argument(
        "--fleet-only", action="store_true", help="only the fleet side by side, nothing else"
    )
    parser.add_argument(
        "--fleet-rounds",
        type=int,
        default=5,
        metavar="R",
        help="burst rounds per side, taking turns; the median is reported (default 5)",
    )
    args = parser.parse_args()
    if args.fleet_only:
        args.fleet = True
    logging.basicConfig(level=logging.ERROR)
    sizes = args.sizes or ([1_000, 10_000, 100_000] if args.large else [1_000, 10_000])
    large = [] if args.sizes or args.large else [100_000]
    if args.fleet_only:
        sizes, large = [], []
    started = time.perf_counter()
    rows = [] if args.history_only or not sizes else asyncio.run(run(sizes, large, args.steps))
    lines: list[history.Line] = []
    if not args.fleet_only and not args.steps:
        with tempfile.TemporaryDirectory(prefix="bench-") as name:
            lines = history.history_case(Path(name))
    fleet = None if args.history_only or args.steps else _fleet(args.fleet, args.fleet_rounds)
    print()
    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{platform.processor() or platform.platform()}, "
        f"{__import__('os').cpu_count()} cores; {time.perf_counter() - started:.0f} s in all"
    )
    if rows:
        print(report(rows))
        print()
    if lines:
        print(history.report(lines))
    if fleet:
        print()
        print(fleet)


def _fleet(wanted: bool | None, rounds: int) -> str | None:
    """The fleet table, if asked for (or by default, if Redis and the celery extra are here)."""
    if wanted is False:
        return None
    try:
        from bench.fleet import redis_reachable, run_fleet
    except ImportError as exc:
        if wanted:
            raise SystemExit(f"--fleet needs the celery extra: {exc}") from exc
        return None
    if not redis_reachable():
        if wanted:
            raise SystemExit("--fleet needs Redis on 127.0.0.1:6379")
        return None
    print("  fleet: task-dispatcher workers vs bare Celery ...", flush=True)
    return run_fleet(rounds=max(1, rounds))
