"""Leadership of a cluster: a lease in PostgreSQL with a fencing epoch.

One row of ``td_leases`` per cluster holds the leader (``holder``, ``holder_url``), the
instant its lease runs out on the **database's** clock (``expires_at``) and the **epoch**,
which increases at every takeover and never goes back. An instance takes the lease when no
one holds it or the holder's lease ran out (by the database's clock); the leader renews it
every ``lease / 3`` seconds.

The leader never trusts the database's clock for itself: it keeps a deadline on its own
monotonic clock, read *before* each successful acquisition or renewal was sent, plus
``lease``. The database set the expiry from an instant at or after that one, so the
leader's own deadline passes first: it stops leading before anyone may take over.
:meth:`Leadership.is_leader_now` is that check, to be made before starting or sending a run.

Fencing: every commit of the store takes the cluster's fencing lock shared and checks, in its
own transaction, that the lease row still carries the committer's epoch
(:func:`check_fence`); a takeover takes the same lock exclusively before it raises the epoch.
A commit is therefore ordered entirely before or after a takeover, and one from a deposed
leader is refused (:class:`~jobstores.postgres.errors.StaleLeaderError`) and changes nothing.
Renewals take no such lock, so a long commit does not hold them up.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from jobstores.postgres.connection import connector
from jobstores.postgres.errors import (
    NotLeadingError,
    PostgresStoreError,
    StaleLeaderError,
    describe,
)
from jobstores.postgres.schema import LOCK_CLASS, ensure_schema

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_LEASE",
    "Fence",
    "Leadership",
    "LeaseHolder",
    "check_fence",
    "fencing_lock",
    "new_holder_id",
    "read_lease",
]

logger = logging.getLogger(__name__)

DEFAULT_CLUSTER = "default"
DEFAULT_LEASE = 10.0
"""Seconds a lease lasts unless renewed."""


def new_holder_id() -> str:
    """An id for this instance: host, process and a random part (unique across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Fence:
    """What a commit of the leader carries: its cluster, its id and the epoch it leads in."""

    cluster: str
    holder: str
    epoch: int


@dataclass(frozen=True)
class LeaseHolder:
    """The lease row of a cluster as read (``holder`` None: released)."""

    cluster: str
    epoch: int
    holder: str | None
    holder_url: str | None
    valid: bool
    """Whether the lease had not run out by the database's clock when read."""


def fencing_lock(connection: psycopg.Connection[Any], cluster: str, *, shared: bool) -> None:
    """Take the cluster's fencing lock for the current transaction (shared: a commit;
    exclusive: a takeover)."""
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    connection.execute(f"SELECT {function}(%s, hashtext(%s))", (LOCK_CLASS, cluster))


def check_fence(connection: psycopg.Connection[Any], fence: Fence) -> None:
    """Inside a commit's transaction: take the fencing lock shared and raise
    :class:`StaleLeaderError` unless the cluster is still at ``fence``'s epoch and holder."""
    fencing_lock(connection, fence.cluster, shared=True)
    row = connection.execute(
        "SELECT epoch, holder FROM td_leases WHERE cluster = %s", (fence.cluster,)
    ).fetchone()
    epoch, holder = (0, None) if row is None else (int(row[0]), row[1])
    if epoch != fence.epoch or holder != fence.holder:
        raise StaleLeaderError(fence.cluster, fence.epoch, epoch, holder)


def read_lease(connection: psycopg.Connection[Any], cluster: str) -> LeaseHolder | None:
    """The lease row of ``cluster`` (None: no one ever led it)."""
    row = connection.execute(
        "SELECT epoch, holder, holder_url, expires_at > now() FROM td_leases WHERE cluster = %s",
        (cluster,),
    ).fetchone()
    if row is None:
        return None
    return LeaseHolder(cluster, int(row[0]), row[1], row[2], bool(row[3]) and row[1] is not None)


_TAKE = """
INSERT INTO td_leases AS l (cluster, epoch, holder, holder_url, expires_at, renewed_at)
VALUES (%(cluster)s, 1, %(holder)s, %(url)s, now() + make_interval(secs => %(lease)s), now())
ON CONFLICT (cluster) DO UPDATE SET
    epoch = l.epoch + 1,
    holder = excluded.holder,
    holder_url = excluded.holder_url,
    expires_at = excluded.expires_at,
    renewed_at = excluded.renewed_at
WHERE l.holder IS NULL OR l.expires_at <= now()
RETURNING epoch
"""
# A takeover always raises the epoch, even when the same instance takes the lease again: a
# commit made under the old epoch (from before it lost the lease) can never pass the check.

_RENEW = """
UPDATE td_leases SET expires_at = now() + make_interval(secs => %(lease)s), renewed_at = now()
WHERE cluster = %(cluster)s AND holder = %(holder)s AND epoch = %(epoch)s
RETURNING epoch
"""

_RELEASE = """
UPDATE td_leases SET holder = NULL, holder_url = NULL, expires_at = now()
WHERE cluster = %(cluster)s AND holder = %(holder)s AND epoch = %(epoch)s
"""


class Leadership:
    """One instance's claim on a cluster's lease.

    ``connect()`` opens a new connection (autocommit; the lease has one of its own, never
    shared with commits). ``clock`` is a monotonic clock in seconds, injectable for tests.
    ``on_step_down(reason)`` is called once each time this instance stops leading (a newer
    epoch found, the lease run out by its own clock, or released); it runs on the thread that
    noticed, so it must only set flags or hand work over. ``on_lead(epoch)`` is called, the
    same way, each time this instance takes the lease (it must load the state afresh: another
    leader may have changed it).

    :meth:`for_url` makes one whose connections are bounded by a third of the lease. Driven by
    hand (:meth:`try_acquire`, :meth:`renew`, :meth:`check`) or by
    :meth:`start`, which runs a thread that campaigns while standing by and renews every
    ``lease / 3`` seconds while leading.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        cluster: str = DEFAULT_CLUSTER,
        *,
        lease: float = DEFAULT_LEASE,
        holder: str | None = None,
        url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_step_down: Callable[[str], None] | None = None,
        on_lead: Callable[[int], None] | None = None,
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease: must be a positive number of seconds, not {lease!r}")
        self._connect = connect
        self.cluster = cluster
        self.lease = float(lease)
        self.holder = holder or new_holder_id()
        """This instance's id in the lease row."""
        self.url = url
        """The URL this instance advertises to the others while it leads."""
        self._clock = clock
        self.on_step_down = on_step_down
        self.on_lead = on_lead
        self._database = threading.Lock()
        """Held while this instance speaks to the database (one statement at a time)."""
        self._state = threading.Lock()
        """Guards the epoch and the deadline; never held while waiting for the database, so
        that :meth:`check` and :meth:`fence` answer at once even while a renewal hangs."""
        self._connection: psycopg.Connection[Any] | None = None
        self._epoch: int | None = None
        self._deadline = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        """The last failure to reach the database (None once it worked again)."""

    @classmethod
    def for_url(
        cls,
        url: str,
        cluster: str = DEFAULT_CLUSTER,
        *,
        lease: float = DEFAULT_LEASE,
        **options: Any,
    ) -> Leadership:
        """A leadership of ``cluster`` in the database at ``url`` (a libpq URL), each of its
        connections bounded by ``lease / 3`` (connecting, statements, network writes), so
        that a database that stops answering never holds a renewal past the deadline."""
        return cls(connector(url, timeout=lease / 3), cluster, lease=lease, **options)

    # ------------------------------------------------------------------ state

    @property
    def epoch(self) -> int | None:
        """The epoch this instance leads in (None: it does not lead)."""
        return self._epoch

    @property
    def deadline(self) -> float:
        """When the lease runs out by this instance's monotonic clock (if it leads)."""
        return self._deadline

    @property
    def role(self) -> str:
        """``"leader"`` while :meth:`is_leader_now`, else ``"standby"``."""
        return "leader" if self.is_leader_now() else "standby"

    def is_leader_now(self) -> bool:
        """Whether this instance leads at this instant: it took the lease and its own
        monotonic deadline has not passed. Ask it before starting or sending a run."""
        return self._epoch is not None and self._clock() < self._deadline

    def check(self) -> bool:
        """:meth:`is_leader_now`, stepping down (once) when the deadline has passed."""
        if self._epoch is not None and self._clock() >= self._deadline:
            self.step_down("its lease ran out before it could be renewed")
        return self.is_leader_now()

    def fence(self) -> Fence:
        """What a commit carries; raises :class:`NotLeadingError` unless leading now."""
        epoch = self._epoch
        if epoch is None or not self.check():
            raise NotLeadingError(self.cluster, "it holds no valid lease")
        return Fence(self.cluster, self.holder, epoch)

    # ------------------------------------------------------------------ one step each

    def _conn(self) -> psycopg.Connection[Any]:
        connection = self._connection
        if connection is None or connection.closed:
            connection = self._connect()
            connection.autocommit = True
            try:
                ensure_schema(connection)
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except psycopg.Error:
                logger.debug("closing the lease connection failed", exc_info=True)

    def try_acquire(self) -> bool:
        """One attempt to take the lease (when free or run out by the database's clock).

        Returns whether this instance leads now. A database that cannot be reached is a
        failed attempt (:attr:`last_error` says why).
        """
        if self._epoch is not None:
            return self.check()
        with self._database:
            sent = self._clock()
            try:
                connection = self._conn()
                with connection.transaction():
                    fencing_lock(connection, self.cluster, shared=False)
                    row = connection.execute(
                        _TAKE,
                        {
                            "cluster": self.cluster,
                            "holder": self.holder,
                            "url": self.url,
                            "lease": self.lease,
                        },
                    ).fetchone()
            except psycopg.Error as exc:
                self._failed(exc)
                return False
            self.last_error = None
        if row is None:
            return self.check()  # (led already, if another thread took it meanwhile)
        epoch = int(row[0])
        with self._state:
            # The deadline first: a reader of the epoch (without the lock) sees a valid one.
            self._deadline = sent + self.lease
            self._epoch = epoch
        logger.info(
            "cluster %r: %s leads at epoch %d (lease %gs)",
            self.cluster,
            self.holder,
            epoch,
            self.lease,
        )
        if self.on_lead is not None:
            self.on_lead(epoch)
        return True

    def renew(self) -> bool:
        """One renewal of a lease held. Returns whether this instance still leads.

        A lease row at another epoch or holder (someone took over) steps down at once; a
        database that cannot be reached leaves the deadline as it was (:meth:`check` steps
        down once it passes).
        """
        epoch = self._epoch
        if epoch is None:
            return False
        with self._database:
            sent = self._clock()
            try:
                row = (
                    self._conn()
                    .execute(
                        _RENEW,
                        {
                            "cluster": self.cluster,
                            "holder": self.holder,
                            "epoch": epoch,
                            "lease": self.lease,
                        },
                    )
                    .fetchone()
                )
            except psycopg.Error as exc:
                self._failed(exc)
                row = ()
            else:
                self.last_error = None
        if row is None:
            self.step_down("another instance took over (a newer epoch)")
            return False
        if row:
            with self._state:
                if self._epoch == epoch and sent < self._deadline:
                    # A renewal sent after the deadline passed cannot revive the lease: this
                    # instance already stopped leading and another may have taken over.
                    self._deadline = sent + self.lease
        return self.check()

    def release(self) -> None:
        """Give the lease up (another instance may take it at once) and stop leading."""
        epoch = self._epoch
        with self._database:
            if epoch is not None:
                try:
                    self._conn().execute(
                        _RELEASE, {"cluster": self.cluster, "holder": self.holder, "epoch": epoch}
                    )
                except psycopg.Error as exc:
                    self._failed(exc)
        if epoch is not None:
            self.step_down("it released the lease", error=False)

    def _failed(self, exc: psycopg.Error) -> None:
        self.last_error = describe(exc)
        logger.warning("cluster %r: the lease database failed: %s", self.cluster, self.last_error)
        self._drop_connection()

    def step_down(self, reason: str, *, error: bool = True) -> None:
        """Stop leading now (once: one ERROR unless ``error`` is False, and the callback)."""
        with self._state:
            epoch, self._epoch = self._epoch, None
            self._deadline = 0.0
        if epoch is None:
            return
        if error:
            logger.error(
                "cluster %r: %s stops leading (epoch %d): %s",
                self.cluster,
                self.holder,
                epoch,
                reason,
            )
        if self.on_step_down is not None:
            self.on_step_down(reason)

    # ------------------------------------------------------------------ the thread

    def start(self, *, campaign: bool = True) -> None:
        """Campaign (standby) and renew (leader) on a thread of its own until :meth:`stop`.

        ``campaign=False``: only renew the lease held; the thread ends once this instance
        stops leading (an owner that must load the state afresh before leading again).
        """
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run,
            args=(campaign,),
            name=f"task-dispatcher lease {self.cluster}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, campaign: bool = True) -> None:
        interval = self.lease / 3
        while not self._stopping.is_set():
            if self._epoch is None and not campaign:
                return
            try:
                if self._epoch is None:
                    self.try_acquire()
                else:
                    self.renew()
            except PostgresStoreError as exc:  # a newer schema: nothing to lead here
                if self.last_error != str(exc):
                    logger.error("cluster %r: cannot campaign: %s", self.cluster, exc)
                self.last_error = str(exc)
            wait = interval
            if self._epoch is not None:
                # Wake at the deadline at the latest, to step down on time.
                wait = min(interval, max(0.0, self._deadline - self._clock()))
            self._stopping.wait(wait)
            self.check()

    def stop(self, *, release: bool = True) -> None:
        """Stop the thread; give the lease up (``release``); close the connection."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if release:
            self.release()
        with self._database:
            self._drop_connection()
