"""Reading a state file back: the one recovery path of the owner and of read-only readers.

``read_document`` finds a readable document (the state file, else its backup); the owner
(``repair=True``) sets unreadable files aside, a reader only reads. ``restore`` validates
each task object, keeping the ones that cannot be restored as they were read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobstores.durable import set_aside
from jobstores.format import CorruptFileError, Document, decode_document
from tasks import lifecycle
from tasks.errors import InvalidTaskError
from tasks.model import TaskRecord, TaskStatus
from tasks.schedule import Schedule

__all__ = [
    "Restored",
    "describe_validation_error",
    "parse_record",
    "read_document",
    "restore",
    "validation_problems",
]

logger = logging.getLogger(__name__)


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` of every problem in a pydantic error."""
    return [
        (
            ".".join(str(part) for part in error["loc"]) or "record",
            str(error["msg"]).removeprefix("Value error, "),
        )
        for error in exc.errors()
    ]


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """``(field, message)`` of the first problem in a pydantic error."""
    return validation_problems(exc)[0]


def parse_record(raw: Any, zone: tzinfo, *, parsed_json: bool = False) -> TaskRecord:
    """Validate one saved task object; raise :class:`InvalidTaskError` naming the field.

    ``parsed_json`` says ``raw`` came from orjson, so its kwargs need no JSON check.
    """
    if not isinstance(raw, dict):
        raise InvalidTaskError("record", f"is {type(raw).__name__}, not an object")
    try:
        return TaskRecord.model_validate(raw, context={"zone": zone, "kwargs_checked": parsed_json})
    except ValidationError as exc:
        raise InvalidTaskError(*describe_validation_error(exc)) from exc


def _decode(path: Path, *, repair: bool) -> Document | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode_document(data, path)
    except CorruptFileError as exc:
        if repair:
            set_aside(path, str(exc))
        return None


def read_document(path: Path, backup: Path, *, repair: bool) -> tuple[Document | None, bool]:
    """The state document at ``path``, else its ``backup``; and whether it is the backup.

    None when there is no state yet, or (logged) when neither file is readable. The owner
    (``repair``) sets unreadable files aside as ``<name>.corrupt-<time>``. Raises
    :class:`~tasks.errors.NewerFormatError` for a newer format version, leaving the file.
    """
    existed = path.exists()
    document = _decode(path, repair=repair)
    if document is not None or not existed:
        return document, False
    document = _decode(backup, repair=repair)
    if document is None:
        if repair:
            logger.error("%s was unreadable and there is no usable backup: starting empty", path)
        return None, False
    if repair:
        logger.error(
            "%s was unreadable: restored %d task(s) from the backup saved at %s; changes made "
            "after that are lost",
            path,
            len(document.tasks),
            document.saved_at or "an unknown time",
        )
    return document, True


@dataclass
class Restored:
    """The task objects of a document, validated."""

    records: list[TaskRecord] = field(default_factory=list)
    kept: list[tuple[Any, str | None]] = field(default_factory=list)
    """Objects that could not be restored, as read, with their task id if they have one."""


def restore(
    tasks: Iterable[Any],
    zone: tzinfo,
    *,
    parsed_json: bool = False,
    now: datetime | None = None,
    accept: Callable[[TaskRecord], None] | None = None,
    label: str = "",
    fraction: Callable[[], float] | None = None,
) -> Restored:
    """Validate every task object; a duplicate id or invalid object is kept unrestored.

    With ``now`` (the owner loading), each record is made consistent for scheduling
    (:func:`tasks.lifecycle.loaded`), equal strings are shared between records, and every
    unrestorable object is logged. ``accept(record)`` may refuse a valid record by raising
    :class:`InvalidTaskError` (the dispatcher checks that its manager can be created).
    ``fraction()`` draws the jitter of a next run planned here (none without it).
    """
    restored = Restored()
    ids: set[str] = set()
    shared: dict[str, str] = {}
    for index, raw in enumerate(tasks):
        task_id = raw.get("task_id") if isinstance(raw, dict) else None
        task_id = task_id if isinstance(task_id, str) else None
        try:
            record = parse_record(raw, zone, parsed_json=parsed_json)
            if record.task_id in ids:
                raise InvalidTaskError("task_id", "duplicate task id")
            if accept is not None:
                accept(record)
            if now is not None:
                record = _loaded(record, zone, now, shared, label, fraction)
        except Exception as exc:
            # One record never stops the others: whatever it does (an invalid field, a
            # factory or a schedule that raises), it is kept as it is, unrestored.
            if now is not None:
                logger.error(
                    "%stask %s could not be restored (%s); kept in the file as it is",
                    label,
                    task_id or f"tasks[{index}]",
                    exc if isinstance(exc, InvalidTaskError) else f"{type(exc).__name__}: {exc}",
                )
            restored.kept.append((raw, task_id))
            if task_id is not None:
                ids.add(task_id)
            continue
        ids.add(record.task_id)
        restored.records.append(record)
    return restored


def _loaded(
    record: TaskRecord,
    zone: tzinfo,
    now: datetime,
    shared: dict[str, str],
    label: str,
    fraction: Callable[[], float] | None,
) -> TaskRecord:
    if record.status is TaskStatus.RUNNING and record.active_run is None:
        logger.warning(
            "%stask %s (account %s) was running when the dispatcher stopped; runnable again",
            label,
            record.task_id,
            record.account_id,
        )
    record = _share_strings(record, shared)
    schedule = Schedule.of(record, zone)
    record = lifecycle.loaded(record, schedule, now)
    if fraction is not None and (record.run_policy is not None or record.next_start_time):
        record = lifecycle.jittered(record, schedule, fraction())
    return record


def _share_strings(record: TaskRecord, shared: dict[str, str]) -> TaskRecord:
    """Make a freshly loaded record reuse equal strings already loaded (``shared``).

    Account ids, names, task types and most kwargs values repeat across tasks; a file parser
    creates a new string for every occurrence.
    """
    values = record.__dict__
    for name in ("account_id", "account_name", "task_type", "sys_type"):
        value = values[name]
        if value is not None:
            values[name] = shared.setdefault(value, value)
    kwargs = values["kwargs"]
    for key, value in kwargs.items():
        if value == record.task_id:
            kwargs[key] = record.task_id
        elif isinstance(value, str) and len(value) <= 128:
            kwargs[key] = shared.setdefault(value, value)
    return record
