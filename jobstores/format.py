"""The ``dispatch_config.json`` document: reading it tolerantly, writing it readably.

The format is the seed's: ``version`` ("1.0"), ``saved_at``, ``tasks`` (one object per task)
and ``account_tasks`` (account id -> ordered task ids). Datetimes carry a UTC offset; naive
ones, as the seed's own application wrote them, are read as wall times of the dispatcher's
zone (the record model does that). ``journal_seq``, when present, is the last journal line
the document already holds (see :mod:`jobstores.journal`).

A journal line is one JSON object per change, ending in a CRC-32 of the rest of the line:
``{"seq":7,"put":{...task...},"crc":"89abcdef"}``, ``{"seq":8,"remove":"task-id",...}``,
``{"seq":9,"move":{"account":"a","task":"t2","before":"t1"},...}`` (a reordered task and the
one it now stands before, or null when last) or ``{"seq":10,"order":{"account":"a",
"tasks":[...]},...}`` (an account's whole order); the last line of each commit carries
``"commit":true``.

A document that holds only records this library validated ends in a ``"checksum"`` (CRC-32
of every byte before it): when it still matches, loading trusts the tasks instead of
validating each one again. Editing the file by hand breaks it, and every task is validated.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from tasks.errors import NewerFormatError
from tasks.model import json_default

__all__ = [
    "CHUNK",
    "FORMAT_VERSION",
    "CorruptFileError",
    "Document",
    "JournalLine",
    "decode_document",
    "decode_journal_line",
    "encode_account_tasks",
    "encode_document",
    "encode_document_chunks",
    "encode_journal_line",
    "encode_raw",
    "encode_task",
]

FORMAT_VERSION = "1.0"
_SUPPORTED = (1, 0)
_KNOWN_KEYS = frozenset(
    {"version", "saved_at", "timezone", "journal_seq", "tasks", "account_tasks", "checksum"}
)


class CorruptFileError(ValueError):
    """The bytes are not a ``dispatch_config.json`` document at all."""


@dataclass
class Document:
    """A decoded document: task objects still raw, ``account_tasks`` cleaned up."""

    version: str
    saved_at: str | None
    tasks: list[Any]
    parsed_json: bool = True
    """Whether orjson parsed the file (its values are then JSON-safe by construction)."""
    timezone: str | None = None
    """The IANA key of the zone the writing dispatcher used, if it recorded one."""
    account_tasks: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys the format does not define (a ``"comment"``, say): kept through saves."""
    journal_seq: int = 0
    """The last journal line this document holds (0: none)."""
    trusted: bool = False
    """Whether its checksum proves its tasks are as this library wrote them, validated."""
    trusted_tasks: set[int] = field(default_factory=set)
    """``id()`` of task objects from checksummed journal lines, folded in (trusted too)."""
    sealed_tasks: bytes | None = None
    """The ``tasks`` array as written, when decoded with ``defer_tasks``, the checksum proves
    it and the journal changed none of its tasks: a loader validates the records straight
    from these bytes."""
    tasks_deferred: bool = False
    """Whether ``tasks`` is not parsed yet (it is empty until :meth:`parse_tasks`): only
    ``sealed_tasks`` holds them (see ``defer_tasks`` of :func:`decode_document`)."""

    def parse_tasks(self) -> list[Any]:
        """The task objects, parsed now if decoding left them in ``sealed_tasks``."""
        if self.tasks_deferred and self.sealed_tasks is not None:
            self.tasks = orjson.loads(self.sealed_tasks)
        self.tasks_deferred = False
        return self.tasks


def _version_tuple(version: str, path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        # Perhaps a pre-release of a later format ("1.1-rc1"): refuse it as a newer one.
        raise NewerFormatError(path, version, parsed=False) from None


def decode_document(data: bytes, path: Path, *, defer_tasks: bool = False) -> Document:
    """Parse ``data``; raise :class:`CorruptFileError` or :class:`NewerFormatError`.

    ``defer_tasks``: a sealed document's task objects are not parsed (a loader validates
    its records straight from ``sealed_tasks``); :meth:`Document.parse_tasks` parses them.
    """
    span = _tasks_span(data) if defer_tasks and _intact(data) else None
    sealed = None
    if span is not None:
        start, end = span
        sealed = data[start:end]
        data = data[:start] + b"[]" + data[end : len(data) - _SEAL] + _END  # the rest alone
    parsed_json = True
    try:
        top = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        parsed_json = False
        # orjson refuses integers beyond 64 bits; the standard library reads them, so one
        # absurd number damages one record instead of the whole file.
        try:
            top = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CorruptFileError(f"not valid JSON: {exc}") from exc
    if not isinstance(top, dict):
        raise CorruptFileError(f"top level is {type(top).__name__}, not an object")
    problems = []
    version = top.get("version", FORMAT_VERSION)
    if not isinstance(version, str | int | float) or isinstance(version, bool):
        raise CorruptFileError(f"version {version!r} is not a version number")
    version = str(version)
    if _version_tuple(version, path) > _SUPPORTED:
        raise NewerFormatError(path, version)
    tasks = top.get("tasks", [])
    if not isinstance(tasks, list):
        raise CorruptFileError(f"'tasks' is {type(tasks).__name__}, not a list")
    saved_at = top.get("saved_at")
    account_tasks: dict[str, list[str]] = {}
    raw_order = top.get("account_tasks", {})
    if isinstance(raw_order, dict):
        for account, ids in raw_order.items():
            if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
                account_tasks[account] = list(dict.fromkeys(ids))
            else:
                problems.append(f"account_tasks[{account!r}]: not a list of task ids, ignored")
    else:
        problems.append("account_tasks: not an object, order rebuilt from tasks")
    zone = top.get("timezone")
    trusted = sealed is not None or (parsed_json and _intact(data))
    journal_seq = top.get("journal_seq", 0)
    if isinstance(journal_seq, bool) or not isinstance(journal_seq, int) or journal_seq < 0:
        problems.append(f"journal_seq: {journal_seq!r} is not a line number, read as 0")
        journal_seq = 0
    return Document(
        version=version,
        saved_at=saved_at if isinstance(saved_at, str) else None,
        tasks=tasks,
        parsed_json=parsed_json,
        timezone=zone if isinstance(zone, str) else None,
        account_tasks=account_tasks,
        problems=problems,
        extra={key: value for key, value in top.items() if key not in _KNOWN_KEYS},
        journal_seq=journal_seq,
        trusted=trusted,
        sealed_tasks=sealed,
        tasks_deferred=sealed is not None,
    )


_TASK_PREFIX = b"    "


def encode_task(task: dict[str, Any]) -> bytes:
    """One task object on one line of the document's ``tasks`` array.

    One line per task keeps the file readable, greppable and easy to repair by hand, and a
    third smaller than an indented layout. Datetimes are written as ISO-8601 with their
    offset, dates as ``YYYY-MM-DD``, enums as their values, tuples as arrays.
    """
    return _TASK_PREFIX + orjson.dumps(task, default=json_default)


def encode_raw(value: Any) -> bytes:
    """A record kept as it was read (possibly damaged), written back without any change.

    The standard library keeps what orjson would alter or refuse (huge integers, NaN).
    """
    return _TASK_PREFIX + _verbatim(value)


def _verbatim(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def encode_document(
    encoded_tasks: Iterable[bytes],
    account_tasks: dict[str, list[str]],
    saved_at: datetime,
    timezone: str | None = None,
    extra: dict[str, Any] | None = None,
    journal_seq: int = 0,
    *,
    sealed: bool = False,
) -> list[bytes]:
    """The document, in parts to write one after another, from tasks encoded with
    :func:`encode_task`.

    ``timezone`` (an extra key) tells readers such as the command line which zone the hour
    windows are in. ``extra`` holds top-level keys read from the file (a ``"comment"``, say),
    written back as they were. ``sealed`` (every task is a record this library validated)
    ends the document with a ``"checksum"`` of all of it, so loading it again can trust the
    tasks instead of validating each one.
    """
    body = b",\n".join(encoded_tasks)
    head, tail = _frame(bool(body), account_tasks, saved_at, timezone, extra, journal_seq)
    return _closed([head, body, tail], sealed=sealed)


def encode_account_tasks(
    account_tasks: dict[str, list[str]], pause: Callable[[], None] | None = None
) -> bytes:
    """``account_tasks`` as the document holds it (indented by two, one id a line), encoded
    an account at a time; ``pause()`` is called every few accounts.

    The bytes are those of encoding the whole mapping at once, but a background writer
    calling ``pause`` to let other threads run never holds the interpreter for the whole
    of it (about 15 ms at 100,000 tasks).
    """
    if not account_tasks:
        return orjson.dumps(account_tasks)
    pieces = []
    for index, (account, ids) in enumerate(account_tasks.items()):
        if pause is not None and index and not index % _ACCOUNTS_AT_A_TIME:
            pause()
        # {"account": [...]} without its braces: one entry of the whole mapping.
        entry = orjson.dumps({account: ids}, option=orjson.OPT_INDENT_2)[2:-2]
        pieces.append(entry.replace(b"\n", b"\n  "))
    return b"{\n  " + b",\n  ".join(pieces) + b"\n  }"


_ACCOUNTS_AT_A_TIME = 16
CHUNK = 256
"""Task lines a background writer joins at a time: no single copy of every task is made, so
it never holds the interpreter for long."""


def _frame(
    has_tasks: bool,
    account_tasks: dict[str, list[str]],
    saved_at: datetime,
    timezone: str | None,
    extra: dict[str, Any] | None,
    journal_seq: int,
    pause: Callable[[], None] | None = None,
) -> tuple[bytes, bytes]:
    kept = b"".join(
        b",\n  " + _verbatim(key) + b": " + _verbatim(value)
        for key, value in (extra or {}).items()
        if key not in _KNOWN_KEYS
    )
    order = encode_account_tasks(account_tasks, pause)
    head = b"".join(
        (
            b'{\n  "version": ',
            orjson.dumps(FORMAT_VERSION),
            b',\n  "saved_at": ',
            orjson.dumps(saved_at.isoformat()),
            b',\n  "timezone": ' + orjson.dumps(timezone) if timezone else b"",
            b',\n  "journal_seq": %d' % journal_seq if journal_seq else b"",
            kept,
            b',\n  "tasks": [\n' if has_tasks else b',\n  "tasks": [',
        )
    )
    tail = b"".join((b"\n  ],\n" if has_tasks else b"],\n", b'  "account_tasks": ', order))
    return head, tail


_CHECKSUM_KEY = b',\n  "checksum": "'
_END = b"\n}\n"
_CHECKSUM_END = b'"' + _END
_SEAL = len(_CHECKSUM_KEY) + 8 + len(_CHECKSUM_END)


def _closed(parts: list[bytes], *, sealed: bool) -> list[bytes]:
    if not sealed:
        parts.append(_END)
        return parts
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(b"%s%08x%s" % (_CHECKSUM_KEY, crc, _CHECKSUM_END))
    return parts


def _intact(data: bytes) -> bool:
    """Whether ``data`` ends in a checksum that matches the rest (see ``sealed``)."""
    if len(data) <= _SEAL or not data.endswith(_CHECKSUM_END):
        return False
    seal = data[-_SEAL:]
    if not seal.startswith(_CHECKSUM_KEY):
        return False
    try:
        crc = int(seal[len(_CHECKSUM_KEY) : len(_CHECKSUM_KEY) + 8], 16)
    except ValueError:
        return False
    return crc == zlib.crc32(memoryview(data)[: len(data) - _SEAL])


_TASKS_OPEN = b',\n  "tasks": [\n'
_TASKS_CLOSE = b'\n  ],\n  "account_tasks": '


def _tasks_span(data: bytes) -> tuple[int, int] | None:
    """Where the ``tasks`` array of a sealed document starts and ends, as :func:`_frame`
    lays it out (no other line of the document starts or ends that way: every task is one
    line, and kept keys are written on one line); None when it holds no task."""
    start = data.find(_TASKS_OPEN)
    end = data.find(_TASKS_CLOSE, start)
    if start < 0 or end < 0:
        return None
    return start + len(_TASKS_OPEN) - 2, end + 4


def encode_document_chunks(
    chunks: list[bytes],
    account_tasks: dict[str, list[str]],
    saved_at: datetime,
    timezone: str | None = None,
    extra: dict[str, Any] | None = None,
    journal_seq: int = 0,
    *,
    sealed: bool = False,
    pause: Callable[[], None] | None = None,
) -> list[bytes]:
    """:func:`encode_document` from tasks already joined in chunks (``b",\\n".join`` of a
    few hundred lines each, none empty): no single copy of all the tasks is ever made, so a
    background writer never holds the interpreter for long (``pause`` as for
    :func:`encode_account_tasks`)."""
    head, tail = _frame(bool(chunks), account_tasks, saved_at, timezone, extra, journal_seq, pause)
    parts = [head]
    for index, chunk in enumerate(chunks):
        if index:
            parts.append(b",\n")
        parts.append(chunk)
    parts.append(tail)
    return _closed(parts, sealed=sealed)


# ---------------------------------------------------------------------- journal lines

_CRC_SUFFIX = len(b',"crc":"00000000"}')


@dataclass(frozen=True)
class JournalLine:
    """One decoded journal line."""

    seq: int
    kind: str
    """``"put"``, ``"remove"``, ``"move"`` or ``"order"``."""
    value: Any
    """The task object, the removed task id, ``{"account": ..., "task": ..., "before": ...}``
    (the task now stands before that one, or last when it is null) or
    ``{"account": ..., "tasks": [...]}`` (an account's whole order)."""
    commit: bool
    """Whether the line ends a commit (a commit applies whole or not at all)."""


def encode_journal_line(seq: int, kind: str, value: Any, *, commit: bool) -> bytes:
    """One journal line (newline included), its CRC-32 covering everything before it."""
    change: dict[str, Any] = {"seq": seq, kind: value}
    if commit:
        change["commit"] = True
    payload = orjson.dumps(change, default=json_default)
    return b'%s,"crc":"%08x"}\n' % (payload[:-1], zlib.crc32(payload))


def decode_journal_line(line: bytes) -> JournalLine | None:
    """The line (without its newline), or None when it is torn or fails its checksum."""
    if len(line) <= _CRC_SUFFIX or not line.endswith(b'"}') or not line.startswith(b"{"):
        return None
    suffix = line[-_CRC_SUFFIX:]
    if not suffix.startswith(b',"crc":"'):
        return None
    payload = line[:-_CRC_SUFFIX] + b"}"
    try:
        if int(suffix[8:16], 16) != zlib.crc32(payload):
            return None
        change = orjson.loads(payload)
    except ValueError:
        return None
    if not isinstance(change, dict):
        return None
    seq = change.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return None
    for kind in ("put", "remove", "move", "order"):
        if kind in change:
            return JournalLine(seq, kind, change[kind], change.get("commit") is True)
    return None
