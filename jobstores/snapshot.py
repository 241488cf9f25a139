"""Reading a dispatcher directory without owning it: for ``list``, ``show`` and ``validate``.

Nothing here takes the lock, creates a task manager or writes a byte. Saves replace the file
atomically, so a reader sees either the previous or the next complete state.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tzlocal
from pydantic import ValidationError

from jobstores.format import CorruptFileError, Document, decode_document
from jobstores.loading import read_document, restore, validation_problems
from jobstores.storage import STATE_FILENAME
from tasks.errors import NewerFormatError
from tasks.model import TaskRecord

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


def _zone(document: Document | None, zone: tzinfo | None) -> tzinfo:
    if zone is not None:
        return zone
    if document is not None and document.timezone:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(document.timezone)
    return tzlocal.get_localzone()


def read_snapshot(directory: Path, zone: tzinfo | None = None) -> StateSnapshot:
    """Read ``<directory>/dispatch_config.json``, falling back to its backup if unreadable.

    ``zone`` defaults to the zone the file records, else the local zone. Raises
    :class:`CorruptFileError` when neither file is readable and
    :class:`NewerFormatError` for a newer format.
    """
    path = directory / STATE_FILENAME
    if not path.exists():
        return StateSnapshot(path=path, exists=False, timezone=_zone(None, zone))
    document, _ = read_document(path, directory / f"{STATE_FILENAME}.bak", repair=False)
    if document is None:
        raise CorruptFileError(f"{path} and its backup are unreadable")
    snapshot = StateSnapshot(
        path=path, exists=True, timezone=_zone(document, zone), saved_at=document.saved_at
    )
    restored = restore(document.tasks, snapshot.timezone, parsed_json=document.parsed_json)
    snapshot.records = restored.records
    snapshot.unreadable = [raw for raw, _ in restored.kept]
    listed = {r.task_id: r.account_id for r in snapshot.records}
    for account, ids in document.account_tasks.items():
        kept = [i for i in ids if listed.get(i) == account]
        if kept:
            snapshot.account_tasks[account] = kept
    for record in snapshot.records:
        order = snapshot.account_tasks.setdefault(record.account_id, [])
        if record.task_id not in order:
            order.append(record.task_id)
    return snapshot


def validate_state_file(path: Path, zone: tzinfo | None = None) -> list[Problem]:
    """Every problem in the state file at ``path``, each naming its task and field."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [Problem("file", str(path), exc.strerror or str(exc))]
    try:
        document = decode_document(data, path)
    except (CorruptFileError, NewerFormatError) as exc:
        return [Problem("file", str(path), str(exc))]
    problems = [Problem("file", "account_tasks", p) for p in document.problems]
    zone = _zone(document, zone)
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
