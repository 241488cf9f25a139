"""The state of a cluster in PostgreSQL: loading it, and committing a change in one transaction.

:class:`PostgresState` speaks plain data: task rows (:class:`TaskRow`, the record as the
state file holds it), raw kept records, account orders, run events. Each
:meth:`~PostgresState.commit` is one transaction that first checks the committer's fencing
epoch (:func:`jobstores.postgres.lease.check_fence`): it applies whole, or (raising) not at
all. :meth:`~PostgresState.load` reads one consistent snapshot and returns what the JSON
loader returns for ``dispatch_config.json`` (:class:`StoredState`, or its
:class:`~jobstores.format.Document`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from jobstores.format import FORMAT_VERSION, Document
from jobstores.postgres.errors import PostgresStoreError, describe
from jobstores.postgres.lease import DEFAULT_CLUSTER, Fence, check_fence
from jobstores.postgres.schema import ensure_schema
from tasks.model import TaskRecord, json_default
from tasks.runs import RunEvent, RunEventKind, RunRequest

__all__ = ["FullState", "PostgresState", "StoredState", "TaskRow", "verbatim"]


def verbatim(raw: Any) -> str:
    """A kept record's text: as the state file writes it back (see
    :func:`jobstores.format.encode_raw`), with the standard library, which keeps what orjson
    would alter or refuse."""
    return json.dumps(raw, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class TaskRow:
    """One restored task as stored: its ids and its JSON object text (the state file's line)."""

    task_id: str
    account_id: str
    text: str
    """The JSON object, exactly as the state file's line holds it."""
    sealed: bool = True
    """Whether this library validated it (it is then loaded without validating it again)."""

    @classmethod
    def of(cls, record: TaskRecord) -> TaskRow:
        """The row of a record (encoded as the state file encodes it)."""
        text = orjson.dumps(record.plain(), default=json_default).decode()
        return cls(record.task_id, record.account_id, text)

    @classmethod
    def from_raw(cls, raw: dict[str, Any], *, sealed: bool) -> TaskRow:
        """The row of a task object read from a document (it must have string ids)."""
        text = orjson.dumps(raw, default=json_default).decode()
        return cls(raw["task_id"], raw["account_id"], text, sealed)


@dataclass(frozen=True)
class FullState:
    """The whole state of a cluster, replacing what is stored."""

    rows: Sequence[TaskRow]
    """Every restored task, in file order."""
    kept: Sequence[Any]
    """Records that could not be restored, as they were read."""
    account_tasks: dict[str, list[str]]
    """Account id -> task ids in priority order (unrestorable ones included)."""


@dataclass
class StoredState:
    """What :meth:`PostgresState.load` read (what the JSON loader reads from a file)."""

    tasks: list[Any]
    """Every task object to restore: the restored tasks in file order, then the kept ones."""
    account_tasks: dict[str, list[str]]
    kept: list[Any]
    """The records kept unrestored (the last ones of :attr:`tasks`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys of the document this code does not interpret."""
    timezone: str | None = None
    """The zone the cluster records for its hour windows."""
    saved_at: str | None = None
    """When the last commit was made (as the document writes it)."""
    sealed: list[bool] = field(default_factory=list)
    """For each restored task (in :attr:`tasks` order): whether it may be loaded without
    validation (this library validated it and its ``record`` was not edited since)."""

    def document(self) -> Document:
        """The state as the JSON loader's :class:`~jobstores.format.Document`."""
        restored = len(self.sealed)
        trusted = {id(raw) for raw, sealed in zip(self.tasks, self.sealed, strict=False) if sealed}
        return Document(
            version=FORMAT_VERSION,
            saved_at=self.saved_at,
            tasks=list(self.tasks),
            # Kept records were read by the standard library (NaN, huge numbers): checked again.
            parsed_json=not self.kept,
            timezone=self.timezone,
            account_tasks={account: list(ids) for account, ids in self.account_tasks.items()},
            extra=dict(self.extra),
            trusted=not self.kept and len(trusted) == restored,
            trusted_tasks=trusted,
        )


_META = """
INSERT INTO td_clusters (cluster, saved_at, timezone, extra) VALUES (%s, %s, %s, %s)
ON CONFLICT (cluster) DO UPDATE SET
    saved_at = excluded.saved_at, timezone = excluded.timezone, extra = excluded.extra
"""
# The text is given twice (j, r): one parameter used as both would be typed jsonb once the
# statement is prepared, and record_text would get jsonb's text, not the file's line.
_PUT = """
INSERT INTO td_tasks (cluster, task_id, account_id, record, record_text, sealed)
VALUES (%(c)s, %(t)s, %(a)s, %(j)s::jsonb, %(r)s::text, %(s)s)
ON CONFLICT (cluster, task_id) DO UPDATE SET
    account_id = excluded.account_id, record = excluded.record,
    record_text = excluded.record_text, sealed = excluded.sealed
"""
# A task changed keeps its place in the file (its seq); a new one goes last.
_DELETE = "DELETE FROM td_tasks WHERE cluster = %(c)s AND task_id = %(t)s"
_APPEND = """
INSERT INTO td_accounts AS a (cluster, account_id, task_ids) VALUES (%(c)s, %(a)s, ARRAY[%(t)s])
ON CONFLICT (cluster, account_id) DO UPDATE SET task_ids = a.task_ids || %(t)s::text
WHERE NOT %(t)s::text = ANY (a.task_ids)
"""
_UNLIST = """
UPDATE td_accounts SET task_ids = array_remove(task_ids, %(t)s::text)
WHERE cluster = %(c)s AND account_id = %(a)s
"""
_DROP_EMPTY = """
DELETE FROM td_accounts WHERE cluster = %(c)s AND account_id = %(a)s AND cardinality(task_ids) = 0
"""
_DROP_ACCOUNT = "DELETE FROM td_accounts WHERE cluster = %(c)s AND account_id = %(a)s"
# An account left without tasks goes (and comes back last in account_tasks), as in the table.
_ORDER = """
INSERT INTO td_accounts AS a (cluster, account_id, task_ids) VALUES (%(c)s, %(a)s, %(ids)s)
ON CONFLICT (cluster, account_id) DO UPDATE SET task_ids = excluded.task_ids
"""
_MOVE = """
UPDATE td_accounts SET task_ids = td_moved(task_ids, %(t)s, %(b)s)
WHERE cluster = %(c)s AND account_id = %(a)s AND %(t)s::text = ANY (task_ids)
"""
_APPLIED = """
INSERT INTO td_applied_runs (cluster, run_id, kind) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING
"""
_RUN_COLUMNS = (
    "cluster, run_id, task_id, account_id, sys_type, task_type, attempt, scheduled_at, "
    "started_at, finished_at, duration, outcome, error, worker, extra, ts, trigger"
)
_RUN_VALUES = (
    "%(cluster)s, %(run_id)s, %(task_id)s, %(account_id)s, %(sys_type)s, %(task_type)s, "
    "%(attempt)s, %(scheduled_at)s, %(started_at)s, %(finished_at)s, %(duration)s, "
    "%(outcome)s, %(error)s, %(worker)s, %(extra)s::jsonb, %(ts)s, %(trigger)s"
)
_STARTED = f"""
INSERT INTO td_runs ({_RUN_COLUMNS}) VALUES ({_RUN_VALUES})
ON CONFLICT (cluster, run_id) DO NOTHING
"""
# As the SQLite history: a finishing event completes the run's row once; a duplicate (or a
# start arriving after the finish) changes nothing.
_FINISHED = f"""
INSERT INTO td_runs AS r ({_RUN_COLUMNS}) VALUES ({_RUN_VALUES})
ON CONFLICT (cluster, run_id) DO UPDATE SET
    started_at = coalesce(excluded.started_at, r.started_at),
    finished_at = excluded.finished_at,
    duration = extract(epoch FROM excluded.finished_at - coalesce(excluded.started_at,
                                                                  r.started_at)),
    outcome = excluded.outcome,
    error = excluded.error,
    worker = coalesce(excluded.worker, r.worker),
    extra = coalesce(excluded.extra, r.extra),
    ts = coalesce(excluded.started_at, r.started_at, excluded.ts)
WHERE r.outcome = 'running'
"""


def _run_row(cluster: str, request: RunRequest, event: RunEvent) -> dict[str, Any]:
    """The parameters recording ``event`` of ``request``'s run (see ``scheduler.history``)."""
    finished = event.kind is not RunEventKind.STARTED
    started = event.at if not finished else event.started_at
    return {
        "cluster": cluster,
        "run_id": request.run_id,
        "task_id": request.task_id,
        "account_id": request.account_id,
        "sys_type": request.sys_type,
        "task_type": request.task_type,
        "attempt": request.attempt,
        "scheduled_at": request.scheduled_at,
        "started_at": started,
        "finished_at": event.at if finished else None,
        "duration": (
            (event.at - started).total_seconds() if finished and started is not None else None
        ),
        "outcome": event.kind.value if finished else "running",
        "error": event.error,
        "worker": event.worker,
        "extra": orjson.dumps(dict(event.extra)).decode() if event.extra else None,
        "ts": started if started is not None else event.at,
        "trigger": request.trigger,
    }


class PostgresState:
    """A cluster's state in the database ``connect()`` opens (tables created on first use).

    One connection, used by one thread at a time (a lock guards it); a connection that
    failed is replaced at the next call. Every failure raises
    :class:`~jobstores.postgres.errors.PostgresStoreError` (an ``OSError``), having changed
    nothing.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], cluster: str = DEFAULT_CLUSTER
    ) -> None:
        self._connect = connect
        self.cluster = cluster
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None

    def _conn(self) -> psycopg.Connection[Any]:
        connection = self._connection
        if connection is None or connection.closed:
            connection = self._connect()
            connection.autocommit = True  # transactions are explicit
            try:
                ensure_schema(connection)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return connection

    def _failed(self, action: str, exc: psycopg.Error) -> PostgresStoreError:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        return PostgresStoreError(f"cluster {self.cluster!r}: {action} failed: {describe(exc)}")

    def close(self) -> None:
        """Close the connection (a later call opens another)."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    # ------------------------------------------------------------------ reading

    def load(self) -> StoredState | None:
        """The cluster's state as one consistent snapshot (None: nothing was ever stored)."""
        cluster = (self.cluster,)
        with self._lock:
            try:
                connection = self._conn()
                with connection.transaction():
                    connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    meta = connection.execute(
                        "SELECT saved_at, timezone, extra FROM td_clusters WHERE cluster = %s",
                        cluster,
                    ).fetchone()
                    rows = connection.execute(
                        "SELECT record_text, sealed FROM td_tasks WHERE cluster = %s ORDER BY seq",
                        cluster,
                    ).fetchall()
                    kept = connection.execute(
                        "SELECT raw FROM td_kept WHERE cluster = %s ORDER BY seq", cluster
                    ).fetchall()
                    accounts = connection.execute(
                        "SELECT account_id, task_ids FROM td_accounts WHERE cluster = %s "
                        "ORDER BY seq",
                        cluster,
                    ).fetchall()
            except psycopg.Error as exc:
                raise self._failed("loading", exc) from exc
        if meta is None and not rows and not kept:
            return None
        saved_at, zone, extra = meta if meta is not None else (None, None, "{}")
        kept_raws = [json.loads(raw) for (raw,) in kept]
        return StoredState(
            tasks=[*(orjson.loads(text) for text, _ in rows), *kept_raws],
            account_tasks={account: list(ids) for account, ids in accounts},
            kept=kept_raws,
            extra=json.loads(extra),
            timezone=zone,
            saved_at=saved_at,
            sealed=[bool(sealed) for _, sealed in rows],
        )

    def applied_runs(self, run_ids: Iterable[str]) -> set[tuple[str, str]]:
        """``(run id, event kind)`` of the events of ``run_ids`` applied durably."""
        with self._lock:
            try:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT run_id, kind FROM td_applied_runs "
                        "WHERE cluster = %s AND run_id = ANY(%s)",
                        (self.cluster, list(run_ids)),
                    )
                    .fetchall()
                )
            except psycopg.Error as exc:
                raise self._failed("reading applied runs", exc) from exc
        return {(run_id, kind) for run_id, kind in rows}

    def runs(
        self,
        *,
        task_id: str | None = None,
        account_id: str | None = None,
        failed: bool | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Run history rows matching every filter given, newest first (by start, else end):
        each a dict of the fields of ``scheduler.history.RunEntry``."""
        where = ["cluster = %s"]
        parameters: list[Any] = [self.cluster]
        if task_id is not None:
            where.append("task_id = %s")
            parameters.append(task_id)
        if account_id is not None:
            where.append("account_id = %s")
            parameters.append(account_id)
        if failed is True:
            where.append("outcome IN ('failed', 'lost', 'expired')")
        elif failed is False:
            where.append("outcome = 'succeeded'")
        sql = (
            "SELECT run_id, task_id, account_id, sys_type, task_type, attempt, scheduled_at, "
            "started_at, finished_at, duration, outcome, error, worker, trigger, extra "
            f"FROM td_runs WHERE {' AND '.join(where)} ORDER BY ts DESC, id DESC LIMIT %s"
        )
        with self._lock:
            try:
                cursor = self._conn().execute(sql, (*parameters, limit))
                names = [column.name for column in cursor.description or ()]
                rows = cursor.fetchall()
            except psycopg.Error as exc:
                raise self._failed("reading the run history", exc) from exc
        entries = []
        for row in rows:
            entry = dict(zip(names, row, strict=True))
            entry["extra"] = entry["extra"] or {}
            entries.append(entry)
        return entries

    # ------------------------------------------------------------------ writing

    def commit(
        self,
        fence: Fence,
        *,
        saved_at: datetime | str,
        timezone: str | None,
        extra: dict[str, Any],
        full: FullState | None = None,
        changes: Iterable[tuple[str, TaskRow | None]] = (),
        orders: dict[str, list[str]] | None = None,
        moves: Iterable[tuple[str, str, str | None]] = (),
        applied: Iterable[tuple[str, str]] = (),
        runs: Iterable[tuple[RunRequest, RunEvent]] = (),
    ) -> None:
        """Make one change durable, in one transaction that first checks ``fence``.

        ``full`` replaces the whole state; otherwise ``changes`` (each task id's latest row,
        None: removed; a new task goes last in its account), then ``orders`` (accounts'
        whole orders), then ``moves`` (``(account, task, the task it now stands before or
        None: last)``) are applied in that order. ``applied`` records ``(run id, event
        kind)`` pairs as applied; ``runs`` writes run events into the history. Raises
        :class:`~jobstores.postgres.errors.StaleLeaderError` when another instance took over
        since ``fence`` was issued, :class:`PostgresStoreError` on any other failure;
        either way nothing changed.
        """
        cluster = self.cluster
        if fence.cluster != cluster:
            raise ValueError(f"fence: for cluster {fence.cluster!r}, not {cluster!r}")
        stamp = saved_at if isinstance(saved_at, str) else saved_at.isoformat()
        with self._lock:
            try:
                connection = self._conn()
                with connection.transaction():
                    check_fence(connection, fence)
                    connection.execute(
                        _META, (cluster, stamp, timezone, json.dumps(extra, ensure_ascii=False))
                    )
                    with connection.cursor() as cursor:
                        if full is not None:
                            self._replace(cursor, full)
                        else:
                            self._apply(cursor, changes, orders or {}, moves)
                        applied_rows = [(cluster, run_id, kind) for run_id, kind in applied]
                        if applied_rows:
                            cursor.executemany(_APPLIED, applied_rows)
                        self._record(cursor, runs)
            except psycopg.Error as exc:
                raise self._failed("committing", exc) from exc

    def _replace(self, cursor: psycopg.Cursor[Any], full: FullState) -> None:
        cluster = self.cluster
        for table in ("td_tasks", "td_kept", "td_accounts"):
            cursor.execute(f"DELETE FROM {table} WHERE cluster = %s", (cluster,))
        # COPY assigns each row the next seq in the order written: the file's order.
        with cursor.copy(
            "COPY td_tasks (cluster, task_id, account_id, record, record_text, sealed) FROM STDIN"
        ) as copy:
            for row in full.rows:
                copy.write_row(
                    (cluster, row.task_id, row.account_id, row.text, row.text, row.sealed)
                )
        with cursor.copy("COPY td_kept (cluster, task_id, raw) FROM STDIN") as copy:
            for raw in full.kept:
                task_id = raw.get("task_id") if isinstance(raw, dict) else None
                copy.write_row(
                    (cluster, task_id if isinstance(task_id, str) else None, verbatim(raw))
                )
        with cursor.copy("COPY td_accounts (cluster, account_id, task_ids) FROM STDIN") as copy:
            for account, ids in full.account_tasks.items():
                if ids:
                    copy.write_row((cluster, account, list(ids)))

    def _apply(
        self,
        cursor: psycopg.Cursor[Any],
        changes: Iterable[tuple[str, TaskRow | None]],
        orders: dict[str, list[str]],
        moves: Iterable[tuple[str, str, str | None]],
    ) -> None:
        cluster = self.cluster
        pairs = list(changes)
        accounts: dict[str, str | None] = {}
        if pairs:
            found = cursor.execute(
                "SELECT task_id, account_id FROM td_tasks WHERE cluster = %s AND task_id = ANY(%s)",
                (cluster, list({task_id for task_id, _ in pairs})),
            ).fetchall()
            accounts.update(found)
        rows: list[tuple[str, dict[str, Any]]] = []
        lists: list[tuple[str, dict[str, Any]]] = []
        for task_id, row in pairs:
            current = accounts.get(task_id)
            if row is None:
                rows.append((_DELETE, {"c": cluster, "t": task_id}))
                if current is not None:
                    lists.extend(_unlisted(cluster, current, task_id))
                accounts[task_id] = None
                continue
            rows.append(
                (
                    _PUT,
                    {
                        "c": cluster,
                        "t": task_id,
                        "a": row.account_id,
                        "j": row.text,
                        "r": row.text,
                        "s": row.sealed,
                    },
                )
            )
            if current != row.account_id:
                if current is not None:
                    lists.extend(_unlisted(cluster, current, task_id))
                lists.append((_APPEND, {"c": cluster, "a": row.account_id, "t": task_id}))
            accounts[task_id] = row.account_id
        for account, ids in orders.items():
            if ids:
                lists.append((_ORDER, {"c": cluster, "a": account, "ids": list(ids)}))
            else:
                lists.append((_DROP_ACCOUNT, {"c": cluster, "a": account}))
        for account, task_id, before in moves:
            lists.append((_MOVE, {"c": cluster, "a": account, "t": task_id, "b": before}))
        _run_in_order(cursor, rows)
        _run_in_order(cursor, lists)

    def _record(
        self, cursor: psycopg.Cursor[Any], runs: Iterable[tuple[RunRequest, RunEvent]]
    ) -> None:
        started: list[dict[str, Any]] = []
        finished: list[dict[str, Any]] = []
        for request, event in runs:
            row = _run_row(self.cluster, request, event)
            (started if event.kind is RunEventKind.STARTED else finished).append(row)
        # Starts first: a run that started and finished in one commit ends up finished.
        if started:
            cursor.executemany(_STARTED, started)
        if finished:
            cursor.executemany(_FINISHED, finished)


def _unlisted(cluster: str, account: str, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    parameters = {"c": cluster, "a": account, "t": task_id}
    return [(_UNLIST, parameters), (_DROP_EMPTY, parameters)]


def _run_in_order(
    cursor: psycopg.Cursor[Any], statements: list[tuple[str, dict[str, Any]]]
) -> None:
    """Execute ``statements`` in order, each run of one statement as one ``executemany``
    (pipelined: one round trip for many rows)."""
    at = 0
    while at < len(statements):
        sql = statements[at][0]
        end = at
        while end < len(statements) and statements[end][0] == sql:
            end += 1
        cursor.executemany(sql, [parameters for _, parameters in statements[at:end]])
        at = end
