"""What the dashboard shows about a task, computed once in Python for pages and live updates.

Every value here is plain text or a number: the templates escape it, the script sets it with
``textContent``. Nothing user-provided ever becomes markup.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timedelta, tzinfo
from operator import attrgetter
from typing import Any
from urllib.parse import urlencode

import orjson

from scheduler.control.api import leader_link
from scheduler.triggers import preview_runs
from tasks.display import format_interval, format_time, preview_label
from tasks.model import TaskRecord, TaskStatus
from tasks.secrets import mask_secrets
from tasks.waiting import WaitContext, why_waiting

__all__ = [
    "ATTENTION_RANKS",
    "OVERDUE_AFTER",
    "Attention",
    "ClusterLine",
    "EditValues",
    "Filters",
    "Lane",
    "Selection",
    "TaskRow",
    "attention",
    "cluster_line",
    "edit_values",
    "failing",
    "format_interval",
    "format_time",
    "lanes",
    "last_outcome",
    "leader_link",
    "masked_fields",
    "next_runs",
    "overdue",
    "select",
    "task_row",
    "waiting_text",
]


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat()


def last_outcome(record: TaskRecord) -> str:
    """``never`` before the first run, then ``failed`` or ``succeeded`` for the latest one
    (a task in ``error`` failed last, also when the run was a manual one)."""
    if record.run_count == 0:
        return "never"
    failed = record.consecutive_failures or record.status is TaskStatus.ERROR
    return "failed" if failed else "succeeded"


OVERDUE_AFTER = timedelta(minutes=1)
"""A run that should have started longer ago than this, and has not, is overdue."""


def failing(record: TaskRecord) -> bool:
    """Whether ``record`` needs attention for its failures: its last run failed (and it may
    run again), or the dispatcher paused it after failures."""
    status = record.status
    if status is TaskStatus.PAUSED:
        return record.paused_reason is not None
    if status is TaskStatus.COMPLETED:
        return False
    return status is TaskStatus.ERROR or record.consecutive_failures > 0


def overdue(record: TaskRecord, now: datetime) -> bool:
    """Whether ``record``'s next run should have started over :data:`OVERDUE_AFTER` ago and
    has not (its account's lane is busy, or the dispatcher is stopped or stuck)."""
    return not record.status.settled and _late(record, now - OVERDUE_AFTER)


def _late(record: TaskRecord, cutoff: datetime) -> bool:
    """Whether no run of ``record`` is out and its next start (``start_time``) is before
    ``cutoff``; written without the property, as the summary asks it of every task."""
    planned = record.next_execution_time
    if planned is None or record.active_run is not None or not planned < cutoff:
        return False
    start = record.next_start_time
    return start is None or start < cutoff


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One task as the overview shows it."""

    task_id: str
    account_id: str
    account_name: str
    task_type: str
    sys_type: str
    status: str
    interval: str
    hours: str
    ends: str
    next_run: str
    next_run_at: str
    last_run: str
    last_run_at: str
    outcome: str
    streak: int
    runs: int
    last_error: str
    position: int
    failing: bool = False
    """Whether its failures need attention (see :func:`failing`)."""
    due_at: str = ""
    """When its next run starts (ISO-8601; empty: none planned): the page tells from it
    whether the run is overdue."""
    waiting: str = ""
    """Why it waits (:func:`~tasks.waiting.why_waiting`'s message; empty: it does not)."""

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (the live feed's payload)."""
        return asdict(self)


def waiting_text(
    record: TaskRecord, zone: tzinfo, now: datetime | None, context: WaitContext | None
) -> str:
    """Why ``record`` waits at ``now``, as the control API's ``waiting`` says it (empty: it
    does not, or ``now`` is None: not asked)."""
    if now is None:
        return ""
    waiting = why_waiting(record, now, zone, context)
    return "" if waiting is None else waiting.message


def task_row(
    record: TaskRecord,
    zone: tzinfo,
    position: int,
    now: datetime | None = None,
    context: WaitContext | None = None,
) -> TaskRow:
    """The overview row of ``record``, at ``position`` in its account's order; with ``now``,
    saying why it waits (``context``: what the running dispatcher knows, see
    :class:`~tasks.waiting.WaitContext`)."""
    start, end = record.valid_time_range
    ends = record.task_end_time
    return TaskRow(
        task_id=record.task_id,
        account_id=record.account_id,
        account_name=record.account_name or "",
        task_type=record.task_type,
        sys_type=record.sys_type,
        status=record.status.value,
        interval=format_interval(record.interval),
        hours="all day" if (start, end) == (0, 24) else f"{start:02d}-{end:02d}",
        ends="" if ends is None else ends.isoformat(),
        next_run=format_time(record.next_execution_time, zone),
        next_run_at=_iso(record.next_execution_time),
        last_run=format_time(record.last_execution_time, zone),
        last_run_at=_iso(record.last_execution_time),
        outcome=last_outcome(record),
        streak=record.consecutive_failures,
        runs=record.run_count,
        last_error=record.last_error or "",
        position=position,
        failing=failing(record),
        due_at="" if record.status.settled or record.active_run else _iso(record.start_time),
        waiting=waiting_text(record, zone, now, context),
    )


@dataclass(frozen=True, slots=True)
class Lane:
    """One account and its tasks in priority order.

    On a bounded page a lane may show only some of its account's matching tasks: ``hidden``
    of them are not shown, and ``total`` is how many tasks the account has.
    """

    account_id: str
    account_name: str
    rows: list[TaskRow]
    hidden: int = 0
    total: int = 0
    reason: str = ""
    """Why the account needs attention ("2 failing, 1 paused"; empty: it does not)."""


def lanes(
    records: Iterable[TaskRecord],
    account_tasks: dict[str, list[str]],
    zone: tzinfo,
    account_order: Sequence[str] | None = None,
    now: datetime | None = None,
    context: WaitContext | None = None,
) -> list[Lane]:
    """One lane per account (in the order of ``account_order``, else sorted by id), each with
    its rows in priority order (saying why they wait at ``now``, see :func:`task_row`)."""
    by_id = {record.task_id: record for record in records}
    result: list[Lane] = []
    for account in sorted(account_tasks) if account_order is None else account_order:
        rows = [
            task_row(by_id[task_id], zone, position, now, context)
            for position, task_id in enumerate(account_tasks[account])
            if task_id in by_id
        ]
        name = next((row.account_name for row in rows if row.account_name), "")
        result.append(Lane(account, name, rows))
    return result


@dataclass(frozen=True, slots=True)
class Filters:
    """The overview's filters, as its query string carries them (empty: any).

    :meth:`matches` is the rule the page's script applies to the rows it has
    (``applyFilters``): status, type, sys_type and account equal, and ``q`` a case-insensitive
    substring of the task id or the last error. The two must stay the same, so a page shows
    the same tasks whether the server or the browser filtered them.
    """

    account: str = ""
    status: str = ""
    type: str = ""
    sys: str = ""
    q: str = ""
    attention: str = ""
    """``failing`` or ``overdue`` (see :func:`failing`, :func:`overdue`)."""

    @classmethod
    def of(cls, query: Mapping[str, str]) -> Filters:
        """The filters named in ``query`` (a request's query parameters); others are ignored."""
        return cls(**{f.name: query.get(f.name, "") for f in fields(cls)})

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def matches(self, record: TaskRecord, now: datetime | None = None) -> bool:
        """Whether ``record`` passes every filter (``now``: for ``attention=overdue``)."""
        if self.account and record.account_id != self.account:
            return False
        if self.attention == "failing" and not failing(record):
            return False
        if self.attention == "overdue" and (now is None or not overdue(record, now)):
            return False
        if self.status and record.status != self.status:
            return False
        if self.type and record.task_type != self.type:
            return False
        if self.sys and record.sys_type != self.sys:
            return False
        text = self.q.strip().lower()
        return (
            not text or text in record.task_id.lower() or text in (record.last_error or "").lower()
        )

    def query(self, **changes: str) -> str:
        """The query string of these filters with ``changes`` (empty ones left out)."""
        changed = replace(self, **changes)
        return urlencode(
            [(f.name, value) for f in fields(changed) if (value := getattr(changed, f.name))]
        )


@dataclass(frozen=True, slots=True)
class Selection:
    """The tasks a bounded page shows: per account (sorted by id), the first matching tasks
    in priority order with their positions, and how many matching tasks are left out."""

    accounts: dict[str, list[tuple[int, TaskRecord]]]
    """Account -> its shown tasks as ``(position, record)``, in priority order."""
    hidden: dict[str, int]
    """Account -> how many of its matching tasks are not shown (accounts with none left out
    are not keys); an account with matches but no room on the page has all of them here."""
    matched: int
    """How many tasks match the filters, shown or not."""

    @property
    def shown(self) -> int:
        """How many tasks the page shows."""
        return sum(map(len, self.accounts.values()))

    @property
    def left_out_accounts(self) -> int:
        """How many accounts with matching tasks have no room on the page."""
        return sum(account not in self.accounts for account in self.hidden)


def select(
    records: Sequence[TaskRecord],
    account_tasks: Mapping[str, Sequence[str]],
    filters: Filters,
    *,
    page_limit: int,
    lane_limit: int,
    account_order: Sequence[str] | None = None,
    now: datetime | None = None,
) -> Selection:
    """At most ``lane_limit`` matching tasks of each account (in priority order) and at most
    ``page_limit`` in all, accounts taken in the order of ``account_order`` (else of their ids); an
    account filter lets its one lane take the whole page.

    One pass over ``records`` finds the matches, and a lane's walk down its account's order
    stops when the lane is full: at 100,000 tasks this costs tens of milliseconds.
    """
    matching = (
        [record for record in records if filters.matches(record, now)] if filters else records
    )
    by_id = {record.task_id: record for record in matching}
    counts = Counter(record.account_id for record in matching)
    per_lane = page_limit if filters.account else lane_limit
    room = page_limit
    accounts: dict[str, list[tuple[int, TaskRecord]]] = {}
    hidden: dict[str, int] = {}
    matched = 0
    for account in sorted(account_tasks) if account_order is None else account_order:
        count = counts.get(account, 0)
        if not count:
            continue
        matched += count
        limit = min(per_lane, room, count)
        shown: list[tuple[int, TaskRecord]] = []
        if limit:
            for position, task_id in enumerate(account_tasks[account]):
                record = by_id.get(task_id)
                if record is not None:
                    shown.append((position, record))
                    if len(shown) == limit:
                        break
            accounts[account] = shown
            room -= len(shown)
        if count > len(shown):
            hidden[account] = count - len(shown)
    return Selection(accounts, hidden, matched)


ATTENTION_RANKS = ("failing", "overdue", "paused")
"""Why an account's lane comes first, most urgent first; the other lanes follow."""


@dataclass(slots=True)
class Attention:
    """What needs an operator's attention, counted in one pass over the tasks."""

    by_status: dict[str, int]
    overdue: int
    accounts: dict[str, dict[str, int]]
    """Account -> how many of its tasks are failing, overdue or paused (accounts with none
    are left out)."""

    @property
    def failing_accounts(self) -> int:
        """How many accounts have a failing task."""
        return sum(bool(counts.get("failing")) for counts in self.accounts.values())

    def rank(self, account: str) -> int:
        """0 for an account with a failing task, 1 overdue, 2 paused, 3 the rest."""
        counts = self.accounts.get(account, {})
        return next(
            (rank for rank, why in enumerate(ATTENTION_RANKS) if counts.get(why)),
            len(ATTENTION_RANKS),
        )

    def reason(self, account: str) -> str:
        """Why ``account``'s lane needs attention (empty: it does not)."""
        counts = self.accounts.get(account, {})
        return ", ".join(f"{counts[why]} {why}" for why in ATTENTION_RANKS if counts.get(why))

    def order(self, account_ids: Iterable[str]) -> list[str]:
        """``account_ids`` with those needing attention first (then by id)."""
        return sorted(account_ids, key=lambda account: (self.rank(account), account))


def attention(records: Sequence[TaskRecord], now: datetime) -> Attention:
    """Tasks by status, overdue tasks, and per account what needs attention (the rules of
    :func:`failing` and :func:`overdue`, in one pass)."""
    statuses = Counter(map(_STATUS, records))
    by_status = {status.value: statuses.get(status, 0) for status in TaskStatus}
    accounts: dict[str, dict[str, int]] = {}
    cutoff = now - OVERDUE_AFTER
    late = 0
    for record in records:
        status = record.status
        if status is TaskStatus.COMPLETED:
            continue
        if status is TaskStatus.PAUSED:
            why = "failing" if record.paused_reason is not None else "paused"
        else:
            is_late = _late(record, cutoff)
            late += is_late
            if status is TaskStatus.ERROR or record.consecutive_failures > 0:
                why = "failing"
            elif is_late:
                why = "overdue"
            else:
                continue
        counts = accounts.setdefault(record.account_id, {})
        counts[why] = counts.get(why, 0) + 1
    return Attention(by_status, late, accounts)


_STATUS = attrgetter("status")


@dataclass(frozen=True, slots=True)
class EditValues:
    """What the task page's edit form starts from: the task's rules as the form writes them
    (the command line's units)."""

    interval: str
    hours: str
    until: str
    policy: list[tuple[str, str]]
    """Each run policy field and its value (empty: none)."""


def edit_values(record: TaskRecord) -> EditValues:
    """The edit form's values for ``record``."""
    start, end = record.valid_time_range
    ends = record.task_end_time
    policy = record.policy.model_dump()
    return EditValues(
        interval=format_interval(record.interval),
        hours=f"{start}-{end}",
        until="" if ends is None else ends.isoformat(),
        policy=[(name, "" if value is None else f"{value:g}") for name, value in policy.items()],
    )


def masked_fields(record: TaskRecord, *, show_secrets: bool = False) -> list[tuple[str, str]]:
    """Every saved field of ``record`` as ``(name, text)``, secret-looking kwargs masked."""
    data = record.to_json_dict()
    if not show_secrets:
        data["kwargs"] = mask_secrets(data["kwargs"])
    fields: list[tuple[str, str]] = []
    for key, value in data.items():
        if value is None:
            text = "-"
        elif isinstance(value, str):
            text = value
        else:
            text = orjson.dumps(value).decode()
        fields.append((key, text))
    return fields


def next_runs(
    record: TaskRecord, zone: tzinfo, now: datetime, count: int = 5
) -> tuple[str, Sequence[datetime]]:
    """A label and the next ``count`` planned runs, as ``task-dispatcher show`` computes them
    (:func:`~tasks.schedule.preview_runs`, which the edit form's preview uses too).

    A paused task previews its runs "if resumed now"; a completed one has none.
    """
    preview = preview_runs(record, zone, now, count)
    if preview.status == TaskStatus.COMPLETED:
        return preview_label(preview), []
    return preview_label(preview), preview.runs


@dataclass(frozen=True, slots=True)
class ClusterLine:
    """Which instance of a cluster leads, as the page header shows it (a shared store only)."""

    role: str
    """``leader`` or ``standby``: this instance's role."""
    epoch: int | None
    """The fencing epoch it leads, or last led, in (None: unknown)."""
    leader_id: str | None
    """The leader's id (None: unknown, or none leads)."""
    leader_url: str | None
    """The leader's advertised URL, as text (None: none advertised)."""
    link: str | None
    """Where to send the browser: the leader's URL when this instance does not lead and the
    URL is an http(s) one (None: shown as text only, or not at all)."""


def cluster_line(described: Mapping[str, Any] | None) -> ClusterLine | None:
    """The header's line for a health report's ``role``, ``epoch`` and ``leader`` (see
    :func:`scheduler.control.app.leadership`), or None for a store of one owner."""
    if described is None:
        return None
    role = str(described.get("role") or "standby")
    epoch = described.get("epoch")
    leader = described.get("leader") or {}
    leader_id = leader.get("id")
    leader_url = leader.get("url")
    return ClusterLine(
        role=role,
        epoch=epoch if isinstance(epoch, int) else None,
        leader_id=None if leader_id is None else str(leader_id),
        leader_url=None if leader_url is None else str(leader_url),
        link=None if role == "leader" else leader_link(leader_url),
    )
