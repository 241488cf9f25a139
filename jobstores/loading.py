"""Reading the state back: the one recovery path of the owner and of read-only readers.

``read_state`` is the whole of it: ``read_document`` finds a readable document (the state
file, else its backup), ``read_journal`` finds the journal lines written since that document
and ``apply_journal`` folds them into it. The owner (``repair=True``) sets unreadable files
aside and cuts torn journal tails; a reader only reads. ``restore`` validates each task
object, keeping the ones that cannot be restored as they were read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, cast

import orjson
from pydantic import TypeAdapter, ValidationError

from jobstores.durable import set_aside, write_atomic
from jobstores.format import (
    CorruptFileError,
    Document,
    JournalLine,
    decode_document,
    decode_journal_line,
    encode_document,
    encode_raw,
)
from tasks import lifecycle
from tasks.errors import InvalidTaskError
from tasks.model import TaskRecord, TaskStatus, share_record_values
from tasks.schedule import Schedule

__all__ = [
    "BACKUP_FILENAME",
    "JOURNAL_PREFIX",
    "STATE_FILENAME",
    "JournalRead",
    "Restored",
    "apply_journal",
    "describe_validation_error",
    "journal_segments",
    "parse_record",
    "read_document",
    "read_journal",
    "read_state",
    "records_from_json",
    "restore",
    "validation_problems",
]

logger = logging.getLogger(__name__)

STATE_FILENAME = "dispatch_config.json"
"""The state file in a dispatcher directory: the seed's format, read and repaired by people."""
BACKUP_FILENAME = f"{STATE_FILENAME}.bak"
JOURNAL_PREFIX = "dispatch_config.journal-"
"""Journal segments are ``<prefix><first line number, 12 digits>``, read in number order."""
_SEGMENT_DIGITS = 12


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


def parse_record(
    raw: Any,
    zone: tzinfo,
    *,
    parsed_json: bool = False,
    shared: dict[Any, Any] | None = None,
) -> TaskRecord:
    """Validate one saved task object; raise :class:`InvalidTaskError` naming the field.

    ``parsed_json`` says ``raw`` came from orjson, so its kwargs need no JSON check.
    ``shared``, kept across the records of one load, makes their equal values one object
    (:func:`tasks.model.share_record_values`).
    """
    if not isinstance(raw, dict):
        raise InvalidTaskError("record", f"is {type(raw).__name__}, not an object")
    context = {"zone": zone, "kwargs_checked": parsed_json, "shared": shared}
    try:
        return TaskRecord.model_validate(raw, context=context)
    except ValidationError as exc:
        raise InvalidTaskError(*describe_validation_error(exc)) from exc


def _decode(path: Path, *, repair: bool, defer_tasks: bool) -> Document | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode_document(data, path, defer_tasks=defer_tasks)
    except CorruptFileError as exc:
        if repair:
            set_aside(path, str(exc))
        return None


def read_document(
    path: Path, backup: Path, *, repair: bool, defer_tasks: bool = False
) -> tuple[Document | None, bool]:
    """The state document at ``path``, else its ``backup``; and whether it is the backup.

    None when there is no state yet, or (logged) when neither file is readable. The owner
    (``repair``) sets unreadable files aside as ``<name>.corrupt-<time>``. Raises
    :class:`~tasks.errors.NewerFormatError` for a newer format version, leaving the file.
    ``defer_tasks``: see :func:`~jobstores.format.decode_document`.
    """
    existed = path.exists()
    document = _decode(path, repair=repair, defer_tasks=defer_tasks)
    if document is not None or not existed:
        return document, False
    document = _decode(backup, repair=repair, defer_tasks=False)
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
    trusted: Callable[[Any], bool] | None = None,
    sealed: bytes | None = None,
) -> Restored:
    """Validate every task object; a duplicate id or invalid object is kept unrestored.

    With ``now`` (the owner loading), each record is made consistent for scheduling
    (:func:`tasks.lifecycle.loaded`), equal values are shared between records, and every
    unrestorable object is logged. ``accept(record)`` may refuse a valid record by raising
    :class:`InvalidTaskError` (the dispatcher checks that its manager can be created).
    ``fraction()`` draws the jitter of a next run planned here (none without it).
    ``trusted(raw)`` says an object is as this library saved it (a checksum matched): its
    kwargs came from a JSON parser and need no JSON check. ``sealed`` is the JSON array of
    the task objects (:attr:`~jobstores.format.Document.sealed_tasks`): the records are
    validated from it in one call of pydantic's JSON path, and ``tasks`` (empty when not
    parsed yet) are only read if that fails or a record is kept.
    """
    restored = Restored()
    ids: set[str] = set()
    shared: dict[Any, Any] | None = None if now is None else {}
    schedules: dict[tuple[Any, ...], Schedule] = {}
    raws = tasks if isinstance(tasks, list) else list(tasks)
    made = None if sealed is None else records_from_json(sealed, zone, shared)
    if made is not None and raws and len(made) != len(raws):
        made = None
    if sealed is not None and not raws and (made is None or not made):
        raws = orjson.loads(sealed)  # the objects were left unparsed: needed after all
    add, append = ids.add, restored.records.append
    changed: list[TaskRecord] = []  # at load: their values are shared at the end
    for index in range(len(raws) if made is None else len(made)):
        raw = raws[index] if raws else None
        try:
            if made is not None:
                record = made[index]
            else:
                checked = parsed_json or (trusted is not None and trusted(raw))
                record = parse_record(raw, zone, parsed_json=checked, shared=shared)
            if record.task_id in ids:
                raise InvalidTaskError("task_id", "duplicate task id")
            if accept is not None:
                accept(record)
            validated = record
            if now is not None:
                record = _loaded(record, zone, now, schedules, label, fraction)
        except Exception as exc:
            if not raws:  # a record validated from ``sealed`` is kept as it was read
                raws = orjson.loads(cast(bytes, sealed))
                raw = raws[index]
            # One record never stops the others: whatever it does (an invalid field, a
            # factory or a schedule that raises), it is kept as it is, unrestored.
            task_id = raw.get("task_id") if isinstance(raw, dict) else None
            task_id = task_id if isinstance(task_id, str) else None
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
        add(record.task_id)
        append(record)
        if record is not validated:
            changed.append(record)
    if shared is not None:
        share_record_values(changed, shared)
    return restored


_RECORDS = TypeAdapter(list[TaskRecord])


def records_from_json(
    data: bytes, zone: tzinfo, shared: dict[Any, Any] | None
) -> list[TaskRecord] | None:
    """The records of a JSON array of task objects saved by this library, in one call of
    pydantic's JSON path; None when any of them is not a valid record today (each object is
    then validated alone, and kept if invalid). ``shared``: see :func:`parse_record`."""
    context = {"zone": zone, "kwargs_checked": True, "shared": shared}
    try:
        records = _RECORDS.validate_json(data, context=context)
    except Exception:  # a ValidationError, or a time that does not fit in the zone
        return None
    return records


def _loaded(
    record: TaskRecord,
    zone: tzinfo,
    now: datetime,
    schedules: dict[tuple[Any, ...], Schedule],
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
    # One schedule per distinct set of rules (all a schedule is made of), looked up by them.
    rules = (record.interval, record.valid_time_range, record.task_end_time)
    schedule = schedules.get(rules)
    if schedule is None:
        schedule = schedules[rules] = Schedule.of(record, zone)
    record = lifecycle.loaded(record, schedule, now)
    if fraction is not None and (record.run_policy is not None or record.next_start_time):
        record = lifecycle.jittered(record, schedule, fraction())
    return record


# ---------------------------------------------------------------------- the journal


@dataclass
class JournalRead:
    """What the journal of a directory holds beyond its document."""

    batches: list[list[JournalLine]] = field(default_factory=list)
    """Whole commits to apply, in order."""
    segments: list[tuple[int, Path]] = field(default_factory=list)
    """The segments still in use (number, path), in order (set-aside ones excluded)."""
    next_seq: int = 1
    """The number of the next line to write."""
    lines: int = 0
    """Lines applied on top of the document."""
    bytes: int = 0
    """Bytes of those lines."""
    torn: list[tuple[Path, int, int]] = field(default_factory=list)
    """Segments whose tail is torn or fails its checksum: (path, good length, lines dropped)."""
    damaged: Path | None = None
    """The segment where damage starts (a bad line before good ones, or a missing line):
    it and every later segment are not applied."""
    damage: str = ""
    """What the damage is."""
    vanished: bool = False
    """A segment disappeared while reading (a reader raced the owner's compaction)."""


def journal_segments(directory: Path) -> list[tuple[int, Path]]:
    """The journal segments of ``directory`` (number, path), in order."""
    found = []
    for path in directory.glob(f"{JOURNAL_PREFIX}*"):
        number = path.name[len(JOURNAL_PREFIX) :]
        if len(number) == _SEGMENT_DIGITS and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def read_journal(directory: Path, base: int) -> JournalRead:
    """The journal lines after line ``base`` (the last one the document holds).

    Lines come in whole commits; a commit that is torn or fails its checksum at the end of a
    segment was never acknowledged and is dropped (``torn``). Damage followed by good lines,
    or a missing line, stops the reading there (``damaged``): nothing after it is applied.
    """
    read = JournalRead(next_seq=base + 1)
    segments = journal_segments(directory)
    expected = base + 1
    for position, (number, path) in enumerate(segments):
        following = segments[position + 1][0] if position + 1 < len(segments) else None
        if read.damaged is not None:
            break
        read.segments.append((number, path))
        if following is not None and following <= expected:
            continue  # every line in it is in the document already
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            read.vanished = True
            read.segments.pop()
            continue
        offset = good_end = 0
        pending: list[JournalLine] = []
        pending_bytes = 0
        bad = 0
        pieces = data.split(b"\n")
        for index, piece in enumerate(pieces):
            end = offset + len(piece) + 1
            last = index == len(pieces) - 1
            line = None if last else decode_journal_line(piece)
            offset = end
            if line is None:
                bad += bool(piece)
                continue
            if line.seq <= base:
                bad = 0  # whatever was bad before it is in the document already
                if line.commit:
                    good_end = end
                continue
            if bad or line.seq != expected:
                read.damaged = path
                read.damage = (
                    f"line {line.seq} follows {bad} unreadable line(s)"
                    if bad
                    else f"line {line.seq} where line {expected} was expected"
                )
                pending = []
                break
            pending.append(line)
            pending_bytes += len(piece) + 1
            expected += 1
            if line.commit:
                read.batches.append(pending)
                read.lines += len(pending)
                read.bytes += pending_bytes
                pending, pending_bytes = [], 0
                good_end = end
        if read.damaged is not None:
            break
        if pending or bad:
            expected -= len(pending)
            read.torn.append((path, good_end, len(pending) + bad))
    read.next_seq = expected
    return read


_REMOVED = object()


def apply_journal(document: Document, batches: Iterable[list[JournalLine]]) -> None:
    """Fold journal commits into ``document`` (its task objects stay raw, for ``restore``).

    A put replaces the first object with its task id (or appends the task, last in its
    account); a remove drops it; a move places a task before another one of its account (or
    last); an order line sets an account's whole order.
    """
    tasks: list[Any] = document.tasks
    index: dict[str, int] = {}
    for at, raw in enumerate(tasks):
        task_id = raw.get("task_id") if isinstance(raw, dict) else None
        if isinstance(task_id, str):
            index.setdefault(task_id, at)
    orders = {account: dict.fromkeys(ids) for account, ids in document.account_tasks.items()}

    def account_of(raw: Any) -> Any:
        return raw.get("account_id") if isinstance(raw, dict) else None

    for batch in batches:
        for line in batch:
            if line.kind == "put":
                raw = line.value
                task_id, account = raw.get("task_id"), account_of(raw)
                position: int | None = index.get(task_id) if isinstance(task_id, str) else None
                document.trusted_tasks.add(id(raw))  # its line's checksum matched
                document.sealed_tasks = None  # the document's tasks are not those bytes now
                if position is None:
                    if isinstance(task_id, str):
                        index[task_id] = len(tasks)
                    tasks.append(raw)
                else:
                    previous = account_of(tasks[position])
                    tasks[position] = raw
                    if previous != account and isinstance(previous, str):
                        orders.get(previous, {}).pop(task_id, None)
                if isinstance(account, str) and isinstance(task_id, str):
                    orders.setdefault(account, {}).setdefault(task_id)
            elif line.kind == "remove":
                position = index.pop(line.value) if line.value in index else None
                if position is not None:
                    document.sealed_tasks = None
                    account = account_of(tasks[position])
                    tasks[position] = _REMOVED
                    if isinstance(account, str):
                        orders.get(account, {}).pop(line.value, None)
            elif line.kind == "move" and isinstance(line.value, dict):
                account, task_id = line.value.get("account"), line.value.get("task")
                if isinstance(account, str) and isinstance(task_id, str):
                    order = orders.get(account)
                    if order is not None and task_id in order:
                        orders[account] = _moved(order, task_id, line.value.get("before"))
            elif isinstance(line.value, dict):
                account, ids = line.value.get("account"), line.value.get("tasks")
                if isinstance(account, str) and isinstance(ids, list):
                    orders[account] = dict.fromkeys(i for i in ids if isinstance(i, str))
    document.tasks = [raw for raw in tasks if raw is not _REMOVED]
    document.account_tasks = {account: list(ids) for account, ids in orders.items() if ids}


def _moved(order: dict[str, None], task_id: str, before: Any) -> dict[str, None]:
    """``order`` with ``task_id`` placed before ``before`` (last if that is not in it)."""
    del order[task_id]
    if not isinstance(before, str) or before not in order:
        order[task_id] = None
        return order
    ids = list(order)
    ids.insert(ids.index(before), task_id)
    return dict.fromkeys(ids)


def read_state(
    directory: Path, *, repair: bool, defer_tasks: bool = False
) -> tuple[Document | None, bool, JournalRead]:
    """The state of ``directory``: its document with the journal folded in; whether the
    document is the backup; what the journal held. ``defer_tasks``: a sealed document's
    tasks may be left in :attr:`~jobstores.format.Document.sealed_tasks`, for
    :func:`restore` (they are parsed when the journal is folded in).

    The owner (``repair``) cuts torn journal tails (logged as a WARNING: they were never
    acknowledged) and sets damaged segments aside as ``<name>.corrupt-<time>`` with an ERROR.
    A reader retries when it raced a compaction of the owner. Raises as ``read_document``.
    """
    path, backup = directory / STATE_FILENAME, directory / BACKUP_FILENAME
    for _attempt in range(1 if repair else 5):
        document, from_backup = read_document(path, backup, repair=repair, defer_tasks=defer_tasks)
        journal = read_journal(directory, document.journal_seq if document is not None else 0)
        raced = journal.vanished or (journal.damaged is not None and not repair)
        if not raced:
            break
    if journal.batches or (repair and journal.damaged is not None):
        if document is None:
            document = Document(version="1.0", saved_at=None, tasks=[])
        document.parse_tasks()
        apply_journal(document, journal.batches)
    if repair:
        assert document is not None or journal.damaged is None
        _repair_journal(journal, document, path, backup)
    return document, from_backup, journal


def _repair_journal(
    journal: JournalRead, document: Document | None, path: Path, backup: Path
) -> None:
    for path_, good_end, dropped in journal.torn:
        logger.warning(
            "%s: dropped %d journal line(s) at its end, torn or failing their checksum (a "
            "change being written when the dispatcher stopped; it was never acknowledged)",
            path_,
            dropped,
        )
        with open(path_, "r+b") as file:
            file.truncate(good_end)
            os.fsync(file.fileno())
    if journal.damaged is not None and document is not None:
        # What was read before the damage is written into the document first, so setting
        # the damaged segments aside loses nothing that was restored.
        document.journal_seq = journal.next_seq - 1
        write_atomic(
            path,
            encode_document(
                map(encode_raw, document.tasks),
                document.account_tasks,
                datetime.now(UTC),
                document.timezone,
                document.extra,
                document.journal_seq,
            ),
            backup=backup,
        )
        kept = [(n, p) for n, p in journal.segments if n < _number(journal.damaged)]
        for _, path in journal.segments[len(kept) :]:
            set_aside(path, f"journal damaged ({journal.damage}); later lines not applied")
        logger.error(
            "%s: the journal is damaged (%s): the changes before it are restored, the ones "
            "in the segment(s) set aside are not",
            journal.damaged,
            journal.damage,
        )
        journal.segments = kept


def _number(path: Path) -> int:
    return int(path.name[len(JOURNAL_PREFIX) :])
