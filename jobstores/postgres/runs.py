"""A cluster's run history in PostgreSQL (``td_runs``): written, queried and pruned.

The rows are those of the SQLite history (``scheduler.history``), keyed by ``(cluster,
run_id)``: a ``started`` event inserts a run with outcome ``"running"``, its finishing event
completes it once (the statements of :mod:`jobstores.postgres.state`). Writes are not
fenced: a run that happened is recorded whichever instance saw it end, and every instance of
the cluster reads the same rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg

from jobstores.postgres.errors import PostgresStoreError, describe
from jobstores.postgres.schema import ensure_schema
from jobstores.postgres.state import _FINISHED, _STARTED, _run_row
from tasks.runs import RunEvent, RunEventKind, RunRequest

__all__ = ["RUN_FIELDS", "RunTable"]

RUN_FIELDS = (
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
"""The fields of each row :meth:`RunTable.query` returns, in order (times aware, UTC)."""

_FAILED = "outcome IN ('failed', 'lost', 'expired')"


class _Connection:
    """One connection used by one thread at a time, replaced after a failure."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], where: str) -> None:
        self._connect = connect
        self._where = where
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None

    @contextmanager
    def use(self, action: str) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            try:
                connection = self._connection
                if connection is None or connection.closed:
                    connection = self._connect()
                    connection.autocommit = True  # transactions are explicit
                    self._connection = connection
                    ensure_schema(connection)
                yield connection
            except psycopg.Error as exc:
                self._drop()
                message = f"{self._where}: {action} failed: {describe(exc)}"
                raise PostgresStoreError(message) from exc

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        with self._lock:
            self._drop()


class RunTable:
    """The run history of ``cluster`` in the database ``connect()`` opens.

    Two connections: one writes (:meth:`record`, :meth:`prune`), one reads (:meth:`query`),
    so a query never waits for a batch being written. Every failure raises
    :class:`~jobstores.postgres.errors.PostgresStoreError` (an ``OSError``), having changed
    nothing.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], cluster: str) -> None:
        self.cluster = cluster
        where = f"td_runs of cluster {cluster!r}"
        self.where = where
        """What messages name the history by."""
        self._writer = _Connection(connect, where)
        self._reader = _Connection(connect, where)

    def open(self) -> None:
        """Connect (creating the tables if there are none); raises if that fails."""
        with self._writer.use("opening"):
            pass

    def record(self, events: Iterable[tuple[RunRequest, RunEvent]]) -> None:
        """Write run events in one transaction: every ``started`` one, then every finishing one
        (each in the order given)."""
        started: list[dict[str, Any]] = []
        finished: list[dict[str, Any]] = []
        for request, event in events:
            row = _run_row(self.cluster, request, event)
            (started if event.kind is RunEventKind.STARTED else finished).append(row)
        with (
            self._writer.use("recording") as connection,
            connection.transaction(),
            connection.cursor() as cursor,
        ):
            if started:
                cursor.executemany(_STARTED, started)
            if finished:
                cursor.executemany(_FINISHED, finished)

    def prune(self, cutoff: datetime, batch: int) -> int:
        """Delete up to ``batch`` runs that happened before ``cutoff``; how many went."""
        with self._writer.use("pruning") as connection:
            cursor = connection.execute(
                "DELETE FROM td_runs WHERE id IN (SELECT id FROM td_runs "
                "WHERE cluster = %s AND ts < %s ORDER BY ts LIMIT %s)",
                (self.cluster, cutoff, batch),
            )
            return cursor.rowcount

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
    ) -> list[tuple[Any, ...]]:
        """Rows (:data:`RUN_FIELDS`) matching every filter, newest first (by start, else end).

        As ``scheduler.history.HistoryReader.query``, the arguments already checked; raises
        ``ValueError`` naming ``before_run`` when there is no such run.
        """
        where = ["cluster = %s"]
        parameters: list[Any] = [self.cluster]
        for column, value in (("task_id", task_id), ("account_id", account_id)):
            if value is not None:
                where.append(f"{column} = %s")
                parameters.append(value)
        if failed is True:
            where.append(_FAILED)
        elif failed is False:
            where.append("outcome = 'succeeded'")
        if since is not None:
            where.append("ts >= %s")
            parameters.append(since)
        if until is not None:
            where.append("ts < %s")
            parameters.append(until)
        with (
            self._reader.use("reading") as connection,
            connection.transaction(),
        ):
            if before_run is not None:
                cursor = connection.execute(
                    "SELECT ts, id FROM td_runs WHERE cluster = %s AND run_id = %s",
                    (self.cluster, before_run),
                ).fetchone()
                if cursor is None:
                    raise ValueError(f"before_run: no run {before_run!r} in the history")
                where.append("(ts, id) < (%s, %s)")
                parameters.extend(cursor)
            sql = (
                f"SELECT {', '.join(RUN_FIELDS)} FROM td_runs WHERE {' AND '.join(where)} "
                "ORDER BY ts DESC, id DESC LIMIT %s"
            )
            return connection.execute(sql, (*parameters, limit)).fetchall()

    def close(self) -> None:
        """Close both connections (a later call opens them again)."""
        self._writer.close()
        self._reader.close()
