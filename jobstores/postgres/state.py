"""The state of a cluster in PostgreSQL: loading it, and committing a change in one transaction.

:class:`PostgresState` speaks plain data: task rows (:class:`TaskRow`, the record as the
state file holds it), raw kept records, account orders, run events. Each
:meth:`~PostgresState.commit` is one transaction that first checks the committer's fencing
epoch: it applies whole, or (raising) not at all. A change is one statement, so one round
trip (``td_commit``, which checks the epoch in the database, see
:mod:`jobstores.postgres.schema`); a whole state written at once is a transaction that checks
it with :func:`jobstores.postgres.lease.check_fence`. :meth:`~PostgresState.load` reads one
consistent snapshot and returns what the JSON loader returns for ``dispatch_config.json``
(:class:`StoredState`, or its :class:`~jobstores.format.Document`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from operator import gt
from typing import Any

import orjson
import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import Loader

from jobstores.format import FORMAT_VERSION, Document
from jobstores.postgres.errors import PostgresStoreError, StaleLeaderError, describe
from jobstores.postgres.lease import DEFAULT_CLUSTER, Fence, check_fence
from jobstores.postgres.schema import GAP, STALE_SQLSTATE, ensure_schema, jsonb_text
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
    sealed_tasks: bytes | None = None
    """Loaded with ``defer_tasks`` when every task is sealed and none is kept: the tasks as
    one JSON array (each row's text as stored), left unparsed; :attr:`tasks` is then empty."""

    def document(self) -> Document:
        """The state as the JSON loader's :class:`~jobstores.format.Document`."""
        if self.sealed_tasks is not None:
            return Document(
                version=FORMAT_VERSION,
                saved_at=self.saved_at,
                tasks=[],
                timezone=self.timezone,
                account_tasks={account: list(ids) for account, ids in self.account_tasks.items()},
                extra=dict(self.extra),
                trusted=True,
                sealed_tasks=self.sealed_tasks,
                tasks_deferred=True,
            )
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


# In the order the server finds the rows (no sort of every record there, which spills to
# disk at 100,000 tasks): put in file order here.
_TASKS = "SELECT seq, record_text, sealed FROM td_tasks WHERE cluster = %s"


class _Bytes(Loader):
    """A text column as the bytes the server sent (no decoding: they are parsed once, by
    orjson or by pydantic's JSON path)."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


def _read_tasks(
    connection: psycopg.Connection[Any], cluster: tuple[str], *, defer: bool
) -> tuple[list[Any], list[bool], bytes | None]:
    """Every restored task's object and whether it is sealed, in file order; with ``defer``
    and every task sealed, the objects are left unparsed, as one JSON array (the third
    value; the first is then empty)."""
    with connection.cursor() as cursor:
        cursor.adapters.register_loader("text", _Bytes)
        rows = cursor.execute(_TASKS, cluster).fetchall()
    texts: list[bytes] = [text for _, text, _ in rows]
    sealed = [is_sealed for _, _, is_sealed in rows]
    seqs = [seq for seq, _, _ in rows]
    if any(map(gt, seqs, islice(seqs, 1, None))):
        order = sorted(range(len(seqs)), key=seqs.__getitem__)
        texts = [texts[i] for i in order]
        sealed = [sealed[i] for i in order]
    if defer and all(sealed):
        return [], sealed, b"[" + b",".join(texts) + b"]"
    loads = orjson.loads
    return [loads(text) for text in texts], sealed, None


_ACCOUNTS = """
INSERT INTO td_accounts (cluster, account_id)
SELECT %s, x.o->>0 FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS x(o, i) ORDER BY x.i
"""
_ORDER = f"""
INSERT INTO td_order (cluster, account_id, task_id, pos)
SELECT %s, x.o->>0, e.id, e.n * {GAP}
FROM jsonb_array_elements(%s::jsonb) AS x(o),
     jsonb_array_elements_text(x.o->1) WITH ORDINALITY AS e(id, n)
ON CONFLICT DO NOTHING
"""
_ORDERS = """
SELECT a.account_id, array_agg(o.task_id ORDER BY o.pos)
FROM td_accounts AS a JOIN td_order AS o USING (cluster, account_id)
WHERE a.cluster = %s GROUP BY a.account_id, a.seq ORDER BY a.seq
"""
_META = """
INSERT INTO td_clusters (cluster, saved_at, timezone, extra) VALUES (%s, %s, %s, %s)
ON CONFLICT (cluster) DO UPDATE SET
    saved_at = excluded.saved_at, timezone = excluded.timezone, extra = excluded.extra
"""
# One change of the leader, fenced, applied by the database in one statement (see
# jobstores.postgres.schema): a task changed keeps its place in the file (its seq), a new one
# goes last, and last in its account's order.
# The arrays go in binary (``%b``): as text, psycopg would escape every quote of every record's
# JSON, one regular-expression substitution each, which cost more than the server's work.
_COMMIT = """
SELECT td_commit(%s, %s, %s, %s, %s, %s, %b::text[], %b::text[], %b::text[], %b::boolean[],
                 %s::jsonb, %s::jsonb, %s::jsonb)
"""
_CHUNK = 10_000
"""Most task changes one ``td_commit`` statement carries (a change of more is a transaction
of several statements)."""
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


def _refused(exc: psycopg.Error) -> bool:
    """Whether the database refused the data itself (SQLSTATE class 22, data exception, or
    23, integrity constraint violation): the same statement fails the same way again."""
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError) or (
        exc.sqlstate or ""
    ).startswith(("22", "23"))


def _no_nul(text: str | None) -> str | None:
    """``text`` as a ``text`` column holds it: a NUL character (which PostgreSQL refuses in
    text) becomes U+FFFD. Only for the run history, which shows runs and restores nothing."""
    return text.replace("\x00", "\ufffd") if text is not None and "\x00" in text else text


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
        "error": _no_nul(event.error),
        "worker": _no_nul(event.worker),
        "extra": jsonb_text(orjson.dumps(dict(event.extra)).decode()) if event.extra else None,
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
        error = PostgresStoreError(f"cluster {self.cluster!r}: {action} failed: {describe(exc)}")
        error.transient = not _refused(exc)
        return error

    def close(self) -> None:
        """Close the connection (a later call opens another)."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    # ------------------------------------------------------------------ reading

    def load(self, *, defer_tasks: bool = False) -> StoredState | None:
        """The cluster's state as one consistent snapshot (None: nothing was ever stored).

        ``defer_tasks``: when every task is sealed and no record is kept, the tasks are left
        unparsed in :attr:`StoredState.sealed_tasks` (a loader validates them from there).
        """
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
                    restored, sealed, joined = _read_tasks(connection, cluster, defer=defer_tasks)
                    kept = connection.execute(
                        "SELECT raw FROM td_kept WHERE cluster = %s ORDER BY seq", cluster
                    ).fetchall()
                    accounts = connection.execute(_ORDERS, cluster).fetchall()
            except psycopg.Error as exc:
                raise self._failed("loading", exc) from exc
        if meta is None and not sealed and not kept:
            return None
        if kept and joined is not None:  # kept records: each task is checked again
            restored, joined = orjson.loads(joined), None
        saved_at, zone, extra = meta if meta is not None else (None, None, "{}")
        kept_raws = [json.loads(raw) for (raw,) in kept]
        return StoredState(
            tasks=[*restored, *kept_raws],
            account_tasks=dict(accounts),
            kept=kept_raws,
            extra=json.loads(extra),
            timezone=zone,
            saved_at=saved_at,
            sealed=sealed,
            sealed_tasks=joined,
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
        extra_text = json.dumps(extra, ensure_ascii=False)
        with self._lock:
            try:
                connection = self._conn()
                if full is not None:
                    with connection.transaction():
                        check_fence(connection, fence)
                        connection.execute(_META, (cluster, stamp, timezone, extra_text))
                        with connection.cursor() as cursor:
                            self._replace(cursor, full)
                            self._applied(cursor, applied)
                            self._record(cursor, runs)
                    return
                pairs = list(changes)
                history = list(runs)
                last = _statement(
                    fence, stamp, timezone, extra_text, pairs[-_CHUNK:], orders, moves, applied
                )
                if len(pairs) <= _CHUNK and not history:
                    # One statement, one implicit transaction, one round trip.
                    connection.execute(_COMMIT, last)
                    return
                with connection.transaction(), connection.cursor() as cursor:
                    # A change of very many tasks: a statement per chunk of them (each
                    # statement is bounded by the connection's statement timeout).
                    firsts = len(pairs) - len(pairs[-_CHUNK:])
                    for at in range(0, firsts, _CHUNK):
                        chunk = pairs[at : min(at + _CHUNK, firsts)]
                        cursor.execute(
                            _COMMIT,
                            _statement(fence, stamp, timezone, extra_text, chunk, {}, (), ()),
                        )
                    cursor.execute(_COMMIT, last)
                    self._record(cursor, history)
            except psycopg.Error as exc:
                if exc.sqlstate == STALE_SQLSTATE:
                    raise _stale(fence, exc) from None
                raise self._failed("committing", exc) from exc

    def _applied(self, cursor: psycopg.Cursor[Any], applied: Iterable[tuple[str, str]]) -> None:
        rows = [(self.cluster, run_id, kind) for run_id, kind in applied]
        if rows:
            cursor.executemany(_APPLIED, rows)

    def _replace(self, cursor: psycopg.Cursor[Any], full: FullState) -> None:
        cluster = self.cluster
        for table in ("td_tasks", "td_kept", "td_order", "td_accounts"):
            cursor.execute(f"DELETE FROM {table} WHERE cluster = %s", (cluster,))
        # COPY assigns each row the next seq in the order written: the file's order.
        with cursor.copy(
            "COPY td_tasks (cluster, task_id, account_id, record, record_text, sealed) FROM STDIN"
        ) as copy:
            for row in full.rows:
                copy.write_row(
                    (
                        cluster,
                        row.task_id,
                        row.account_id,
                        jsonb_text(row.text),
                        row.text,
                        row.sealed,
                    )
                )
        with cursor.copy("COPY td_kept (cluster, task_id, raw) FROM STDIN") as copy:
            for raw in full.kept:
                task_id = raw.get("task_id") if isinstance(raw, dict) else None
                copy.write_row(
                    (cluster, task_id if isinstance(task_id, str) else None, verbatim(raw))
                )
        # Every account's order in one parameter, laid out by the server (an id listed twice
        # keeps its first place; an account without ids is not stored).
        orders = orjson.dumps([[a, ids] for a, ids in full.account_tasks.items() if ids]).decode()
        cursor.execute(_ACCOUNTS, (cluster, orders))
        cursor.execute(_ORDER, (cluster, orders))

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


def _statement(
    fence: Fence,
    stamp: str,
    timezone: str | None,
    extra_text: str,
    changes: Sequence[tuple[str, TaskRow | None]],
    orders: dict[str, list[str]] | None,
    moves: Iterable[tuple[str, str, str | None]],
    applied: Iterable[tuple[str, str]],
) -> list[Any]:
    """The parameters of :data:`_COMMIT`."""
    ids: list[str] = []
    accounts: list[str | None] = []
    texts: list[str | None] = []
    sealed: list[bool | None] = []
    for task_id, row in changes:
        ids.append(task_id)
        if row is None:
            accounts.append(None)
            texts.append(None)
            sealed.append(None)
        else:
            accounts.append(row.account_id)
            texts.append(row.text)
            sealed.append(row.sealed)
    return [
        fence.cluster,
        fence.holder,
        fence.epoch,
        stamp,
        timezone,
        extra_text,
        ids,
        accounts,
        texts,
        sealed,
        orjson.dumps(list((orders or {}).items())).decode(),
        orjson.dumps(list(moves)).decode(),
        orjson.dumps(list(applied)).decode(),
    ]


def _stale(fence: Fence, exc: psycopg.Error) -> StaleLeaderError:
    """The error of a commit ``td_commit`` refused for its epoch (DETAIL: the lease found)."""
    try:
        found = json.loads(exc.diag.message_detail or "{}")
    except ValueError:
        found = {}
    return StaleLeaderError(
        fence.cluster, fence.epoch, int(found.get("epoch") or 0), found.get("holder")
    )
