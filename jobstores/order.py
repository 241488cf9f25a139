"""``AccountOrder``: each account's task ids in priority order, and where a task stands in it.

The order is the table's (:class:`~jobstores.table.TaskTable`) and shares its lock: the table
calls every change under it. Asking where a task stands costs a scan of its account's order in
a small account and a rank lookup in a large one (see :data:`RANKED_ORDER`).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.model import TaskRecord

__all__ = ["MOVES_PER_ACCOUNT", "RANKED_ORDER", "UNKNOWN_POSITION", "AccountOrder"]

UNKNOWN_POSITION = 1 << 30
"""The position (and rank) of a task its account's order does not hold."""
MOVES_PER_ACCOUNT = 64
"""Above this many tasks reordered in one account between two saves, the save writes the
account's whole order instead of a move per task."""
RANKED_ORDER = 256
"""An account with more tasks than this gets a rank per task (see :meth:`AccountOrder.rank`),
built when one is first asked for: a run's lane asks for its task's rank, and finding a task
in a long order list would cost a run time in proportion to the account's size. Below this,
the list is looked up (no ranks to keep in memory)."""


class AccountOrder:
    """Each account's restored task ids in priority order: positions and ranks in it, the
    changes to it (append, remove, move) and the version that counts them."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        """The table's lock: every change is made under it."""
        self._ids: dict[str, list[str]] = {}
        """Account id -> task ids in priority order (an account with no task has no entry)."""
        self._ranks: dict[str, dict[str, float]] = {}
        """Account id -> task id -> rank, for large accounts (see :data:`RANKED_ORDER`)."""
        self.version = 0
        """Bumped whenever a task's position within its account may have changed."""

    def load(
        self, records: dict[str, TaskRecord], hint: dict[str, list[str]]
    ) -> list[tuple[str, str]]:
        """Fill an empty order with ``records`` (task id -> record, in file order) placed as
        ``hint`` (account -> ids, as the file ordered them) places them; ids the hint does
        not place go last, in file order. Returns ``(account, task id)`` for each of the
        hint's ids that names no restored task of that account, in the hint's order (under
        the table's lock)."""
        self._ranks.clear()
        # Each account's tasks, in file order: one pass over the records in the order they
        # lie in memory. Looking each up in the hint's order instead (accounts interleave)
        # missed the cache on every record at 100,000 tasks.
        groups: dict[str, dict[str, str]] = {}
        for task_id, record in records.items():
            group = groups.get(record.account_id)
            if group is None:
                group = groups[record.account_id] = {}
            group[task_id] = task_id
        unplaced: list[tuple[str, str]] = []
        for account, ids in hint.items():
            group = groups.get(account, {})
            ordered: list[str] = []
            for task_id in ids:
                own = group.pop(task_id, None)  # the record's string, not the hint's copy
                if own is not None:
                    ordered.append(own)
                else:
                    unplaced.append((account, task_id))
            if ordered:
                self._ids[account] = ordered
        for account, group in groups.items():
            if group:  # tasks the hint does not place: last, in file order
                self._ids.setdefault(account, []).extend(group)
        return unplaced

    def of(self, account: str) -> list[str]:
        """``account``'s task ids in priority order (the list itself: read it under the
        table's lock)."""
        return self._ids.get(account, [])

    def accounts(self) -> dict[str, list[str]]:
        """Account id -> its task ids in priority order (copies; under the table's lock)."""
        return {account: list(ids) for account, ids in self._ids.items() if ids}

    def position(self, account: str, task_id: str) -> int:
        """``task_id``'s 0-based priority within ``account`` (large if it is not there)."""
        ids = self._ids.get(account)
        if ids is None:
            return UNKNOWN_POSITION
        with self._lock:
            index = self._index(account, ids, task_id)
        return UNKNOWN_POSITION if index is None else index

    def rank(self, account: str, task_id: str) -> float:
        """A number that orders ``task_id`` within ``account`` as :meth:`position` does
        (large if it is not there), at a cost that does not grow with the account.

        In a large account each task keeps a rank: appending one ranks it after the last, a
        removal leaves the others' ranks, and a reorder ranks the task between its new
        neighbours (the account is ranked afresh, when next asked, once they are too close).
        """
        ids = self._ids.get(account)
        if ids is None:
            return UNKNOWN_POSITION
        ranks = self._ranks_of(account, ids)
        if ranks is None:
            return self.position(account, task_id)
        return ranks.get(task_id, UNKNOWN_POSITION)

    def _ranks_of(self, account: str, ids: list[str]) -> dict[str, float] | None:
        """The ranks of a large account (made now if need be); None for a small one."""
        if len(ids) <= RANKED_ORDER:
            return None
        ranks = self._ranks.get(account)
        if ranks is None:
            with self._lock:
                ids = self._ids.get(account, [])
                ranks = self._ranks[account] = dict(zip(ids, itertools.count(0.0)))
        return ranks

    def _index(self, account: str, ids: list[str], task_id: str) -> int | None:
        """Where ``task_id`` is in its account's ``ids`` (under the lock): found by its rank
        in a large account (ranks rise along the list), by a scan in a small one."""
        ranks = self._ranks_of(account, ids)
        if ranks is None:
            try:
                return ids.index(task_id)
            except ValueError:
                return None
        rank = ranks.get(task_id)
        if rank is None:
            return None
        index = bisect.bisect_left(ids, rank, key=ranks.__getitem__)
        return index if index < len(ids) and ids[index] == task_id else None

    # ------------------------------------------------------------------ changes (under the lock)

    def append(self, account: str, task_id: str) -> None:
        """Put a new task last in ``account``."""
        ids = self._ids.setdefault(account, [])
        ids.append(task_id)
        ranks = self._ranks.get(account)
        if ranks is not None:  # appended: ranked after the last
            ranks[task_id] = ranks[ids[-2]] + 1.0 if len(ids) > 1 else 0.0

    def remove(self, account: str, task_id: str) -> None:
        """Take ``task_id`` out of ``account`` (the others keep their order and ranks)."""
        ids = self._ids.get(account, [])
        index = self._index(account, ids, task_id)
        if index is not None:
            del ids[index]
        if not ids:
            self._ids.pop(account, None)
        ranks = self._ranks.get(account)
        if ranks is not None:
            ranks.pop(task_id, None)
        self.version += 1

    def move(self, account: str, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based, checked by the caller) in ``account``."""
        ids = self._ids[account]
        index = self._index(account, ids, task_id)
        assert index is not None  # a restored task is in its account's order
        del ids[index]
        ids.insert(position, task_id)
        self._rerank(account, ids, position)
        self.version += 1

    def size(self, account: str) -> int:
        """How many restored tasks ``account`` has."""
        return len(self._ids.get(account, ()))

    def _rerank(self, account: str, ids: list[str], position: int) -> None:
        """Rank the task just moved to ``position`` between its neighbours (under the lock)."""
        ranks = self._ranks.get(account)
        if ranks is None:
            return
        before = ranks[ids[position - 1]] if position > 0 else None
        after = ranks[ids[position + 1]] if position + 1 < len(ids) else None
        if before is None:
            rank = 0.0 if after is None else after - 1.0
        elif after is None:
            rank = before + 1.0
        else:
            rank = (before + after) / 2
            if not before < rank < after:  # no number left between them
                del self._ranks[account]
                return
        ranks[ids[position]] = rank

    # ------------------------------------------------------------------ for the saver

    def reorders(
        self, accounts: dict[str, set[str]], whole: Callable[[str], Iterable[str]]
    ) -> tuple[dict[str, list[str]], list[tuple[str, str, str | None]]]:
        """What to write of ``accounts``' reordered tasks (under the lock): whole orders
        (``whole(account)``: the ids to write for it), and moves. Each account's moves go
        from its last task to its first, each task placed before its successor now: a
        successor is either a task that kept its place or one placed already, so replaying
        them one by one rebuilds the order exactly."""
        orders: dict[str, list[str]] = {}
        moves: list[tuple[str, str, str | None]] = []
        for account, moved in accounts.items():
            if len(moved) > MOVES_PER_ACCOUNT:
                orders[account] = list(whole(account))
                continue
            ids = self._ids.get(account, [])
            placed = sorted(
                (position, task_id)
                for task_id in moved
                if (position := self.position(account, task_id)) < len(ids)
            )
            for position, task_id in reversed(placed):
                following = ids[position + 1] if position + 1 < len(ids) else None
                moves.append((account, task_id, following))
        return orders, moves
