"""``ChangeLog``: the table's changes that are not durable yet, and ``ChangeBatch``, one save's.

The table (:class:`~jobstores.table.TaskTable`) notes every change here under its lock; a
capture for a save takes the log whole (a new one starts) and holds it in flight until the
save is durable; a save that failed puts its changes back in front of those made since.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator

from tasks.model import TaskRecord

__all__ = ["ChangeBatch", "ChangeLog"]


class ChangeBatch(Collection[tuple[str, TaskRecord | None]]):
    """The changes of one save: the latest record of each changed task id (None: removed),
    in the order the ids first changed.

    The table hands its change log over whole when a save captures it and starts a new one,
    so capturing costs nothing per change; the save's writer reads the batch off the lock
    (nothing changes it any more). Iterating yields ``(task_id, record)`` pairs, a removal
    first for an id removed and added again (so replaying appends it last in its account).
    """

    __slots__ = ("latest", "recreated", "version")

    def __init__(
        self,
        latest: dict[str, TaskRecord | None] | None = None,
        recreated: set[str] | None = None,
        version: int = 0,
    ) -> None:
        self.latest: dict[str, TaskRecord | None] = {} if latest is None else latest
        """Task id -> its latest record (None: removed), in the order the ids first changed."""
        self.recreated: set[str] = set() if recreated is None else recreated
        """Ids removed, then added again (their removal is replayed first)."""
        self.version = version
        """The table's version when the batch was captured."""

    def __iter__(self) -> Iterator[tuple[str, TaskRecord | None]]:
        recreated = self.recreated
        for task_id, record in self.latest.items():
            if task_id in recreated:
                yield task_id, None
            yield task_id, record

    def __len__(self) -> int:
        """The number of pairs iterating yields."""
        return len(self.latest) + sum(1 for task_id in self.recreated if task_id in self.latest)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        task_id, record = item
        if task_id not in self.latest:
            return False
        return self.latest[task_id] is record or (record is None and task_id in self.recreated)

    @property
    def task_ids(self) -> Collection[str]:
        """The ids changed (a view: do not hold it across changes of a live batch)."""
        return self.latest.keys()

    def release(self, pause: float) -> None:
        """Let go of every record, a thousand at a time, sleeping ``pause`` seconds in
        between (after the batch is durable; never under the table's lock).

        Dropping a large batch in one go frees whatever only it still references in one
        C call, holding the interpreter; emptying it piecemeal lets other threads (the
        event loop) run in between.
        """
        latest = self.latest
        while latest:
            for _ in range(min(len(latest), 1024)):
                latest.popitem()
            time.sleep(pause)
        self.recreated = set()


class ChangeLog:
    """The changes since the last capture (each task's latest record, and the tasks
    reordered per account), the capture being written until it is durable, and whether the
    owner asked for the whole state (:meth:`touch`). Not locked: the table calls it under
    its lock."""

    def __init__(self) -> None:
        self._dirty = ChangeBatch()
        """The changes since the last capture."""
        self._moved: dict[str, set[str]] = {}
        """Account -> its tasks reordered since the last capture (removing or appending a
        task is a change of its own: the account's other tasks keep their order)."""
        self._inflight: tuple[ChangeBatch, dict[str, set[str]]] | None = None
        """The changes of the capture being written (with its accounts), until it is
        durable; a capture finding one here (its save failed) puts them back first."""
        self._touched = 0
        """The version at which the whole state was last asked for (0: not since durable)."""

    def changed(self, task_id: str, record: TaskRecord | None) -> None:
        """``task_id``'s latest record is ``record`` (None: removed)."""
        self._dirty.latest[task_id] = record

    def added(self, task_id: str) -> None:
        """``task_id`` is added (its record is noted by :meth:`changed`): one removed and
        added again before a save is replayed as a removal first, so it lands last in its
        account, as it is in the table."""
        if self._dirty.latest.pop(task_id, task_id) is None:
            self._dirty.recreated.add(task_id)

    def moved(self, account: str, task_id: str) -> None:
        """``task_id`` moved within ``account``'s order."""
        self._moved.setdefault(account, set()).add(task_id)

    def touch(self, version: int) -> None:
        """The whole state is to be written by the capture of ``version`` or a later one."""
        self._touched = version

    @property
    def touched(self) -> bool:
        """Whether the whole state was asked for since the last durable version."""
        return self._touched > 0

    def take(self, version: int) -> tuple[ChangeBatch, dict[str, set[str]]]:
        """Hand the changes over for a save at ``version`` (a failed save's first) and start
        a new log; they stay in flight until :meth:`saved`."""
        self._take_back()
        batch, accounts = self._dirty, self._moved
        batch.version = version
        self._inflight = (batch, accounts)
        self._dirty, self._moved = ChangeBatch(), {}
        return batch, accounts

    def _take_back(self) -> None:
        """Put the changes of a capture that did not become durable back in front of the
        changes made since."""
        if self._inflight is None:
            return
        failed, accounts = self._inflight
        self._inflight = None
        latest = dict(failed.latest)
        recreated = set(failed.recreated)
        for task_id, record in self._dirty.latest.items():
            if task_id in self._dirty.recreated or (
                record is not None and task_id in latest and latest[task_id] is None
            ):
                # Removed (in either batch), then added again: it goes last, as in added().
                latest.pop(task_id, None)
                recreated.add(task_id)
            latest[task_id] = record
        self._dirty = ChangeBatch(latest, recreated)
        for account, moved in accounts.items():
            self._moved.setdefault(account, set()).update(moved)

    def saved(self, version: int) -> ChangeBatch | None:
        """The capture at ``version`` is durable: returns the batch no longer in flight (to
        let go of off the lock), if that capture's."""
        inflight = self._inflight
        if inflight is not None and inflight[0].version <= version:
            self._inflight = None
        else:
            inflight = None
        if self._touched <= version:
            self._touched = 0
        return None if inflight is None else inflight[0]

    def unsaved(self) -> set[str]:
        """Task ids whose latest change is not durable yet."""
        ids = set(self._dirty.latest)
        if self._inflight is not None:
            ids.update(self._inflight[0].latest)
        return ids
