"""The run history: every run of every task, in SQLite beside the state file.

``dispatch_config.json`` stays the source of truth for tasks; the history is an index of what
happened, append-mostly and queried by task, account and time, which SQLite (stdlib
``sqlite3``, WAL, so readers never block the writer) serves well and a JSON file does not.

One row per run, keyed by its run id: a ``started`` event inserts it with outcome
``"running"`` and the finishing event (``succeeded``, ``failed``, ``lost`` or ``expired``)
completes it in place, so "running now" and "what happened" are the same query.

Recording never gets in the way of runs: :meth:`RunHistory.record` only queues; one background
thread writes the queue in batched transactions and prunes rows older than the retention in
small batches between them. A failing write is logged and the batch dropped; nothing is raised
into the caller.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel, ConfigDict

from scheduler.errors import HistoryUnavailableError
from tasks.runs import RunEvent, RunEventKind, RunRequest, Trigger, run_trigger

__all__ = [
    "FAILED_OUTCOMES",
    "HISTORY_FILENAME",
    "MAX_QUERY_LIMIT",
    "HistoryReader",
    "Outcome",
    "RunEntry",
    "RunHistory",
    "SharedRunHistory",
    "SharedRunTable",
    "SharedRunsStore",
    "open_history",
    "read_runs",
    "read_shared_runs",
]

logger = logging.getLogger(__name__)

HISTORY_FILENAME = "history.sqlite3"
"""The history's file name inside the dispatcher directory."""

MAX_QUERY_LIMIT = 10_000
"""The most entries one :meth:`HistoryReader.query` returns."""

SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of the file this code writes."""

Outcome = Literal["running", "succeeded", "failed", "lost", "expired", "cancelled"]
"""How a run ended; ``"running"`` until its finishing event arrives."""

FAILED_OUTCOMES: tuple[Outcome, ...] = ("failed", "lost", "expired")
"""The outcomes that count as a failed run."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    task_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    sys_type TEXT NOT NULL,
    task_type TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    scheduled_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    duration REAL,
    outcome TEXT NOT NULL,
    error TEXT,
    worker TEXT,
    extra TEXT,
    ts REAL NOT NULL,
    trigger TEXT
);
CREATE INDEX IF NOT EXISTS runs_task_ts ON runs (task_id, ts);
CREATE INDEX IF NOT EXISTS runs_account_ts ON runs (account_id, ts);
CREATE INDEX IF NOT EXISTS runs_failed_ts ON runs (ts)
    WHERE outcome IN ('failed', 'lost', 'expired');
CREATE INDEX IF NOT EXISTS runs_ts ON runs (ts);
"""
# Times are unix seconds (UTC; sqlite's own datetime(x, 'unixepoch') reads them). ``ts`` is
# when the run happened: its start, or its end for a run that never started (expired); it
# orders every query, and with the rowid (implicitly the last column of every index) it is
# the paging cursor. Failures, the runs an operator looks for, have an index of their own
# (partial, so it stays small); a query uses it only if it repeats its condition verbatim.

_COLUMNS = (
    "run_id, task_id, account_id, sys_type, task_type, attempt, scheduled_at, started_at, "
    "finished_at, duration, outcome, error, worker, extra, ts, trigger"
)
# ``trigger`` came with format 2 (added to older files when a dispatcher opens them); rows
# from before it have none and read as their attempt says ("schedule" or "retry").
_STARTED_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 'running', NULL, ?, ?, ?, ?)"
_STARTED_CONFLICT = """
ON CONFLICT (run_id) DO NOTHING
"""
# A finishing event completes the run's row once: a duplicate (or one for a run already
# finished) changes nothing, and a start that arrives after the finish is ignored above.
_FINISHED_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_FINISHED_CONFLICT = """
ON CONFLICT (run_id) DO UPDATE SET
    started_at = coalesce(excluded.started_at, runs.started_at),
    finished_at = excluded.finished_at,
    duration = excluded.finished_at - coalesce(excluded.started_at, runs.started_at),
    outcome = excluded.outcome,
    error = excluded.error,
    worker = coalesce(excluded.worker, runs.worker),
    extra = coalesce(excluded.extra, runs.extra),
    ts = coalesce(excluded.started_at, runs.started_at, excluded.ts)
WHERE runs.outcome = 'running'
"""
_ROWS_PER_STATEMENT = 128
"""Rows one statement writes (its rows are applied in order, as one statement each would
be). SQLite runs a statement without the interpreter's lock and takes it back after: with a
statement a row, a writer competing with a busy event loop waited for the lock at every row
(a switch interval, 5 ms) and fell behind by thousands of runs a second."""


def _insert(row: str, conflict: str, count: int) -> str:
    """The statement that writes ``count`` rows of the form ``row``."""
    return f"INSERT INTO runs ({_COLUMNS}) VALUES {', '.join([row] * count)}{conflict}"


_SELECT = f"SELECT id, {_COLUMNS} FROM runs"
_SELECT_V1 = _SELECT.replace(", trigger FROM", ", NULL FROM")
"""What a reader asks of a file written before ``trigger`` existed."""
_FAILED = "outcome IN ('failed', 'lost', 'expired')"


def _seconds(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class RunEntry(BaseModel):
    """One run as the history knows it (times aware, in the history's zone)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    task_id: str
    account_id: str
    sys_type: str
    task_type: str
    attempt: int
    scheduled_at: datetime
    """The planned time of the run."""
    started_at: datetime | None
    """None for a run that never started (expired)."""
    finished_at: datetime | None
    """None while the run is running."""
    duration: float | None
    """Seconds from start to finish; None if either is unknown."""
    outcome: Outcome
    error: str | None
    """``"Type: message"`` for failed, lost and expired runs."""
    worker: str | None
    """Where the run executed (None: in the dispatcher's process)."""
    trigger: Trigger = "schedule"
    """Why it ran: its planned time (``schedule``), a retry (``retry``) or an operator's
    "run now" (``manual``)."""
    extra: dict[str, Any] = {}
    """Anything else the run backend reported."""

    @property
    def failed(self) -> bool:
        """Whether the run ended as a failure (failed, lost or expired)."""
        return self.outcome in FAILED_OUTCOMES

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object (datetimes as ISO-8601 with offset)."""
        return self.model_dump(mode="json")


def _row_values(request: RunRequest, event: RunEvent) -> tuple[Any, ...]:
    """The parameters of the statement that records ``event`` (started or finishing)."""
    extra = orjson.dumps(dict(event.extra)).decode() if event.extra else None
    common = (
        request.run_id,
        request.task_id,
        request.account_id,
        request.sys_type,
        request.task_type,
        request.attempt,
        request.scheduled_at.timestamp(),
    )
    at = event.at.timestamp()
    if event.kind is RunEventKind.STARTED:
        return (*common, at, event.worker, extra, at, request.trigger)
    started = _seconds(event.started_at)
    return (
        *common,
        started,
        at,
        None if started is None else at - started,
        event.kind.value,
        event.error,
        event.worker,
        extra,
        at if started is None else started,
        request.trigger,
    )


def _covered_starts(events: list[tuple[RunRequest, RunEvent]]) -> set[str]:
    """Run ids whose ``started`` rows in this batch need not be written.

    A batch writes every started row, then every finishing one: a run's row is its first
    ``started`` event's, completed by its first finishing event. When that finishing event
    carries everything the start would leave in the row (the start time, the same worker, and
    the start reported no extra), writing the finishing row alone gives the same row: that is
    every local run whose start and end fall in one batch, so it is one row write, not two.
    """
    first_start: dict[str, RunEvent] = {}
    first_finish: dict[str, RunEvent] = {}
    for _, event in events:
        firsts = first_start if event.kind is RunEventKind.STARTED else first_finish
        firsts.setdefault(event.run_id, event)
    return {
        run_id
        for run_id, start in first_start.items()
        if (finish := first_finish.get(run_id)) is not None
        and finish.started_at is not None
        and finish.worker == start.worker
        and not start.extra
    }


def _checked(limit: int, since: datetime | None, until: datetime | None) -> int:
    """``limit`` as a query uses it; raises ``ValueError`` naming a bad argument."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: must be a positive integer, got {limit!r}")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ValueError(f"{name}: {value.isoformat()} has no UTC offset")
    return min(limit, MAX_QUERY_LIMIT)


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
        )
    else:
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


def _has_trigger(connection: sqlite3.Connection) -> bool:
    """Whether the file has the ``trigger`` column (format 2)."""
    columns = connection.execute("PRAGMA table_info(runs)").fetchall()
    return any(column[1] == "trigger" for column in columns)


class HistoryReader:
    """Queries a history file; never writes it (safe while a dispatcher owns the directory).

    Thread safety: :meth:`query` may be called from any thread, concurrently.
    """

    def __init__(self, path: Path, *, timezone: tzinfo = UTC) -> None:
        self.path = Path(path)
        """The SQLite file."""
        self.timezone = timezone
        """The zone the entries' times are given in."""
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._readonly = True
        self._triggers = False

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        # One connection per concurrent query, kept for the next one: sqlite3 connections
        # must not be shared by threads at once, and opening one costs more than a query.
        with self._pool_lock:
            connection = self._pool.pop() if self._pool else None
        if connection is None:
            if self._readonly and not self.path.exists():
                raise HistoryUnavailableError(f"no run history at {str(self.path)!r} yet")
            try:
                connection = _connect(self.path, readonly=True)
            except sqlite3.Error as exc:
                raise HistoryUnavailableError(
                    f"cannot read the run history {str(self.path)!r}: {exc}"
                ) from exc
        try:
            yield connection
        finally:
            with self._pool_lock:
                if len(self._pool) < 4:
                    self._pool.append(connection)
                    connection = None
            if connection is not None:
                connection.close()

    def query(
        self,
        *,
        task_id: str | None = None,
        account_id: str | None = None,
        failed: bool | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        before_run: str | None = None,
    ) -> list[RunEntry]:
        """Runs matching every filter given, newest first (by start, else end).

        ``failed=True``: failed, lost and expired runs; ``False``: succeeded ones. ``since``
        (inclusive) and ``until`` (exclusive) bound the run's start. For the next page pass the
        last entry's ``run_id`` as ``before_run``. Raises ``ValueError`` naming the argument
        for a bad one (an unknown ``before_run`` included), :class:`HistoryUnavailableError`
        if the file cannot be read.
        """
        limit = _checked(limit, since, until)
        where: list[str] = []
        parameters: list[Any] = []
        if task_id is not None:
            where.append("task_id = ?")
            parameters.append(task_id)
        if account_id is not None:
            where.append("account_id = ?")
            parameters.append(account_id)
        if failed is True:
            where.append(_FAILED)
        elif failed is False:
            where.append("outcome = 'succeeded'")
        if since is not None:
            where.append("ts >= ?")
            parameters.append(since.timestamp())
        if until is not None:
            where.append("ts < ?")
            parameters.append(until.timestamp())
        with self._reader() as connection:
            try:
                if before_run is not None:
                    cursor = connection.execute(
                        "SELECT ts, id FROM runs WHERE run_id = ?", (before_run,)
                    ).fetchone()
                    if cursor is None:
                        raise ValueError(f"before_run: no run {before_run!r} in the history")
                    where.append("(ts, id) < (?, ?)")
                    parameters.extend(cursor)
                # Once the column is there it stays: a file is looked at until it has it.
                self._triggers = self._triggers or _has_trigger(connection)
                sql = _SELECT if self._triggers else _SELECT_V1
                if where:
                    sql += " WHERE " + " AND ".join(where)
                sql += " ORDER BY ts DESC, id DESC LIMIT ?"
                rows = connection.execute(sql, (*parameters, limit)).fetchall()
            except sqlite3.Error as exc:
                raise HistoryUnavailableError(
                    f"cannot read the run history {str(self.path)!r}: {exc}"
                ) from exc
        return [self._entry(row) for row in rows]

    def _entry(self, row: tuple[Any, ...]) -> RunEntry:
        zone = self.timezone

        def when(value: float | None) -> datetime | None:
            return None if value is None else datetime.fromtimestamp(value, zone)

        (
            _,
            run_id,
            task_id,
            account_id,
            sys_type,
            task_type,
            attempt,
            scheduled_at,
            started_at,
            finished_at,
            duration,
            outcome,
            error,
            worker,
            extra,
            _,
            trigger,
        ) = row
        return RunEntry(
            run_id=run_id,
            task_id=task_id,
            account_id=account_id,
            sys_type=sys_type,
            task_type=task_type,
            attempt=attempt,
            scheduled_at=datetime.fromtimestamp(scheduled_at, zone),
            started_at=when(started_at),
            finished_at=when(finished_at),
            duration=duration,
            outcome=outcome,
            error=error,
            worker=worker,
            trigger=trigger or run_trigger(attempt),
            extra=orjson.loads(extra) if extra else {},
        )

    def close(self) -> None:
        """Close the pooled connections (queries after this open new ones)."""
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for connection in pool:
            connection.close()


@dataclass
class _Marker:
    """A request to the writer thread, answered by setting ``done``."""

    done: threading.Event
    prune_until: float | None = None


_STOP = object()


class RunHistory(HistoryReader):
    """The history of a dispatcher's runs, written by one background thread.

    ``retention``: rows older than this (by the run's start) are deleted, a small batch at a
    time between inserts, when the history opens and every ``prune_interval`` after. ``clock``
    is the current instant (it decides what "older" means).
    """

    def __init__(
        self,
        path: Path,
        *,
        retention: timedelta = timedelta(days=30),
        timezone: tzinfo = UTC,
        clock: Callable[[], datetime] | None = None,
        prune_interval: timedelta = timedelta(minutes=10),
        prune_batch: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        super().__init__(path, timezone=timezone)
        self._readonly = False
        if retention <= timedelta(0):
            raise ValueError(f"retention: must be positive, got {retention}")
        if prune_batch < 1:
            raise ValueError(f"prune_batch: must be at least 1, got {prune_batch}")
        self.retention = retention
        """How long runs are kept."""
        self._clock = clock or (lambda: datetime.now(UTC))
        self._prune_interval = prune_interval.total_seconds()
        self._prune_batch = prune_batch
        # Unbounded, so flush/prune/stop requests always get in; record() bounds the events.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_queued = max_queued
        self._closed = False
        self._dropped = 0
        self._write_failing = False
        self._last_logged: dict[str, float] = {}
        self._start_writer()
        self._thread = threading.Thread(
            target=self._write_loop, name=f"task-dispatcher history {self.path}", daemon=True
        )
        self._thread.start()

    def _start_writer(self) -> None:
        """Open what the writer thread writes (raises :class:`HistoryUnavailableError`)."""
        self._writer = self._open()

    def _stop_writer(self) -> None:
        """Close what the writer thread wrote (it has stopped)."""
        self._writer.close()

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Owner-only, like the state file (errors may quote what a task handled); SQLite
            # gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            connection = _connect(self.path, readonly=False)
            try:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise HistoryUnavailableError(
                        f"{str(self.path)!r} has history format {version}, newer than this "
                        f"task-dispatcher writes ({SCHEMA_VERSION}); upgrade task-dispatcher"
                    )
                connection.execute("PRAGMA journal_mode = WAL")
                # WAL with synchronous=NORMAL stays consistent on power loss and may lose only
                # the last commits: right for an index of what happened.
                connection.execute("PRAGMA synchronous = NORMAL")
                connection.executescript(_SCHEMA)
                if not _has_trigger(connection):
                    connection.execute("ALTER TABLE runs ADD COLUMN trigger TEXT")
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                connection.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise HistoryUnavailableError(
                f"cannot open the run history {str(self.path)!r}: {exc}"
            ) from exc
        return connection

    # ------------------------------------------------------------------ writing

    @property
    def dropped(self) -> int:
        """Events lost so far because a write failed or the queue was full."""
        return self._dropped

    def record(self, request: RunRequest, event: RunEvent) -> None:
        """Queue ``event`` of ``request``'s run for writing; never blocks, never raises."""
        if self._closed:
            logger.debug(
                "history closed: event %s of run %s not recorded", event.kind, event.run_id
            )
            return
        if self._queue.qsize() >= self._max_queued:
            self._dropped += 1
            self._failure("full", f"{self._max_queued} events waiting to be written", 1)
            return
        self._queue.put((request, event))

    def prune(self, now: datetime | None = None, *, timeout: float | None = None) -> bool:
        """Delete runs older than the retention as of ``now`` (default: the clock).

        Done by the writer thread in batches, inserts going on between them; returns whether
        it finished within ``timeout`` seconds (None: wait for it).
        """
        cutoff = (now or self._clock()) - self.retention
        return self._ask(_Marker(threading.Event(), cutoff.timestamp()), timeout)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every event recorded so far is written (or dropped after a failure).

        Returns False if that took longer than ``timeout`` seconds.
        """
        return self._ask(_Marker(threading.Event()), timeout)

    def _ask(self, marker: _Marker, timeout: float | None) -> bool:
        if self._closed or not self._thread.is_alive():
            return True
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), stop the writer, close."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "run history %s: writer still busy after %ss; events not yet written are lost",
                self.path,
                timeout,
            )
        else:
            self._stop_writer()
        super().close()

    # ------------------------------------------------------------------ the writer thread

    def _write_loop(self) -> None:
        next_prune = 0.0  # prune once at opening
        prune_until: float | None = None
        prune_waiters: list[threading.Event] = []
        stopping = False
        while not stopping:
            now = time.monotonic()
            if prune_until is None and now >= next_prune:
                prune_until = (self._clock() - self.retention).timestamp()
                next_prune = now + self._prune_interval
            # While pruning, take what is queued without waiting, so inserts go first.
            wait = 0.0 if prune_until is not None else max(next_prune - now, 0.0)
            events: list[tuple[RunRequest, RunEvent]] = []
            markers: list[_Marker] = []
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                while True:
                    if item is _STOP:
                        stopping = True
                    elif isinstance(item, _Marker):
                        markers.append(item)
                    else:
                        events.append(item)
                    if len(events) >= 1000:
                        break
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if events:
                self._write(events)
            for marker in markers:
                if marker.prune_until is None:
                    marker.done.set()
                else:
                    prune_until = max(prune_until or -math.inf, marker.prune_until)
                    prune_waiters.append(marker.done)
            if prune_until is not None and not stopping and self._prune_step(prune_until):
                prune_until = None
                for done in prune_waiters:
                    done.set()
                prune_waiters.clear()
        for done in prune_waiters:
            done.set()

    def _write(self, events: list[tuple[RunRequest, RunEvent]]) -> None:
        try:
            self._store(events)
        except Exception as exc:  # a broken event must not stop the writer either
            self._dropped += len(events)
            self._write_failing = True
            self._failure("write", f"{type(exc).__name__}: {exc}", len(events))
            return
        if self._write_failing:
            logger.info("run history %s: writes work again", self.path)
            self._write_failing = False
            self._last_logged.pop("write", None)

    def _store(self, events: list[tuple[RunRequest, RunEvent]]) -> None:
        """Write one batch of events in one transaction (raises if it failed)."""
        started: list[tuple[Any, ...]] = []
        finished: list[tuple[Any, ...]] = []
        covered = _covered_starts(events)
        for request, event in events:
            if event.kind is RunEventKind.STARTED:
                if event.run_id not in covered:
                    started.append(_row_values(request, event))
            else:
                finished.append(_row_values(request, event))
        # Started rows first: a run that started and finished in one batch is completed.
        with self._transaction():
            self._insert(_STARTED_ROW, _STARTED_CONFLICT, started)
            self._insert(_FINISHED_ROW, _FINISHED_CONFLICT, finished)

    def _insert(self, row: str, conflict: str, rows: list[tuple[Any, ...]]) -> None:
        """Write ``rows`` in order, :data:`_ROWS_PER_STATEMENT` to a statement (the last
        statement takes what is left)."""
        whole = len(rows) - len(rows) % _ROWS_PER_STATEMENT
        if whole:
            self._writer.executemany(
                _insert(row, conflict, _ROWS_PER_STATEMENT),
                (
                    list(itertools.chain.from_iterable(rows[at : at + _ROWS_PER_STATEMENT]))
                    for at in range(0, whole, _ROWS_PER_STATEMENT)
                ),
            )
        if whole < len(rows):
            rest = rows[whole:]
            self._writer.execute(
                _insert(row, conflict, len(rest)), list(itertools.chain.from_iterable(rest))
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")

    def _failure(self, kind: str, reason: str, count: int) -> None:
        # Logged when it starts and then at most once a minute, not once per batch.
        now = time.monotonic()
        if now - self._last_logged.get(kind, -math.inf) >= 60:
            self._last_logged[kind] = now
            logger.error(
                "run history %s: %d run event(s) not recorded (%s); runs and task state are "
                "unaffected; %d event(s) lost so far",
                self.path,
                count,
                reason,
                self._dropped,
            )

    def _prune_step(self, cutoff: float) -> bool:
        """Delete one batch of rows older than ``cutoff``; True when none is left."""
        try:
            deleted = self._delete_before(cutoff)
        except (sqlite3.Error, OSError) as exc:
            logger.error("run history %s: pruning failed (%s); retrying later", self.path, exc)
            return True
        if deleted:
            logger.debug("run history %s: pruned %d run(s)", self.path, deleted)
        return deleted < self._prune_batch

    def _delete_before(self, cutoff: float) -> int:
        """Delete one batch of rows older than ``cutoff`` (unix seconds); how many went."""
        with self._transaction():
            return self._writer.execute(
                "DELETE FROM runs WHERE id IN "
                "(SELECT id FROM runs WHERE ts < ? ORDER BY ts LIMIT ?)",
                (cutoff, self._prune_batch),
            ).rowcount


class SharedRunTable(Protocol):
    """A run history shared by the instances of a cluster, in the cluster's store (for
    PostgreSQL, :class:`jobstores.postgres.runs.RunTable`). Its methods raise an ``OSError``
    when the store fails, having changed nothing."""

    where: str
    """What messages name it by."""

    def open(self) -> None:
        """Connect (creating what is missing); raises if that fails."""

    def record(self, events: list[tuple[RunRequest, RunEvent]]) -> None:
        """Write events in one transaction: the ``started`` ones, then the finishing ones."""

    def prune(self, cutoff: datetime, batch: int) -> int:
        """Delete up to ``batch`` runs that happened before ``cutoff``; how many went."""

    def query(
        self,
        *,
        task_id: str | None,
        account_id: str | None,
        failed: bool | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        before_run: str | None,
    ) -> list[tuple[Any, ...]]:
        """Rows of :data:`SHARED_FIELDS`, filtered and ordered as
        :meth:`HistoryReader.query` describes (its arguments already checked)."""

    def close(self) -> None:
        """Close its connections (a later call opens them again)."""


@runtime_checkable
class SharedRunsStore(Protocol):
    """A state store whose cluster keeps its run history itself: a dispatcher on it records
    and reads its runs there (:class:`SharedRunHistory`), not in its directory."""

    def run_table(self) -> SharedRunTable:
        """The cluster's run history (with connections of its own)."""
        ...


SHARED_FIELDS = (
    "run_id",
    "task_id",
    "account_id",
    "sys_type",
    "task_type",
    "attempt",
    "scheduled_at",
    "started_at",
    "finished_at",
    "duration",
    "outcome",
    "error",
    "worker",
    "trigger",
    "extra",
)
"""The fields of a :class:`SharedRunTable`'s rows, in order (times aware)."""


class SharedRunHistory(RunHistory):
    """The run history of a cluster, kept in its store: every instance reads the same runs.

    The other implementation of :class:`RunHistory`'s interface: recording, flushing,
    retention and closing work as there (one background thread writes batches, queued by
    :meth:`record`, which never blocks; runs older than the retention are pruned a batch at a
    time), the rows and their ordering are the same; only where they are kept differs.
    :attr:`path` names the table (there is no file).
    """

    def __init__(
        self,
        table: SharedRunTable,
        *,
        retention: timedelta = timedelta(days=30),
        timezone: tzinfo = UTC,
        clock: Callable[[], datetime] | None = None,
        prune_interval: timedelta = timedelta(minutes=10),
        prune_batch: int = 500,
        max_queued: int = 100_000,
    ) -> None:
        self.table = table
        """Where the runs are kept."""
        super().__init__(
            Path(table.where),
            retention=retention,
            timezone=timezone,
            clock=clock,
            prune_interval=prune_interval,
            prune_batch=prune_batch,
            max_queued=max_queued,
        )

    def _start_writer(self) -> None:
        try:
            self.table.open()
        except OSError as exc:
            raise HistoryUnavailableError(f"cannot open the run history: {exc}") from exc

    def _stop_writer(self) -> None:
        self.table.close()

    def _store(self, events: list[tuple[RunRequest, RunEvent]]) -> None:
        # The same rows in the same order as the SQLite history writes them.
        covered = _covered_starts(events)
        self.table.record(
            [
                (request, event)
                for request, event in events
                if event.kind is not RunEventKind.STARTED or event.run_id not in covered
            ]
        )

    def _delete_before(self, cutoff: float) -> int:
        return self.table.prune(datetime.fromtimestamp(cutoff, UTC), self._prune_batch)

    def query(
        self,
        *,
        task_id: str | None = None,
        account_id: str | None = None,
        failed: bool | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        before_run: str | None = None,
    ) -> list[RunEntry]:
        """As :meth:`HistoryReader.query`, from the cluster's store."""
        return _query_shared(
            self.table,
            self.timezone,
            task_id=task_id,
            account_id=account_id,
            failed=failed,
            since=since,
            until=until,
            limit=limit,
            before_run=before_run,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), stop the writer, close."""
        super().close(timeout)
        self.table.close()


def open_history(
    directory: Path,
    option: bool | RunHistory,
    timezone: tzinfo,
    store: object = None,
    clock: Callable[[], datetime] | None = None,
) -> RunHistory | None:
    """The dispatcher's history: ``option`` itself, a new one, or None.

    A new one is kept where the state ``store`` keeps its cluster's runs
    (:class:`SharedRunsStore`, e.g. PostgreSQL), else in ``directory``, and prunes by
    ``clock`` (the dispatcher's, which stamps the runs). A history that cannot be opened is
    logged and left off: it must not stop the dispatcher.
    """
    if isinstance(option, RunHistory):
        return option
    if not option:
        return None
    try:
        if isinstance(store, SharedRunsStore):
            return SharedRunHistory(store.run_table(), timezone=timezone, clock=clock)
        return RunHistory(directory / HISTORY_FILENAME, timezone=timezone, clock=clock)
    except HistoryUnavailableError as exc:
        logger.error("%s; running without a run history", exc)
        return None


def _query_shared(
    table: SharedRunTable,
    zone: tzinfo,
    *,
    task_id: str | None = None,
    account_id: str | None = None,
    failed: bool | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    before_run: str | None = None,
) -> list[RunEntry]:
    """``table``'s runs matching the filters (see :meth:`HistoryReader.query`), in ``zone``."""
    limit = _checked(limit, since, until)
    try:
        rows = table.query(
            task_id=task_id,
            account_id=account_id,
            failed=failed,
            since=since,
            until=until,
            limit=limit,
            before_run=before_run,
        )
    except OSError as exc:
        raise HistoryUnavailableError(f"cannot read the run history: {exc}") from exc
    entries = []
    for row in rows:
        fields = dict(zip(SHARED_FIELDS, row, strict=True))
        for name in ("scheduled_at", "started_at", "finished_at"):
            if fields[name] is not None:
                fields[name] = fields[name].astimezone(zone)
        fields["extra"] = fields["extra"] or {}
        entries.append(RunEntry(**fields))
    return entries


def read_shared_runs(
    store: SharedRunsStore, timezone: tzinfo = UTC, **filters: Any
) -> list[RunEntry]:
    """Query the run history ``store`` keeps for its cluster (see
    :meth:`HistoryReader.query`), without a writer: works while a dispatcher leads the
    cluster, or while none runs. Raises :class:`HistoryUnavailableError` if it cannot be read.
    """
    table = store.run_table()
    try:
        return _query_shared(table, timezone, **filters)
    finally:
        table.close()


def read_runs(directory: Path, timezone: tzinfo = UTC, **filters: Any) -> list[RunEntry]:
    """Query ``directory``'s history read-only (see :meth:`HistoryReader.query`).

    Works while a dispatcher owns the directory. Raises :class:`HistoryUnavailableError` if
    there is no history file.
    """
    reader = HistoryReader(directory / HISTORY_FILENAME, timezone=timezone)
    try:
        return reader.query(**filters)
    finally:
        reader.close()
