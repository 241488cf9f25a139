"""The task listing of the control API, a page at a time.

The listing is ordered by account id, then by each account's priority. A page ends at a
task; its cursor names that task, its account and its position, so the next page starts
right after the task where it is now (or, once it is gone, after its old position). A page
costs what it skips and what it returns, not the size of the store: at 100,000 tasks a
client reads the whole listing in pages of a few thousand tasks instead of one answer of
about 100 MB.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import orjson

from tasks.errors import InvalidTaskError
from tasks.model import TaskRecord, TaskStatus

__all__ = ["MAX_PAGE", "Cursor", "TaskFilter", "task_page"]

MAX_PAGE = 10_000
"""The most tasks one page may ask for (``limit``)."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: the last task listed, its account and its position there."""

    account_id: str
    position: int
    task_id: str

    def encode(self) -> str:
        """The cursor as an opaque URL-safe text (the ``after`` of the next request)."""
        data = orjson.dumps([self.account_id, self.position, self.task_id])
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Read a cursor made by :meth:`encode`; raises :class:`InvalidTaskError` naming
        ``after`` for anything else."""
        try:
            data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError) as exc:
            raise InvalidTaskError("after", "is not a cursor this API returned") from exc
        if (
            not isinstance(data, list)
            or len(data) != 3
            or not isinstance(data[0], str)
            or type(data[1]) is not int
            or data[1] < 0
            or not isinstance(data[2], str)
        ):
            raise InvalidTaskError("after", "is not a cursor this API returned")
        return cls(data[0], data[1], data[2])


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks to list: each given field must equal the task's (the account is chosen
    by :func:`task_page`, which lists account by account; calling the filter checks the
    other fields)."""

    account: str | None = None
    status: TaskStatus | None = None
    task_type: str | None = None
    sys_type: str | None = None

    def __call__(self, record: TaskRecord) -> bool:
        return (
            (self.status is None or record.status is self.status)
            and (self.task_type is None or record.task_type == self.task_type)
            and (self.sys_type is None or record.sys_type == self.sys_type)
        )


def task_page(
    records: Sequence[TaskRecord],
    order: Mapping[str, Sequence[str]],
    chosen: TaskFilter,
    *,
    limit: int | None = None,
    after: Cursor | None = None,
) -> tuple[list[TaskRecord], Cursor | None]:
    """The tasks of ``records`` that ``chosen`` selects, by account then priority (``order``:
    account id -> task ids), starting after ``after``; at most ``limit`` of them (None: all).

    Returns the page and the cursor of its last task when more may follow (None when the
    page ends the listing). A task moved or removed between two requests may be listed
    twice or not at all, as with any listing read in pages while it changes.
    """
    by_id = {record.task_id: record for record in records}
    page: list[TaskRecord] = []
    last: Cursor | None = None
    for account_id, position, record in _listed(by_id, order, chosen, after):
        if limit is not None and len(page) == limit:
            return page, last
        page.append(record)
        last = Cursor(account_id, position, record.task_id)
    return page, None


def _listed(
    by_id: Mapping[str, TaskRecord],
    order: Mapping[str, Sequence[str]],
    chosen: TaskFilter,
    after: Cursor | None,
) -> Iterator[tuple[str, int, TaskRecord]]:
    """``(account id, position, record)`` of every selected task after ``after``, in order."""
    accounts = sorted(order) if chosen.account is None else [chosen.account]
    if after is not None:
        accounts = accounts[bisect_left(accounts, after.account_id) :]
    for account_id in accounts:
        ids = order.get(account_id, ())
        start = 0
        if after is not None and account_id == after.account_id:
            # Right after the cursor's task where it is now; after its old place once gone.
            try:
                start = ids.index(after.task_id) + 1
            except ValueError:
                start = after.position + 1
        for position in range(start, len(ids)):
            record = by_id.get(ids[position])
            if record is not None and record.account_id == account_id and chosen(record):
                yield account_id, position, record
