"""``PostgresStorage``: a cluster's state in PostgreSQL behind the ``StateStore`` port.

A thin adapter. Ownership is the cluster's lease (:class:`~jobstores.postgres.lease.Leadership`):
:meth:`~PostgresStorage.acquire` takes it or names the instance that leads, and a thread
renews it while this object owns the state. A load restores the records through the same
path as the JSON stores (:func:`jobstores.loading.restore`); each commit is one fenced
:meth:`~jobstores.postgres.state.PostgresState.commit`. Every SQL statement, the schema, the
lease and the fencing live in :mod:`jobstores.postgres.state`,
:mod:`jobstores.postgres.schema` and :mod:`jobstores.postgres.lease`.

URLs name the store as ``postgresql://user@host/db`` (or ``postgres://``); query parameters
``cluster`` and ``lease`` (seconds) are read here and not passed to libpq. Every text that
names the database masks the URL's password.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from jobstores.format import Document
from jobstores.loading import restore
from jobstores.postgres.connection import connector
from jobstores.postgres.errors import PostgresStoreError, StaleLeaderError, describe
from jobstores.postgres.lease import (
    DEFAULT_CLUSTER,
    DEFAULT_LEASE,
    Fence,
    Leadership,
    read_lease,
)
from jobstores.postgres.runs import RunTable
from jobstores.postgres.state import FullState, PostgresState, TaskRow
from jobstores.state import StoredState
from jobstores.storage import _filled, _trust
from jobstores.table import StateImage
from tasks.errors import NotLeaderError
from tasks.model import TaskRecord
from tasks.schedule import utc_now
from tasks.secrets import mask_text
from tasks.zones import choose_timezone, zone_key

__all__ = ["PostgresStorage", "masked_url", "split_store_url"]

logger = logging.getLogger(__name__)

_OWN_PARAMETERS = ("cluster", "lease")
LEASE_APPLICATION = "task-dispatcher lease"
"""The ``application_name`` of the lease's connections (the state's: ``task-dispatcher``)."""


def masked_url(url: str) -> str:
    """``url`` with its password (and any secret-looking parameter) masked."""
    return mask_text(url)


def split_store_url(url: str) -> tuple[str, str, float]:
    """``(libpq URL, cluster, lease)`` of a store URL: its ``cluster`` and ``lease`` query
    parameters are this store's, the rest is the database's. Raises :class:`ValueError`
    naming the parameter (the URL masked)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {key: value for key, value in query if key in _OWN_PARAMETERS}
    rest = [(key, value) for key, value in query if key not in _OWN_PARAMETERS]
    cluster = own.get("cluster") or DEFAULT_CLUSTER
    try:
        lease = float(own.get("lease", DEFAULT_LEASE))
    except ValueError:
        raise ValueError(f"store: lease must be a number of seconds in {masked_url(url)}") from None
    if not lease > 0:
        raise ValueError(f"store: lease must be positive in {masked_url(url)}")
    scheme = "postgresql" if parts.scheme.lower() in ("postgres", "postgresql") else parts.scheme
    dsn = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
    return dsn, cluster, lease


class PostgresStorage:
    """A cluster's state in PostgreSQL, owned through its lease, committed fenced.

    Every commit carries the fencing epoch of the lease held at that instant
    (:meth:`~jobstores.postgres.lease.Leadership.fence`): an instance that does not lead
    now, or was taken over, raises an ``OSError`` and changes nothing. The database holds
    every change once a commit returns, so a commit never needs the whole state: a full
    image is written whole only when it is the first one after a load that repaired what it
    read (a task row set aside as unrestorable, a kept record restorable again, the zone
    converted), or when it keeps other unrestorable records than the tables. A plain load
    writes nothing back: a full image after it (a store below the snapshot threshold, a
    dispatcher's final save) commits only the changes it carries.

    ``where`` names the state in messages (the database's URL, masked, and the cluster).
    """

    def __init__(
        self,
        state: PostgresState,
        leadership: Leadership,
        *,
        where: str | None = None,
        timezone_key: str | None = None,
    ) -> None:
        self.state = state
        self.leadership = leadership
        self.where = where or f"PostgreSQL cluster {state.cluster!r}"
        """What messages name the state by: the database (masked) and the cluster."""
        self.path = Path(f"postgresql-{state.cluster}")
        """What ``TaskDispatcher.state_file`` names the store by (there is no file)."""
        self.timezone_key = timezone_key
        """The zone the state records for its hour windows."""
        self._replace_next = True
        self._kept: list[Any] = []
        """The kept records the tables hold (the objects of the last load or full write): a
        full image keeping others is written whole."""

    @classmethod
    def for_url(
        cls,
        url: str,
        *,
        cluster: str | None = None,
        lease: float | None = None,
        holder: str | None = None,
        advertise_url: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> PostgresStorage:
        """The store at ``url`` (``postgresql://user@host/db[?cluster=NAME&lease=SECONDS]``);
        ``cluster``/``lease`` given here win over the URL's; ``holder`` is this instance's
        id in the lease, ``advertise_url`` where it serves its control API while it leads."""
        dsn, url_cluster, url_lease = split_store_url(url)
        cluster = cluster or url_cluster
        lease = url_lease if lease is None else lease
        options: dict[str, Any] = {"holder": holder}
        if clock is not None:
            options["clock"] = clock
        leadership = Leadership(
            connector(dsn, timeout=lease / 3, application_name=LEASE_APPLICATION),
            cluster,
            lease=lease,
            url=advertise_url,
            **options,
        )
        state = PostgresState(
            connector(dsn, timeout=max(5.0, lease), idle_in_transaction=lease / 3), cluster
        )
        return cls(state, leadership, where=f"cluster {cluster!r} of {masked_url(dsn)}")

    def renewed(self) -> PostgresStorage:
        """A new storage of the same database and cluster, owning nothing: its lease a new
        one with this one's settings (length, advertised URL, clock) and this instance's id.
        What an instance that lost the lease campaigns with, as ``run`` opens the store anew
        (this one's thread and state are not used again)."""
        old = self.leadership
        leadership = Leadership(
            old._connect,
            old.cluster,
            lease=old.lease,
            holder=old.holder,
            url=old.url,
            clock=old._clock,
        )
        state = PostgresState(self.state._connect, self.state.cluster)
        return PostgresStorage(state, leadership, where=self.where, timezone_key=self.timezone_key)

    # ------------------------------------------------------------------ ownership

    @property
    def owned(self) -> bool:
        """Whether this object leads the cluster at this instant."""
        return self.leadership.is_leader_now()

    def acquire(self) -> None:
        """Take the cluster's lease at once (renewed by a thread while held), or raise
        :class:`~tasks.errors.NotLeaderError` naming the state and the instance that leads
        (:class:`~jobstores.postgres.errors.PostgresStoreError` when the database cannot
        be reached)."""
        leadership = self.leadership
        if not leadership.is_leader_now():
            if not leadership.try_acquire():
                leadership.stop(release=False)  # no connection is kept while standing by
                if leadership.last_error is not None:
                    raise PostgresStoreError(
                        f"{self.where}: cannot take the lease: {leadership.last_error}"
                    )
                raise self._in_use()
            self._replace_next = True
        leadership.start(campaign=False)

    def _in_use(self) -> NotLeaderError:
        holder = url = None
        epoch = None
        try:
            with self.leadership._connect() as connection:
                found = read_lease(connection, self.leadership.cluster)
        except psycopg.Error as exc:
            logger.debug("reading the lease failed: %s", describe(exc))
            found = None
        if found is not None:
            holder, url, epoch = found.holder, found.holder_url, found.epoch
        by = f" by {holder!r}" if holder else " by another instance"
        at = f" (serving at {url})" if url else ""
        return NotLeaderError(
            f"{self.where} is in use{by}{at}, which leads it; this instance stands by",
            leader_url=url,
            leader_id=holder,
            epoch=epoch,
        )

    def release(self) -> None:
        """Stop renewing and give the lease up (a no-op when not held); no connection is
        left open."""
        self.leadership.stop(release=True)
        self.state.close()

    # ------------------------------------------------------------------ loading

    def load(
        self,
        zone: tzinfo | None,
        *,
        convert: bool = False,
        now: datetime | None = None,
        accept: Callable[[TaskRecord], None] | None = None,
        fraction: Callable[[], float] | None = None,
    ) -> StoredState:
        """Leading: read the cluster's state in one transaction and restore its records
        (as the JSON stores do, :func:`~jobstores.loading.restore`)."""
        if not self.leadership.is_leader_now():
            raise RuntimeError(f"{self.where} is not owned: acquire() it first")
        self._replace_next = True
        state, document, rows = self._read(zone, convert=convert, owner=True)
        if document is None:
            self._replace_next = False
            return state
        restored = restore(
            document.tasks,
            state.timezone,
            parsed_json=document.parsed_json,
            now=now or utc_now().astimezone(state.timezone),
            accept=accept,
            fraction=fraction,
            trusted=_trust(document),
            sealed=document.sealed_tasks,
        )
        # What the tables hold is what was restored (every task row restored, every kept
        # record kept, the same objects) unless the load repaired something: only then is it
        # written whole.
        self._kept = [raw for raw, _ in restored.kept]
        stored_kept = document.tasks[rows:]  # the task rows' objects come first
        converted = state.recorded_zone is not None and state.recorded_zone != self.timezone_key
        self._replace_next = converted or not _same(self._kept, stored_kept)
        return _filled(state, document, restored.records, restored.kept)

    def read(self, zone: tzinfo | None = None, *, convert: bool = False) -> StoredState:
        """The cluster's state in one read-only transaction, without the lease (records are
        validated, not made consistent)."""
        state, document, _ = self._read(zone, convert=convert, owner=False)
        if document is None:
            return state
        restored = restore(
            document.tasks,
            state.timezone,
            parsed_json=document.parsed_json,
            sealed=document.sealed_tasks,
        )
        return _filled(state, document, restored.records, restored.kept)

    def _read(
        self, zone: tzinfo | None, *, convert: bool, owner: bool
    ) -> tuple[StoredState, Document | None, int]:
        """The state's zone settled, its document, and how many task rows it holds."""
        try:
            stored = self.state.load(defer_tasks=True)
        finally:
            if not owner:  # a reader holds no connection between reads
                self.state.close()
        document = None if stored is None else stored.document()
        recorded = document.timezone if document is not None else None
        settled = choose_timezone(zone, recorded, self.path, convert=convert)
        if owner:
            self.timezone_key = zone_key(settled)
            if recorded is not None and self.timezone_key != recorded:
                logger.warning(
                    "%s: converting the store from %s to %s as asked: hour windows and end "
                    "dates are now read in %s",
                    self.where,
                    recorded,
                    settled,
                    settled,
                )
        rows = 0 if stored is None else len(stored.sealed)
        return StoredState(timezone=settled, recorded_zone=recorded), document, rows

    # ------------------------------------------------------------------ committing

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Make ``image`` durable in one fenced transaction (raises an ``OSError``); a
        commit refused for a newer epoch makes this instance stop leading at once."""
        try:
            self._commit(image, saved_at, self.leadership.fence())
        except StaleLeaderError:
            self.leadership.step_down(
                "another instance took over (a newer epoch, found by a commit)"
            )
            raise

    def _commit(self, image: StateImage, saved_at: datetime, fence: Fence) -> None:
        if image.full and (self._replace_next or not _same(image.kept, self._kept)):
            self.state.commit(
                fence,
                saved_at=saved_at,
                timezone=self.timezone_key,
                extra=image.extra,
                full=FullState(
                    list(map(TaskRow.of, image.records)), image.kept, image.account_tasks
                ),
            )
            self._replace_next = False
            self._kept = list(image.kept)
            return
        self.state.commit(
            fence,
            saved_at=saved_at,
            timezone=self.timezone_key,
            extra=image.extra,
            changes=(
                (task_id, None if record is None else TaskRow.of(record))
                for task_id, record in image.changes
            ),
            orders=image.orders,
            moves=image.moves,
        )

    def wants_full_image(self, *, closing: bool = False) -> bool:
        """Never: the database holds every change once it is committed."""
        return False

    def fold_due_in(self) -> float | None:
        """Never: there is nothing to fold."""
        return None

    def run_table(self) -> RunTable:
        """The cluster's run history (``td_runs``), with connections of its own: a
        dispatcher on this store records and reads its runs there, so every instance of the
        cluster shows the same history."""
        return RunTable(self.state._connect, self.state.cluster)

    def close(self) -> None:
        """Close the state's connection (the lease is given up by :meth:`release`)."""
        self.state.close()


def _same(objects: Sequence[Any], others: Sequence[Any]) -> bool:
    """Whether two sequences hold the same objects, in the same order."""
    return len(objects) == len(others) and all(map(operator.is_, objects, others))


def open_url(url: str, directory: Path) -> PostgresStorage:
    """The opener of :data:`jobstores.stores.URL_SCHEMES` for ``postgresql://`` URLs."""
    return PostgresStorage.for_url(url)
