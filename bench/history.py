"""The run history at scale: 100,000 runs of 1,000 tasks, then the queries an operator makes.

Runs go in through the real path (``RunHistory.record``: a started and a finishing event per
run, written by the background thread); queries are timed one by one; pruning a third of the
history is timed with runs arriving meanwhile, to see how long an insert waits behind it.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from scheduler.history import HISTORY_FILENAME, RunHistory
from tasks.runs import RunEvent, RunEventKind, RunRequest

RUNS = 100_000
TASKS = 1_000
ACCOUNTS = 100
DAYS = 30
QUERIES = 1_000
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Line:
    """One measurement of the history benchmark."""

    metric: str
    value: str


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _run(history: RunHistory, n: int, start: datetime, failed: bool) -> None:
    task = n % TASKS
    request = RunRequest(
        run_id=f"run-{n:07d}",
        task_id=f"task-{task:04d}",
        account_id=f"account-{task % ACCOUNTS:03d}",
        sys_type="mac_intel",
        task_type="xhs_type",
        kwargs={},
        scheduled_at=start,
        submitted_at=start,
    )
    history.record(request, RunEvent(request.run_id, request.task_id, RunEventKind.STARTED, start))
    end = start + timedelta(seconds=1 + n % 90)
    kind = RunEventKind.FAILED if failed else RunEventKind.SUCCEEDED
    error = "RuntimeError: the account was logged out" if failed else None
    history.record(
        request,
        RunEvent(request.run_id, request.task_id, kind, end, error=error, started_at=start),
    )


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"


def _timed_queries(history: RunHistory, make: list[dict[str, Any]]) -> str:
    samples = []
    rows = 0
    for filters in make:
        started = time.perf_counter()
        rows += len(history.query(**filters))
        samples.append(time.perf_counter() - started)
    return f"{_percentiles(samples)} ({rows / len(make):.0f} rows)"


def history_case(root: Path) -> list[Line]:
    """Fill a history with :data:`RUNS` runs, query it, prune it; the measurements."""
    rng = random.Random(7)
    clock = _Clock(START + timedelta(days=DAYS))
    history = RunHistory(root / HISTORY_FILENAME, clock=clock, retention=timedelta(days=DAYS + 1))
    lines: list[Line] = []
    # Runs spread evenly over the period; each task runs about every 7 hours.
    step = timedelta(days=DAYS) / RUNS
    in_record = 0.0
    started = time.perf_counter()
    for n in range(RUNS):
        before = time.perf_counter()
        _run(history, n, START + n * step, failed=rng.random() < 0.05)
        in_record += time.perf_counter() - before
        if n % 5_000 == 4_999:  # no dispatcher queues 100,000 runs at once
            history.flush(timeout=None)
    history.flush(timeout=None)
    elapsed = time.perf_counter() - started
    lines.append(Line(f"record {RUNS:,} runs and write them", f"{elapsed:.2f} s"))
    lines.append(Line("  runs written per second", f"{RUNS / elapsed:,.0f}/s"))
    lines.append(
        Line("  caller's cost of record() per event", f"{in_record / (2 * RUNS) * 1e6:.1f} µs")
    )

    def tasks() -> str:
        return f"task-{rng.randrange(TASKS):04d}"

    queries: dict[str, list[dict[str, Any]]] = {
        "query(task_id=..., limit=100)": [{"task_id": tasks()} for _ in range(QUERIES)],
        "query(task_id=..., since=7 days ago)": [
            {"task_id": tasks(), "since": START + timedelta(days=DAYS - 7)} for _ in range(QUERIES)
        ],
        "query(account_id=..., limit=100)": [
            {"account_id": f"account-{rng.randrange(ACCOUNTS):03d}"} for _ in range(QUERIES)
        ],
        "query(failed=True, limit=100)": [{"failed": True} for _ in range(QUERIES // 10)],
        "query(limit=100): the latest runs": [{} for _ in range(QUERIES // 10)],
    }
    for label, filters in queries.items():
        lines.append(Line(label, _timed_queries(history, filters)))
    page = history.query(task_id="task-0001", limit=10)
    deep = [{"task_id": "task-0001", "limit": 10, "before_run": page[-1].run_id}]
    lines.append(Line("  next page (before_run=...)", _timed_queries(history, deep * 100)))
    size = sum(p.stat().st_size for p in root.glob(HISTORY_FILENAME + "*"))
    lines.append(Line("file size (with WAL)", f"{size / 1e6:.1f} MB, {size / RUNS:.0f} B/run"))

    # One run written on its own, as a dispatcher does between runs.
    waits: list[float] = []
    for n in range(RUNS, RUNS + 100):
        _run(history, n, START + timedelta(days=DAYS), failed=False)
        before = time.perf_counter()
        history.flush(timeout=None)
        waits.append(time.perf_counter() - before)
    lines.append(Line("write latency of one run (record, then flush)", _percentiles(waits)))

    # Retention: drop the oldest 10 days while a run arrives every few milliseconds.
    clock.now = START + timedelta(days=DAYS + DAYS + 1 - 20)
    waits = []
    done = threading.Event()
    stop = threading.Event()

    def prune() -> None:
        history.prune(timeout=None)
        done.set()

    pruner = threading.Thread(target=prune)
    started = time.perf_counter()
    pruner.start()
    n = RUNS + 100
    while not done.is_set() and not stop.is_set():
        _run(history, n, clock.now, failed=False)
        before = time.perf_counter()
        history.flush(timeout=None)
        waits.append(time.perf_counter() - before)
        n += 1
        stop.wait(0.005)
    pruner.join()
    pruned = time.perf_counter() - started
    lines.append(Line(f"prune 10 of {DAYS} days (batches of 500)", f"{pruned:.2f} s"))
    lines.append(Line(f"  write latency of {len(waits)} runs meanwhile", _percentiles(waits)))
    lines.append(Line("  longest write wait", f"{max(waits) * 1000:.1f} ms"))
    history.close()
    return lines


def report(lines: list[Line]) -> str:
    """The measurements as a Markdown table."""
    rows = ["| run history | |", "|---|---:|"]
    rows.extend(f"| {line.metric} | {line.value} |" for line in lines)
    return "\n".join(rows)
