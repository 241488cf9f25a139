"""The live feed: what changed since the page (or the last message) was rendered.

One :class:`FeedState` is what a page shows: the record of every task and the account order;
the difference between two of them is the message the server sends over server-sent events,
so a page follows runs starting and finishing without reloading.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from scheduler.web.views import task_row
from tasks.model import TaskRecord
from tasks.waiting import WaitContext

__all__ = ["FeedState", "diff", "rendered_at"]


_TASK_ID = operator.attrgetter("task_id")
_PIECE = 4096


def _fingerprint(record: TaskRecord) -> tuple[Any, ...]:
    """What a task's row shows that a change may alter."""
    return (
        record.status,
        record.updated_at,
        record.next_execution_time,
        record.last_execution_time,
        record.run_count,
        record.active_run,
        record.retry,
    )


@dataclass(slots=True)
class FeedState:
    """What a page currently shows: the record it shows of each task, the account order and
    health."""

    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    order: dict[str, list[str]] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        records: Sequence[TaskRecord],
        order: dict[str, list[str]],
        health: dict[str, Any],
    ) -> FeedState:
        """The state of ``records`` ordered by ``order``, with ``health``."""
        tasks: dict[str, TaskRecord] = {}
        for part in _pieces(records):
            tasks.update(zip(map(_TASK_ID, part), part, strict=True))
        return cls(tasks, order, health)


def rendered_at(
    records: Sequence[TaskRecord],
    since: datetime | None,
    order: dict[str, list[str]] | None = None,
) -> FeedState:
    """What a page rendered at ``since`` shows of ``records``: those not changed since then
    (None: nothing), with ``order`` if the page is known to show it, and without health (so
    the first message carries health, and the order unless it was given)."""
    if since is None:
        return FeedState()
    shown: list[TaskRecord] = []
    for part in _pieces(records):
        shown.extend(record for record in part if record.updated_at < since)
    return FeedState.of(shown, order or {}, {})


def _pieces(records: Sequence[TaskRecord]) -> Iterator[Sequence[TaskRecord]]:
    """``records`` a few thousand at a time. A look at every task runs in loops in C (a few
    milliseconds at 100,000 tasks), on a thread of its own: the interpreter is handed over
    between two pieces, not inside one, so a piece bounds how long the event loop waits."""
    for start in range(0, len(records), _PIECE):
        yield records[start : start + _PIECE]


def _positions(records: list[TaskRecord], order: dict[str, list[str]]) -> list[int]:
    """Each record's position in its account: looked up in the order list for a few records
    of an account, from a map of the account's positions for many."""
    by_account: dict[str, list[str]] = {}
    for record in records:
        by_account.setdefault(record.account_id, []).append(record.task_id)
    found: dict[str, int] = {}
    for account, task_ids in by_account.items():
        ids = order.get(account, [])
        if len(task_ids) > 8:
            found.update((task_id, index) for index, task_id in enumerate(ids))
            continue
        for task_id in task_ids:
            with contextlib.suppress(ValueError):
                found[task_id] = ids.index(task_id)
    return [found.get(record.task_id, 0) for record in records]


def diff(
    before: FeedState,
    records: Sequence[TaskRecord],
    order: dict[str, list[str]],
    health: dict[str, Any],
    zone: tzinfo,
    now: datetime,
    context: WaitContext | None = None,
) -> tuple[FeedState, dict[str, Any] | None]:
    """The new state and the message taking a page from ``before`` to it (None: no change).

    The message holds ``changed`` rows (new or updated tasks, in the overview's format),
    ``removed`` task ids, ``order`` with the task ids of each account whose order changed
    (an account that is gone, with none), and ``health`` when it changed; ``now`` is the
    server's clock for relative times and for why a task waits (with ``context``, what the
    running dispatcher knows: see :class:`~tasks.waiting.WaitContext`). A reorder in one
    account sends that account's ids, not every account's (at 100,000 tasks, a megabyte each time).

    A change replaces a task's record, so a task whose record is the one shown is unchanged
    without a look at its fields: a tick costs a lookup per task, and rows are made only for
    the tasks that changed.
    """
    after = FeedState.of(records, order, health)
    shown = before.tasks
    updated: list[TaskRecord] = []
    added = 0
    for part in _pieces(records):
        olds = list(map(shown.get, map(_TASK_ID, part)))
        replaced = zip(part, olds, strict=True)
        for record, old in itertools.compress(replaced, map(operator.is_not, part, olds)):
            if old is None:
                added += 1
                updated.append(record)
            elif _fingerprint(old) != _fingerprint(record):
                updated.append(record)
    changed = [
        task_row(record, zone, position, now, context).as_json()
        for record, position in zip(updated, _positions(updated, order), strict=True)
    ]
    removed = (
        [task_id for task_id in shown if task_id not in after.tasks]
        if len(shown) > len(after.tasks) - added
        else []
    )
    message: dict[str, Any] = {}
    if changed:
        message["changed"] = changed
    if removed:
        message["removed"] = removed
    reordered = {account: ids for account, ids in order.items() if before.order.get(account) != ids}
    reordered.update((account, []) for account in before.order if account not in order)
    if reordered:
        message["order"] = reordered
    if health != before.health:
        message["health"] = health
    if not message:
        return after, None
    message["now"] = now.isoformat()
    return after, message
