"""What a running dispatcher knows about why its tasks wait, gathered once per request for
:func:`tasks.waiting.why_waiting` (the control API's ``waiting`` and the dashboard)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tasks.model import TaskRecord
from tasks.waiting import WaitContext

if TYPE_CHECKING:
    from scheduler.dispatcher import Dispatcher

__all__ = ["wait_context"]


class _Holders:
    """Account id -> its task whose run is out, read from the records once, when first asked
    (only a task waiting for its lane asks)."""

    def __init__(self, read: Callable[[], Sequence[TaskRecord]]) -> None:
        self._read = read
        self._by_account: dict[str, TaskRecord] | None = None

    def __call__(self, account_id: str) -> TaskRecord | None:
        if self._by_account is None:
            self._by_account = {
                record.account_id: record
                for record in self._read()
                if record.active_run is not None
            }
        return self._by_account.get(account_id)


def _workers(health: Mapping[str, Any]) -> dict[str, list[str]] | None:
    waiting = health.get("waiting_for_workers")
    if not isinstance(waiting, Mapping):
        return None
    return {
        str(sys_type): [str(name) for name in (entry or {}).get("workers") or ()]
        for sys_type, entry in waiting.items()
    }


def _since(health: Mapping[str, Any]) -> datetime | None:
    if health.get("connected") is not False:
        return None
    try:
        return datetime.fromisoformat(str(health.get("unreachable_since")))
    except ValueError:
        return None


def wait_context(
    dispatcher: Dispatcher, records: Sequence[TaskRecord] | None = None
) -> WaitContext:
    """The live state ``why_waiting`` needs beyond the records, read now (on the event loop):
    the runs queued for their lanes and the run backend's health; ``records`` are the tasks
    already read (None: read them only if a lane's holder is asked for)."""
    if not dispatcher.running:
        return WaitContext()
    queued = frozenset(task_id for ids in dispatcher.queued_runs().values() for task_id in ids)
    health = dispatcher.run_backend.health()
    down = _since(health)
    return WaitContext(
        live=True,
        lane_queued=queued,
        lane_holder=_Holders(dispatcher.peek_tasks if records is None else lambda: records),
        workers=_workers(health),
        broker_down_since=down,
        broker=str(health.get("broker") or "") if down is not None else "",
    )
