"""Prometheus metrics of one dispatcher (needs the ``control`` extra: ``prometheus_client``).

Run counts and the duration and lateness histograms are fed by run events
(:meth:`DispatcherMetrics.observe`, an observer of the runner); the gauges (tasks by status,
runs waiting per account, saving) are read from the dispatcher when scraped. Every dispatcher
has its own registry, so several in one process never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from jobstores.jsonfile import SaveHealth
from tasks.model import TaskStatus
from tasks.runs import RunEvent, RunEventKind, RunRequest

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "LATENESS_BUCKETS",
    "DispatcherMetrics",
    "MetricsSource",
]

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
"""Run duration histogram buckets, in seconds (runs take seconds to an hour)."""
LATENESS_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf"))
"""Start lateness histogram buckets, in seconds (planned time to actual start)."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic Prometheus text format, which every scraper reads."""


@dataclass(frozen=True)
class MetricsSource:
    """What the scrape-time gauges read; each callable must be safe to call from any thread."""

    tasks_by_status: Callable[[], Mapping[str, int]]
    """Status value -> number of tasks."""
    waiting_by_account: Callable[[], Mapping[str, int]]
    """Account id -> runs waiting for its lane (accounts with none may be left out)."""
    save_health: Callable[[], SaveHealth]


_GAUGES: dict[str, tuple[str, list[str] | None]] = {
    "task_dispatcher_tasks": ("Tasks by status.", ["status"]),
    "task_dispatcher_lane_waiting_runs": (
        "Runs waiting for their account's lane (accounts with none are left out).",
        ["account"],
    ),
    "task_dispatcher_waiting_runs": ("Runs waiting for a lane, all accounts together.", None),
    "task_dispatcher_failed_saves": (
        "Failed saves of the state file since the last successful one.",
        None,
    ),
    "task_dispatcher_unsaved_tasks": ("Tasks whose latest change is not on disk yet.", None),
    "task_dispatcher_last_durable_save_timestamp_seconds": (
        "When the state file was last written durably (unix seconds).",
        None,
    ),
}
"""The scrape-time gauges: name -> (help, labels)."""


def _gauge(name: str, value: float | None = None) -> GaugeMetricFamily:
    documentation, labels = _GAUGES[name]
    return GaugeMetricFamily(name, documentation, value=value, labels=labels)


class _StateCollector(Collector):
    """The gauges, computed from the dispatcher at each scrape."""

    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        """The gauges without values: what registering checks names against (without it the
        registry collects once, a pass over every task of the dispatcher)."""
        return [_gauge(name) for name in _GAUGES]

    def collect(self) -> Iterable[Metric]:
        counts = self._source.tasks_by_status()
        tasks = _gauge("task_dispatcher_tasks")
        for status in TaskStatus:
            tasks.add_metric([status.value], counts.get(status.value, 0))
        yield tasks

        waiting = {a: n for a, n in self._source.waiting_by_account().items() if n}
        lanes = _gauge("task_dispatcher_lane_waiting_runs")
        for account, count in sorted(waiting.items()):
            lanes.add_metric([account], count)
        yield lanes
        yield _gauge("task_dispatcher_waiting_runs", sum(waiting.values()))

        health = self._source.save_health()
        yield _gauge("task_dispatcher_failed_saves", health.failed_saves)
        yield _gauge("task_dispatcher_unsaved_tasks", len(health.unsaved_task_ids))
        if health.last_saved_at is not None:
            yield _gauge(
                "task_dispatcher_last_durable_save_timestamp_seconds",
                health.last_saved_at.timestamp(),
            )


class DispatcherMetrics:
    """A dispatcher's metrics in a registry of its own.

    Thread safety: :meth:`observe` and :meth:`render` may be called from any thread.
    """

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        """This dispatcher's registry (never the process-wide default one)."""
        self._runs = Counter(
            "task_dispatcher_runs",
            "Finished runs by task type, sys_type and outcome.",
            ["task_type", "sys_type", "outcome"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "task_dispatcher_run_duration_seconds",
            "Run duration, start to finish, by task type.",
            ["task_type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._lateness = Histogram(
            "task_dispatcher_run_start_lateness_seconds",
            "Planned time to actual start of runs.",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(source))
        # Labelled children by label values: labels() takes a lock and builds a key on every
        # call, and runs of a dispatcher have few distinct task types and sys_types. A child
        # once made stays in its metric, so caching it never changes what is exported.
        self._run_counters: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[str, Any] = {}

    def observe(self, request: RunRequest, event: RunEvent) -> None:
        """Count ``event`` of ``request``'s run (a runner observer)."""
        if event.kind is RunEventKind.STARTED:
            lateness = (event.at - request.scheduled_at).total_seconds()
            self._lateness.observe(max(lateness, 0.0))
            return
        key = (request.task_type, request.sys_type, event.kind.value)
        counter = self._run_counters.get(key)
        if counter is None:
            counter = self._run_counters[key] = self._runs.labels(*key)
        counter.inc()
        if event.started_at is not None:
            duration = (event.at - event.started_at).total_seconds()
            histogram = self._durations.get(request.task_type)
            if histogram is None:
                histogram = self._durations[request.task_type] = self._duration.labels(
                    request.task_type
                )
            histogram.observe(max(duration, 0.0))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE
