"""Reading a dispatcher directory without owning it: for ``list``, ``show`` and ``validate``.

Nothing here takes the lock, creates a task manager or writes a byte. A reader sees what the
owner would load, through the store's read-only open (:meth:`jobstores.state.StateStore.read`):
``dispatch_config.json`` with the journal lines written since folded in
(:func:`jobstores.loading.read_state`). Snapshots replace the file atomically and journal
lines count only once whole, so a reader sees a complete state at some instant.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from jobstores.format import CorruptFileError, Document, decode_document
from jobstores.loading import JournalRead, apply_journal, read_journal, validation_problems
from jobstores.state import StateStore
from jobstores.storage import STATE_FILENAME, SnapshotStorage
from tasks.errors import NewerFormatError
from tasks.model import TaskRecord, kwargs_problems
from tasks.zones import resolve_timezone

__all__ = ["Problem", "StateSnapshot", "read_snapshot", "validate_state_file"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a state file."""

    where: str
    """``task <id>`` (or ``tasks[i]``), ``account_tasks`` or ``file``."""
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}"


@dataclass
class StateSnapshot:
    """What a state file holds, as read at one instant."""

    path: Path
    exists: bool
    timezone: tzinfo
    saved_at: str | None = None
    records: list[TaskRecord] = field(default_factory=list)
    account_tasks: dict[str, list[str]] = field(default_factory=dict)
    unreadable: list[Any] = field(default_factory=list)

    def get(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``, or None."""
        return next((r for r in self.records if r.task_id == task_id), None)


def read_snapshot(
    directory: Path,
    zone: tzinfo | None = None,
    *,
    convert: bool = False,
    store: StateStore | None = None,
) -> StateSnapshot:
    """Read the state of the dispatcher on ``directory`` without owning it, through its
    ``store`` (:meth:`~jobstores.state.StateStore.read`; by default the JSON file, its backup
    if unreadable, and its journal).

    The zone is resolved as a dispatcher resolves it (:func:`tasks.zones.choose_timezone`):
    ``zone`` None is the zone the state records, else the local zone. Raises
    :class:`CorruptFileError` when neither file is readable, :class:`NewerFormatError` for a
    newer format and :class:`TimezoneMismatchError` for another zone without ``convert``.
    """
    store = store if store is not None else SnapshotStorage(directory)
    state = store.read(zone, convert=convert)
    snapshot = StateSnapshot(
        path=store.path,
        exists=state.exists,
        timezone=state.timezone,
        saved_at=state.saved_at,
        records=state.records,
        unreadable=[raw for raw, _ in state.kept],
    )
    listed = {r.task_id: r.account_id for r in snapshot.records}
    for account, ids in state.account_tasks.items():
        kept = [i for i in ids if listed.get(i) == account]
        if kept:
            snapshot.account_tasks[account] = kept
    for record in snapshot.records:
        order = snapshot.account_tasks.setdefault(record.account_id, [])
        if record.task_id not in order:
            order.append(record.task_id)
    return snapshot


def _journal_problems(journal: JournalRead) -> list[Problem]:
    problems = [
        Problem("journal", path.name, f"{dropped} torn line(s) at its end (never acknowledged)")
        for path, _, dropped in journal.torn
    ]
    if journal.damaged is not None:
        problems.append(
            Problem(
                "journal",
                journal.damaged.name,
                f"damaged: {journal.damage}; it and later segments are not applied",
            )
        )
    return problems


def validate_state_file(path: Path, zone: tzinfo | None = None) -> list[Problem]:
    """Every problem in the state file at ``path`` with its journal folded in (when ``path``
    is a dispatcher's state file), each naming its task and field."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        return [Problem("file", str(path), exc.strerror or str(exc))]
    try:
        document = decode_document(data, path) if data is not None else None
    except (CorruptFileError, NewerFormatError) as exc:
        return [Problem("file", str(path), str(exc))]
    problems: list[Problem] = []
    if path.name == STATE_FILENAME:
        journal = read_journal(path.parent, document.journal_seq if document else 0)
        problems.extend(_journal_problems(journal))
        if document is None and journal.batches:
            document = Document(version="1.0", saved_at=None, tasks=[])
        if document is not None:
            apply_journal(document, journal.batches)
    if document is None:
        return [Problem("file", str(path), os.strerror(errno.ENOENT))]
    problems.extend(Problem("file", "account_tasks", p) for p in document.problems)
    recorded = document.timezone
    if recorded is not None:
        try:
            ZoneInfo(recorded)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            problems.append(Problem("file", "timezone", f"unknown time zone {recorded!r}"))
            recorded = None
    # Checking reads the file in the zone asked for, else the recorded one (never refuses).
    zone = zone or (ZoneInfo(recorded) if recorded else resolve_timezone(None))
    ids: Counter[str] = Counter()
    accounts: dict[str, str] = {}
    for index, raw in enumerate(document.tasks):
        task_id = raw.get("task_id") if isinstance(raw, dict) else None
        where = f"task {task_id}" if isinstance(task_id, str) else f"tasks[{index}]"
        if not isinstance(raw, dict):
            problems.append(Problem(where, "record", f"is {type(raw).__name__}, not an object"))
            continue
        try:
            record = TaskRecord.model_validate(raw, context={"zone": zone})
        except ValidationError as exc:
            problems.extend(Problem(where, f, m) for f, m in validation_problems(exc))
            continue
        problems.extend(Problem(where, f, m) for f, m in kwargs_problems(record))
        ids[record.task_id] += 1
        accounts[record.task_id] = record.account_id
    problems.extend(
        Problem(f"task {task_id}", "task_id", f"appears {count} times")
        for task_id, count in ids.items()
        if count > 1
    )
    listed: set[str] = set()
    for account, task_ids in document.account_tasks.items():
        for task_id in task_ids:
            listed.add(task_id)
            if task_id not in accounts:
                problems.append(
                    Problem("account_tasks", account, f"lists {task_id}, which is not a valid task")
                )
            elif accounts[task_id] != account:
                problems.append(
                    Problem(
                        "account_tasks",
                        account,
                        f"lists {task_id}, whose account_id is {accounts[task_id]!r}",
                    )
                )
    problems.extend(
        Problem(f"task {task_id}", "account_id", "not listed in account_tasks")
        for task_id in accounts
        if task_id not in listed
    )
    return problems
