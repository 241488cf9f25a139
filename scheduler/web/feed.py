"""The live feed: what changed since the page (or the last message) was rendered.

One :class:`FeedState` is a cheap fingerprint of every task and of the account order; the
difference between two of them is the message the server sends over server-sent events, so
a page follows runs starting and finishing without reloading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from scheduler.web.views import task_row
from tasks.model import TaskRecord

__all__ = ["FeedState", "diff"]

_Fingerprint = tuple[Any, ...]


def _fingerprint(record: TaskRecord) -> _Fingerprint:
    return (
        record.status,
        record.updated_at,
        record.next_execution_time,
        record.last_execution_time,
        record.run_count,
    )


@dataclass(slots=True)
class FeedState:
    """What a page currently shows: per-task fingerprints, the account order and health."""

    tasks: dict[str, _Fingerprint] = field(default_factory=dict)
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
        return cls({r.task_id: _fingerprint(r) for r in records}, order, health)


def diff(
    before: FeedState,
    records: Sequence[TaskRecord],
    order: dict[str, list[str]],
    health: dict[str, Any],
    zone: tzinfo,
    now: datetime,
) -> tuple[FeedState, dict[str, Any] | None]:
    """The new state and the message taking a page from ``before`` to it (None: no change).

    The message holds ``changed`` rows (new or updated tasks, in the overview's format),
    ``removed`` task ids, the full ``order`` when any account's order changed, and ``health``
    when it changed; ``now`` is the server's clock for relative times.
    """
    after = FeedState.of(records, order, health)
    positions = {task_id: i for ids in order.values() for i, task_id in enumerate(ids)}
    changed = [
        task_row(record, zone, positions.get(record.task_id, 0)).as_json()
        for record in records
        if before.tasks.get(record.task_id) != after.tasks[record.task_id]
    ]
    removed = [task_id for task_id in before.tasks if task_id not in after.tasks]
    message: dict[str, Any] = {}
    if changed:
        message["changed"] = changed
    if removed:
        message["removed"] = removed
    if order != before.order:
        message["order"] = order
    if health != before.health:
        message["health"] = health
    if not message:
        return after, None
    message["now"] = now.isoformat()
    return after, message
