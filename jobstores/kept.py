"""``KeptRecords``: the records a store read but could not restore, kept as they were read.

A record that no longer validates (a field this version refuses, a newer format) is not
dropped: it stays in the file, its id stays taken, and its place in its account's order is
written after the restored tasks. The table (:class:`~jobstores.table.TaskTable`) holds one
and reads it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["KeptRecords"]


class KeptRecords:
    """The unrestorable records as read, the task ids they hold, and where each stood in its
    account's order (after every restored task of the account)."""

    def __init__(self) -> None:
        self._raw: list[Any] = []
        self._ids: set[str] = set()
        self._order: dict[str, list[str]] = {}
        """Account id -> its kept task ids, in the file's order."""

    def load(self, kept: Iterable[tuple[Any, str | None]]) -> None:
        """Keep each raw record of ``kept`` (with its task id, if it has one)."""
        for raw, task_id in kept:
            self._raw.append(raw)
            if task_id is not None:
                self._ids.add(task_id)

    def place(self, account: str, task_id: str) -> None:
        """Put kept ``task_id`` last in ``account``'s kept order."""
        self._order.setdefault(account, []).append(task_id)

    def __contains__(self, task_id: object) -> bool:
        """Whether a kept record holds ``task_id`` (its id stays taken)."""
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._raw)

    def records(self) -> list[Any]:
        """The raw records, as read (a copy)."""
        return list(self._raw)

    def order_of(self, account: str) -> list[str]:
        """``account``'s kept task ids, in the file's order (empty if none)."""
        return self._order.get(account, [])

    def orders(self) -> Iterator[tuple[str, list[str]]]:
        """``(account, its kept task ids)`` for each account with any."""
        return iter(self._order.items())
