"""Prometheus metrics of a dispatcher, read back through prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import Recorder, at
from prometheus_client.parser import text_string_to_metric_families

from jobstores.saver import SaveHealth
from scheduler import TaskDispatcher
from scheduler.metrics import DispatcherMetrics, MetricsSource

MakeDispatcher = Callable[..., TaskDispatcher]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: DispatcherMetrics | None) -> Samples:
    assert metrics is not None
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def add(dispatcher: TaskDispatcher, task_id: str, account: str = "account_1") -> None:
    await dispatcher.add_task(
        sys_type="mac_intel",
        task_type="xhs_type",
        xhs_account_id=account,
        interval=3600,
        valid_time_range=[8, 22],
        task_id=task_id,
    )


async def test_runs_durations_and_lateness_are_counted(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    await add(dispatcher, "good", "account_1")
    await add(dispatcher, "bad", "account_2")
    recorder.fail.add("bad")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0, 30))  # 30 s after the planned time
    await dispatcher.run_pending()

    samples = scrape(dispatcher.metrics)
    runs = "task_dispatcher_runs_total"
    labels = {"task_type": "xhs_type", "sys_type": "mac_intel"}
    assert value(samples, runs, outcome="succeeded", **labels) == 1
    assert value(samples, runs, outcome="failed", **labels) == 1
    duration = "task_dispatcher_run_duration_seconds"
    assert value(samples, f"{duration}_count", task_type="xhs_type") == 2
    assert value(samples, f"{duration}_bucket", task_type="xhs_type", le="0.1") == 2
    lateness = "task_dispatcher_run_start_lateness_seconds"
    assert value(samples, f"{lateness}_count") == 2
    assert value(samples, f"{lateness}_sum") == 60
    assert value(samples, f"{lateness}_bucket", le="15.0") == 0
    assert value(samples, f"{lateness}_bucket", le="60.0") == 2

    assert value(samples, "task_dispatcher_tasks", status="pending") == 1
    assert value(samples, "task_dispatcher_tasks", status="error") == 1
    assert value(samples, "task_dispatcher_tasks", status="paused") == 0
    assert value(samples, "task_dispatcher_failed_saves") == 0
    assert value(samples, "task_dispatcher_unsaved_tasks") == 0
    last_save = value(samples, "task_dispatcher_last_durable_save_timestamp_seconds")
    assert last_save == at(2026, 1, 8, 8, 0, 30).timestamp()
    assert value(samples, "task_dispatcher_waiting_runs") == 0
    await dispatcher.stop()


async def test_runs_waiting_per_account_lane(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    dispatcher = make_dispatcher()
    for task_id in ("first", "second", "third"):
        await add(dispatcher, task_id, "busy")
    await add(dispatcher, "other", "quiet")
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    recorder.gates["first"] = asyncio.Event()
    recorder.started["first"] = asyncio.Event()
    pending = asyncio.create_task(dispatcher.run_pending())
    await asyncio.wait_for(recorder.started["first"].wait(), 5)

    # Scraped from another thread, as an HTTP server would.
    samples = await asyncio.to_thread(scrape, dispatcher.metrics)
    assert value(samples, "task_dispatcher_lane_waiting_runs", account="busy") == 2
    assert value(samples, "task_dispatcher_lane_waiting_runs", account="quiet") is None
    assert value(samples, "task_dispatcher_waiting_runs") == 2
    assert value(samples, "task_dispatcher_tasks", status="running") == 1

    recorder.gates["first"].set()
    await asyncio.wait_for(pending, 5)
    assert value(scrape(dispatcher.metrics), "task_dispatcher_waiting_runs") == 0
    await dispatcher.stop()


async def test_each_dispatcher_has_its_own_registry(
    clock: Any, make_dispatcher: MakeDispatcher, tmp_path: Path
) -> None:
    one = make_dispatcher(dispatcher_dir=tmp_path / "one")
    two = make_dispatcher(dispatcher_dir=tmp_path / "two")
    await add(one, "t1")
    await one.start()
    clock.move_to(at(2026, 1, 8, 8, 0))
    await one.run_pending()
    runs = "task_dispatcher_runs_total"
    labels = {"task_type": "xhs_type", "sys_type": "mac_intel", "outcome": "succeeded"}
    assert value(scrape(one.metrics), runs, **labels) == 1
    assert value(scrape(two.metrics), runs, **labels) is None
    assert value(scrape(two.metrics), "task_dispatcher_tasks", status="pending") == 0
    await one.stop()


def test_without_prometheus_client_metrics_are_off(tmp_path: Path) -> None:
    # A fresh interpreter in which prometheus_client cannot be imported.
    script = f"""
import sys
sys.modules["prometheus_client"] = None
import scheduler
from scheduler import TaskDispatcher
dispatcher = TaskDispatcher({str(tmp_path / "d")!r}, timezone="UTC")
assert dispatcher.metrics is None
assert dispatcher.history is not None
dispatcher.close()
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_creating_the_metrics_reads_no_task() -> None:
    # The registry checks a collector's names when it is registered: the gauges describe
    # themselves instead of being collected (a pass over every task of a large store).
    reads: list[str] = []

    def tasks_by_status() -> dict[str, int]:
        reads.append("tasks")
        return {"pending": 2}

    metrics = DispatcherMetrics(MetricsSource(tasks_by_status, dict, SaveHealth))
    assert reads == []
    samples = scrape(metrics)
    assert reads == ["tasks"]
    assert value(samples, "task_dispatcher_tasks", status="pending") == 2
    assert value(samples, "task_dispatcher_waiting_runs") == 0


def test_scrape_matches_prometheus_client_metrics_fed_the_same_runs() -> None:
    # The run metrics are counted in plain numbers; a scrape must read exactly as
    # prometheus_client's own Counter and Histograms fed the same runs (only the _created
    # instants differ).
    from datetime import UTC, datetime, timedelta

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from scheduler.metrics import DURATION_BUCKETS, LATENESS_BUCKETS
    from tasks.runs import RunEvent, RunEventKind, RunRequest

    metrics = DispatcherMetrics(MetricsSource(dict, dict, SaveHealth))
    reference = CollectorRegistry()
    runs = Counter(
        "task_dispatcher_runs",
        "Finished runs by task type, sys_type and outcome.",
        ["task_type", "sys_type", "outcome"],
        registry=reference,
    )
    durations = Histogram(
        "task_dispatcher_run_duration_seconds",
        "Run duration, start to finish, by task type.",
        ["task_type"],
        buckets=DURATION_BUCKETS,
        registry=reference,
    )
    lateness = Histogram(
        "task_dispatcher_run_start_lateness_seconds",
        "Planned time to actual start of runs.",
        buckets=LATENESS_BUCKETS,
        registry=reference,
    )
    planned = datetime(2026, 1, 8, 8, 0, tzinfo=UTC)
    kinds = [RunEventKind.SUCCEEDED, RunEventKind.FAILED, RunEventKind.LOST]
    # Lateness and durations on, around and between bucket bounds, negative ones too.
    seconds = [-1.0, 0.0, 0.01, 0.0100001, 0.3, 1, 4.99, 5, 61, 299.5, 3600, 7200.25]
    for i in range(60):
        task_type, sys_type = ("xhs_type", "mac_intel") if i % 3 else ("dy_type", "win")
        request = RunRequest(
            run_id=f"r{i}",
            task_id=f"t{i}",
            account_id="a",
            sys_type=sys_type,
            task_type=task_type,
            kwargs={},
            scheduled_at=planned,
            submitted_at=planned,
        )
        late = seconds[i % len(seconds)]
        started = planned + timedelta(seconds=late)
        metrics.observe(request, RunEvent(f"r{i}", f"t{i}", RunEventKind.STARTED, at=started))
        lateness.observe(max((started - planned).total_seconds(), 0.0))
        took = seconds[(i * 7) % len(seconds)]
        kind = kinds[(i // 3) % len(kinds)]
        began = None if i % 11 == 0 else started  # a lost run may not know when it began
        ended = RunEvent(
            f"r{i}", f"t{i}", kind, at=started + timedelta(seconds=took), started_at=began
        )
        metrics.observe(request, ended)
        runs.labels(task_type, sys_type, kind.value).inc()
        if began is not None:
            durations.labels(task_type).observe(max((ended.at - began).total_seconds(), 0.0))

    def lines(body: bytes) -> list[str]:
        kept = []
        for line in body.decode().splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name.startswith("task_dispatcher_run") and not line.startswith("#"):
                if name.endswith("_created"):
                    line = line.rsplit(" ", 1)[0] + " <created>"
                kept.append(line)
            elif line.startswith("#") and "task_dispatcher_run" in line:
                kept.append(line)
        return kept

    ours = lines(metrics.render()[0])
    assert ours == lines(generate_latest(reference))
    assert len([line for line in ours if line.endswith("<created>")]) == 2 * 3 + 2 + 1
