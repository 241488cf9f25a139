"""``TaskTable``: the one owner of task records, account order and unrestorable records.

Every read and change takes the table's lock, which is never held while writing to disk or
while waiting for another lock (the saver captures what to write under it, then writes
without it). Each change bumps a version; the saver writes versions, so it knows what is
durable. Listeners (APScheduler's job view) hear of every record change under the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from jobstores.changelog import ChangeBatch, ChangeLog
from jobstores.kept import KeptRecords
from jobstores.order import UNKNOWN_POSITION, AccountOrder
from jobstores.pacing import PAUSE, PAUSE_EVERY, pause
from tasks.errors import DispatcherClosedError, InvalidTaskError, TaskNotFoundError
from tasks.model import TaskRecord

__all__ = ["PAUSE", "PAUSE_EVERY", "Change", "ChangeBatch", "StateImage", "TaskTable", "pause"]

_RELEASE_IN_PIECES = 4096  # changes in a batch above which it is let go of piecemeal
_TASK_ID = attrgetter("task_id")
Change = Callable[[str, TaskRecord | None, TaskRecord | None], None]
"""A listener: ``(task_id, old record or None when added, new record or None when removed)``,
called under the lock (old and new are the same record when only the task's order changed)."""


@dataclass(frozen=True)
class StateImage:
    """What is saved, captured at one version of the table.

    A *full* image carries the whole state (``records``, ``account_tasks``, ``kept``,
    ``extra``); any image carries the changes not yet durable (``changes``, ``orders``,
    ``moves``), all a backend that writes changes only needs. Capturing a full image copies
    every record reference, so a journal asks for one only when it folds itself into a
    snapshot.
    """

    version: int
    records: Sequence[TaskRecord]
    """Every restored record, in file order (empty unless ``full``)."""
    account_tasks: dict[str, list[str]]
    """Account id -> task ids in priority order, unrestorable ones last (empty unless
    ``full``)."""
    kept: Sequence[Any]
    """Records that could not be restored, as they were read (empty unless ``full``)."""
    extra: dict[str, Any]
    """Top-level keys of the document this code does not interpret, kept as they were."""
    full: bool = True
    """Whether ``records``, ``account_tasks`` and ``kept`` hold the whole state."""
    requested: bool = False
    """Whether the state file itself must hold this image when the commit returns: the owner
    asked for the whole state to be written (:meth:`TaskTable.touch`), or the store is small
    enough that every commit writes it (``current_below`` of :meth:`TaskTable.capture`). A
    journal then writes its snapshot before the commit returns."""
    changes: ChangeBatch = field(default_factory=ChangeBatch)
    """The latest record of each id in ``changed`` (None: removed), in the order the ids
    first changed: replaying them in this order appends new tasks in their account order."""
    orders: dict[str, list[str]] = field(default_factory=dict)
    """The whole priority order (unrestorable ids last) of each account where many tasks
    were reordered since the last durable version (see
    :data:`~jobstores.order.MOVES_PER_ACCOUNT`)."""
    moves: list[tuple[str, str, str | None]] = field(default_factory=list)
    """``(account, task id, the id it now stands before or None when last)`` for each task
    reordered since the last durable version, in an account with few of them: applied in
    this order after ``changes`` (which remove and append tasks), they give every account
    its current order, at a cost per reordered task, not per task of the account."""

    @property
    def changed(self) -> frozenset[str]:
        """Task ids whose latest change is not durable yet (for backends that write changes
        only); a removed task's id is here and not in ``records``."""
        return frozenset(self.changes.task_ids)


class TaskTable:
    """Task records by id, each account's task order, and the records kept unrestored."""

    def __init__(self, description: str = "task table") -> None:
        self.lock = threading.RLock()
        """Guards everything here; the scheduler shares it as its job store lock."""
        self._description = description
        self._records: dict[str, TaskRecord] = {}
        self._order = AccountOrder(self.lock)
        self._kept = KeptRecords()
        self.extra: dict[str, Any] = {}
        """Top-level document keys this code does not interpret (kept across saves)."""
        self.version = 0
        """Bumped by every change."""
        self._log = ChangeLog()
        """The changes not durable yet."""
        self._listeners: list[Change] = []
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def load(
        self,
        records: Sequence[TaskRecord],
        kept: Iterable[tuple[Any, str | None]],
        order_hint: dict[str, list[str]],
    ) -> None:
        """Fill an empty table with what the storage read (``kept``: raw records with their
        task id, if they have one)."""
        records = records if isinstance(records, list) else list(records)
        with self.lock:
            self._records.update(zip(map(_TASK_ID, records), records, strict=True))
            self._kept.load(kept)
            for account, task_id in self._order.load(self._records, order_hint):
                if task_id in self._kept:
                    found = self._records.get(task_id)
                    if found is None or found.account_id != account:
                        self._kept.place(account, task_id)

    def listen(self, listener: Change) -> None:
        """Call ``listener(task_id, old, new)`` after every record change (under the lock)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ queries

    @property
    def closed(self) -> bool:
        """Whether the table was closed (it then refuses changes)."""
        return self._closed

    def find(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``, or None."""
        return self._records.get(task_id)

    def get(self, task_id: str) -> TaskRecord:
        """The record of ``task_id``; raises :class:`TaskNotFoundError`."""
        try:
            return self._records[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[TaskRecord]:
        """Every restored record, in file order."""
        with self.lock:
            return list(self._records.values())

    def account_tasks(self) -> dict[str, list[str]]:
        """Account id -> its task ids in priority order (a copy)."""
        with self.lock:
            return self._order.accounts()

    @property
    def order_version(self) -> int:
        """Bumped whenever a task's position within its account may have changed."""
        return self._order.version

    def position(self, task_id: str) -> int:
        """``task_id``'s 0-based priority within its account (large if unknown)."""
        record = self._records.get(task_id)
        if record is None:
            return UNKNOWN_POSITION
        return self._order.position(record.account_id, task_id)

    def rank(self, task_id: str) -> float:
        """A number that orders ``task_id`` within its account as :meth:`position` does
        (large if unknown), at a cost that does not grow with the account (see
        :meth:`AccountOrder.rank <jobstores.order.AccountOrder.rank>`)."""
        record = self._records.get(task_id)
        if record is None:
            return UNKNOWN_POSITION
        return self._order.rank(record.account_id, task_id)

    def kept_records(self) -> list[Any]:
        """Records that could not be restored, as read (they stay in the file)."""
        with self.lock:
            return self._kept.records()

    def taken(self, task_id: str) -> bool:
        """Whether ``task_id`` names a task, restored or kept."""
        return task_id in self._records or task_id in self._kept

    # ------------------------------------------------------------------ changes

    def _check_open(self) -> None:
        if self._closed:
            raise DispatcherClosedError(f"the {self._description} is closed")

    def _changed(self, task_id: str, old: TaskRecord | None, new: TaskRecord | None) -> None:
        self.version += 1
        self._log.changed(task_id, new)
        for listener in self._listeners:
            listener(task_id, old, new)

    def touch(self) -> None:
        """Make the next save write the whole state even if no task changed."""
        with self.lock:
            self.version += 1
            self._log.touch(self.version)

    def add(self, records: Sequence[TaskRecord]) -> None:
        """Add new tasks all together, or none of them (raises :class:`InvalidTaskError`)."""
        self._check_open()
        seen: set[str] = set()
        for record in records:
            if record.task_id in seen:
                raise InvalidTaskError(
                    "task_id", f"duplicate task id {record.task_id!r} in the batch"
                )
            seen.add(record.task_id)
        with self.lock:
            for record in records:
                if self.taken(record.task_id):
                    raise InvalidTaskError("task_id", f"a task with id {record.task_id!r} exists")
            for record in records:
                self._log.added(record.task_id)
                self._records[record.task_id] = record
                self._order.append(record.account_id, record.task_id)
                self._changed(record.task_id, None, record)
            self._order.version += 1

    def remove(self, task_id: str) -> TaskRecord:
        """Delete ``task_id`` for good; returns its last record."""
        self._check_open()
        with self.lock:
            record = self.get(task_id)
            del self._records[task_id]
            self._order.remove(record.account_id, task_id)
            self._changed(task_id, record, None)
            return record

    def update(self, task_id: str, change: Callable[[TaskRecord], TaskRecord]) -> TaskRecord:
        """Replace ``task_id``'s record with ``change(record)`` atomically; returns the new one.

        ``change`` runs under the lock: it must be a pure function (no I/O, no other lock).
        """
        self._check_open()
        with self.lock:
            old = self.get(task_id)
            new = change(old)
            if new is not old:
                self._records[task_id] = new
                self._changed(task_id, old, new)
            return new

    def reorder(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based) in its account's priority order."""
        self._check_open()
        with self.lock:
            record = self.get(task_id)
            size = self._order.size(record.account_id)
            if not 0 <= position < size:
                raise InvalidTaskError(
                    "position",
                    f"must be from 0 to {size - 1} for account {record.account_id!r}",
                )
            self._order.move(record.account_id, task_id, position)
            self._changed(task_id, record, record)
            self._log.moved(record.account_id, task_id)

    def close(self) -> None:
        """Refuse every change from now on."""
        self._closed = True

    # ------------------------------------------------------------------ for the saver

    def _account_order(self, account: str) -> list[str]:
        return [*self._order.of(account), *self._kept.order_of(account)]

    def capture(self, *, full: bool = True, current_below: int = 0) -> StateImage:
        """What to write now, at the current version: the whole state if ``full`` (or if
        :meth:`touch` asked for it since the last durable version, or if the table holds
        fewer than ``current_below`` tasks, restored and kept: then the image is
        :attr:`~StateImage.requested`), the changes in any case.

        Without ``full`` the cost under the lock is that of the tasks reordered (or of the
        whole order of an account where many were), not of the other changes nor of the
        table: the change log is handed over whole (a new one starts) and the writer reads
        it off the lock. Call :meth:`saved` once the
        image is durable; until then, a change made meanwhile goes to the next capture, and
        the next capture after a failed save writes this one's changes again, first.
        """
        with self.lock:
            batch, accounts = self._log.take(self.version)
            # Decided under the lock, from the count this image holds: a commit of a store
            # below the threshold writes the file, whatever changed just before.
            requested = self._log.touched or len(self._records) + len(self._kept) < current_below
            full = full or requested
            orders, moves = self._order.reorders(accounts, self._account_order)
            if not full:
                return StateImage(
                    version=self.version,
                    records=(),
                    account_tasks={},
                    kept=(),
                    extra=self.extra,
                    full=False,
                    changes=batch,
                    orders=orders,
                    moves=moves,
                )
            order = self._order.accounts()
            for account, ids in self._kept.orders():
                order.setdefault(account, []).extend(ids)
            return StateImage(
                version=self.version,
                records=list(self._records.values()),
                account_tasks=order,
                kept=self._kept.records(),
                extra=dict(self.extra),
                full=True,
                requested=requested,
                changes=batch,
                orders=orders,
                moves=moves,
            )

    def saved(self, version: int) -> None:
        """The image captured at ``version`` is durable."""
        with self.lock:
            batch = self._log.saved(version)
        if batch is not None and len(batch.latest) > _RELEASE_IN_PIECES:
            batch.release(PAUSE)

    def unsaved(self) -> tuple[str, ...]:
        """Task ids whose latest change is not durable yet."""
        with self.lock:
            return tuple(sorted(self._log.unsaved()))
