"""Prometheus metrics of one dispatcher (needs the ``control`` extra: ``prometheus_client``).

Run counts and the duration and lateness histograms are fed by run events
(:meth:`DispatcherMetrics.observe`, an observer of the runner); the gauges (tasks by status,
runs waiting per account, saving) are read from the dispatcher when scraped. Every dispatcher
has its own registry, so several in one process never collide.

The run metrics are counted in plain numbers on the run's path (one lock, no per-sample value
objects) and exposed at scrape time exactly as ``prometheus_client``'s ``Counter`` and
``Histogram`` would expose them: same names, labels, buckets, sums, counts and ``_created``
series.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


_RUNS = ("task_dispatcher_runs", "Finished runs by task type, sys_type and outcome.")
_DURATION = ("task_dispatcher_run_duration_seconds", "Run duration, start to finish, by task type.")
_LATENESS = (
    "task_dispatcher_run_start_lateness_seconds",
    "Planned time to actual start of runs.",
)


def _bucket_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The ``le`` label of each bucket, written as prometheus_client writes it."""
    return tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]


_DURATION_LE = _bucket_labels(DURATION_BUCKETS)
_LATENESS_LE = _bucket_labels(LATENESS_BUCKETS)


class _Histogram:
    """One histogram series: a count per bucket (not cumulative), the sum, when it began."""

    __slots__ = ("counts", "created", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0
        self.created = time.time()


class _RunCollector(Collector):
    """The run counter and histograms, read from :class:`DispatcherMetrics`' numbers."""

    def __init__(self, metrics: DispatcherMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [
            Metric(_RUNS[0], _RUNS[1], "counter"),
            Metric(_DURATION[0], _DURATION[1], "histogram"),
            Metric(_LATENESS[0], _LATENESS[1], "histogram"),
        ]

    def collect(self) -> Iterable[Metric]:
        # Read at each scrape, as prometheus_client does (disable_created_metrics()).
        created = getattr(prometheus_metrics, "_use_created", True)
        metrics = self._metrics
        with metrics._lock:
            runs = [(key, count, at) for key, (count, at) in metrics._runs.items()]
            durations = [
                (task_type, list(h.counts), h.total, h.created)
                for task_type, h in metrics._durations.items()
            ]
            late = metrics._lateness
            lateness = (list(late.counts), late.total, late.created)

        counter = Metric(_RUNS[0], _RUNS[1], "counter")
        for (task_type, sys_type, outcome), count, at in runs:
            labels = {"task_type": task_type, "sys_type": sys_type, "outcome": outcome}
            counter.add_sample(_RUNS[0] + "_total", labels, float(count))
            if created:
                counter.add_sample(_RUNS[0] + "_created", labels, at)
        yield counter

        histogram = Metric(_DURATION[0], _DURATION[1], "histogram")
        for task_type, counts, total, at in durations:
            _add_histogram(
                histogram, {"task_type": task_type}, _DURATION_LE, counts, total, at, created
            )
        yield histogram

        histogram = Metric(_LATENESS[0], _LATENESS[1], "histogram")
        _add_histogram(histogram, {}, _LATENESS_LE, *lateness, created)
        yield histogram


def _add_histogram(
    metric: Metric,
    labels: dict[str, str],
    bounds: tuple[str, ...],
    counts: list[int],
    total: float,
    at: float,
    created: bool,
) -> None:
    name = metric.name
    cumulative = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        cumulative += count
        metric.add_sample(name + "_bucket", {**labels, "le": bound}, cumulative)
    metric.add_sample(name + "_count", labels, cumulative)
    metric.add_sample(name + "_sum", labels, total)
    if created:
        metric.add_sample(name + "_created", labels, at)


class DispatcherMetrics:
    """A dispatcher's metrics in a registry of its own.

    Thread safety: :meth:`observe` and :meth:`render` may be called from any thread.
    """

    def __init__(self, source: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        """This dispatcher's registry (never the process-wide default one)."""
        self._lock = threading.Lock()  # a leaf lock: guards the numbers below
        self._runs: dict[tuple[str, str, str], list[float]] = {}
        """(task_type, sys_type, outcome) -> [count, when the series began]."""
        self._durations: dict[str, _Histogram] = {}
        self._lateness = _Histogram(len(LATENESS_BUCKETS))
        self.registry.register(_RunCollector(self))
        self.registry.register(_StateCollector(source))

    def observe(self, request: RunRequest, event: RunEvent) -> None:
        """Count ``event`` of ``request``'s run (a runner observer)."""
        if event.kind is RunEventKind.STARTED:
            lateness = max((event.at - request.scheduled_at).total_seconds(), 0.0)
            bucket = bisect.bisect_left(LATENESS_BUCKETS, lateness)
            with self._lock:
                late = self._lateness
                late.total += lateness
                late.counts[bucket] += 1
            return
        key = (request.task_type, request.sys_type, event.kind.value)
        started_at = event.started_at
        with self._lock:
            counter = self._runs.get(key)
            if counter is None:
                self._runs[key] = [1, time.time()]
            else:
                counter[0] += 1
            if started_at is None:
                return
            duration = max((event.at - started_at).total_seconds(), 0.0)
            histogram = self._durations.get(request.task_type)
            if histogram is None:
                histogram = self._durations[request.task_type] = _Histogram(len(DURATION_BUCKETS))
            histogram.total += duration
            histogram.counts[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE
