"""The task record: the one place where task data is validated and converted."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from copy import deepcopy
from datetime import date, datetime, timedelta, tzinfo
from enum import StrEnum
from itertools import chain, compress, islice, repeat
from operator import attrgetter, itemgetter, not_
from typing import Any, Self, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from tasks.policy import DEFAULT_POLICY, RunPolicy
from tasks.secrets import mask_secrets

__all__ = [
    "MIN_INTERVAL",
    "RESERVED_KWARGS",
    "ActiveRun",
    "PendingRetry",
    "TaskRecord",
    "TaskStatus",
    "check_json_value",
    "json_default",
    "kwargs_problems",
    "new_task_id_problem",
    "parse_end_time",
    "share_record_values",
]

_MAX_JSON_INT = 2**63 - 1
_MAX_INTERVAL = 1000 * 365 * 86400
MIN_INTERVAL = 1
"""The shortest interval, in seconds: shorter ones would make the scheduler spin."""


class TaskStatus(StrEnum):
    """Where a task is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ERROR = "error"

    @property
    def settled(self) -> bool:
        """Whether no run may start in this status (paused or completed)."""
        return self in _SETTLED


_SETTLED = frozenset({TaskStatus.PAUSED, TaskStatus.COMPLETED})


def json_default(value: Any) -> Any:
    """What a fast JSON encoder (orjson) cannot encode itself in a saved record.

    Nested models become their JSON form; dates and datetimes whose class is a subclass (the
    time-travel classes of test tools) become ISO-8601 text with their offset.
    """
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def check_json_value(value: Any, path: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``value`` survives a JSON round trip unchanged.

    Only dicts with string keys, lists, strings, finite floats, 64-bit ints, bools and None
    qualify: anything else would come back from the file as a different type, and the stored
    kwargs must re-create the task manager exactly.
    """
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if abs(value) > _MAX_JSON_INT:
            raise ValueError(f"{path}: integer {value} is too large to store")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value} is not a JSON number")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            check_json_value(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: key {key!r} is not a string")
            check_json_value(item, f"{path}.{key}")
        return
    raise ValueError(
        f"{path}: {type(value).__name__} is not JSON-serialisable "
        "(use str, int, float, bool, None, list or dict)"
    )


def _id_text_problem(value: str) -> str | None:
    """Why ``value`` cannot be any saved id (task or account), or None."""
    if value.isprintable() and value == value.strip():
        return None  # every record loaded passes here: two calls in C, no loop
    if value != value.strip():
        return f"{value!r} starts or ends with whitespace"
    for position, char in enumerate(value):
        if not char.isprintable():
            return f"{value!r} holds the unprintable character {char!r} at position {position}"
    return None


def new_task_id_problem(task_id: str) -> str | None:
    """Why ``task_id`` cannot name a new task, or None when it can.

    A task id is one segment of the control API's and the dashboard's URLs
    (``/api/v1/tasks/<id>/pause``), percent-encoded there, so any printable text works
    (``账号1-运营``, ``a b``, ``50%``, ``q?``, ``#1``) except what no encoding gets through
    every HTTP client and browser: ``/`` (a path separator once decoded) and the whole ids
    ``.`` and ``..`` (clients collapse them as "this" and "the parent" segment). Control and
    other unprintable characters and surrounding whitespace are refused too. Records saved
    before this rule keep loading: it applies only when a task is added.
    """
    problem = _id_text_problem(task_id)
    if problem is not None:
        return problem
    if "/" in task_id:
        return f"{task_id!r} contains '/', which cannot be part of a URL path segment"
    if task_id in (".", ".."):
        return f"{task_id!r} cannot be a task id: URLs read it as a relative path segment"
    return None


def parse_end_time(text: str) -> date | datetime:
    """``task_end_time`` from text: a date (``2099-01-01``, ``20990101``) or an ISO datetime.

    Anything :meth:`date.fromisoformat` reads is a date (the whole day counts); only text
    with a time of day is a datetime (an exact cut-off). Raises ``ValueError``.
    """
    text = text.strip()
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"must be a date (YYYY-MM-DD) or an ISO-8601 datetime, got {text!r}"
        ) from None


def _zone(info: ValidationInfo) -> tzinfo | None:
    context = info.context or {}
    zone = context.get("zone")
    return zone if isinstance(zone, tzinfo) else None


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    """Make ``value`` aware; naive values (the seed's own files) are wall times of the zone."""
    zone = _zone(info)
    if value.tzinfo is None or value.utcoffset() is None:
        if zone is None:
            raise ValueError("datetime must be timezone-aware")
        return value.replace(tzinfo=zone)
    return value.astimezone(zone) if zone is not None else value


class ActiveRun(BaseModel):
    """The run of a task that is out (submitted, not yet finished): the run ledger's entry.

    Saved in the record, so a run still out when the dispatcher stops is neither sent again
    nor forgotten after a restart.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str = Field(min_length=1)
    scheduled_at: datetime
    submitted_at: datetime
    attempt: int = Field(default=1, ge=1)
    started_at: datetime | None = None
    """When it started executing (None: still queued)."""
    manual: bool = False
    """Asked for by an operator ("run now"), not planned: it neither moves the task's
    planned runs nor counts toward its auto-pause."""

    @property
    def queued(self) -> bool:
        """Whether the run waits for a worker to start it."""
        return self.started_at is None


class PendingRetry(BaseModel):
    """A retry of a failed run, planned and saved in the record until it opens."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    """When the retry may start."""
    attempt: int = Field(ge=2)
    """Its attempt number (the planned run is attempt 1)."""
    scheduled_at: datetime
    """The planned time of the run it retries."""


class TaskRecord(BaseModel):
    """Everything that is known about one task, as saved in ``dispatch_config.json``.

    Records are immutable: the dispatcher replaces a record when the task changes, and the
    records it hands out are snapshots.
    """

    model_config = ConfigDict(frozen=True, extra="allow", validate_default=True)

    task_id: str = Field(min_length=1, max_length=256)
    account_id: str = Field(min_length=1, max_length=256)
    account_name: str | None = None
    task_type: str = Field(min_length=1)
    sys_type: str = Field(min_length=1)
    status: TaskStatus = TaskStatus.PENDING
    interval: int | float
    valid_time_range: tuple[int, int] = (0, 24)
    task_end_time: date | datetime | None = None
    last_execution_time: datetime | None = None
    next_execution_time: datetime | None = None
    created_at: datetime
    updated_at: datetime
    kwargs: dict[str, Any] = Field(default_factory=dict)
    run_count: int = Field(default=0, ge=0)
    failure_count: int = Field(default=0, ge=0)
    consecutive_failures: int = Field(default=0, ge=0)
    last_error: str | None = None
    last_worker: str | None = None
    """The worker that ran the last run (None: this process)."""
    active_run: ActiveRun | None = None
    """The run that is out right now, if any."""
    run_policy: RunPolicy | None = None
    """Jitter, retries, run timeout, auto-pause (None: the defaults, which change nothing)."""
    paused_reason: str | None = None
    """Why the dispatcher paused the task itself (None: not paused, or paused on request)."""
    next_start_time: datetime | None = None
    """When the next run starts: ``next_execution_time`` plus its jitter, drawn once and
    saved (None: it starts at ``next_execution_time``)."""
    retry: PendingRetry | None = None
    """The retry of a failed run, waiting for its time (None: none)."""
    run_requested: datetime | None = None
    """When an operator asked for a run now that has not started yet (None: none asked)."""
    last_planned_time: datetime | None = None
    """The planned time of the last run: the point of the task's grid that the next run is
    counted from (``last_execution_time`` is when that run started, later by its jitter or
    its wait for the account). None: no run yet, or a record saved before it was kept."""

    @field_validator("task_id", "account_id")
    @classmethod
    def _printable_id(cls, value: str) -> str:
        problem = _id_text_problem(value)
        if problem is not None:
            raise ValueError(f"must be printable, without surrounding whitespace: {problem}")
        return value

    @field_validator("interval", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number of seconds or a timedelta, not {value!r}")
        if value <= 0:
            raise ValueError(f"must be positive, got {value!r}")
        if value < MIN_INTERVAL:
            raise ValueError(f"must be at least {MIN_INTERVAL} second, got {value!r}")
        if value > _MAX_INTERVAL:
            raise ValueError(f"must be at most {_MAX_INTERVAL} seconds (1000 years)")
        if isinstance(value, float) and not math.isfinite(value):  # pragma: no cover - > max
            raise ValueError(f"must be finite, got {value!r}")
        return int(value) if float(value).is_integer() else value

    @field_validator("valid_time_range", mode="before")
    @classmethod
    def _window(cls, value: Any) -> tuple[int, int]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"must be a pair [start_hour, end_hour], got {value!r}")
        start, end = value
        for hour in (start, end):
            if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 24:
                raise ValueError(f"hours must be whole numbers from 0 to 24, got {value!r}")
        if start == end:
            raise ValueError(f"start and end hour must differ, got {value!r} (use [0, 24])")
        if (start, end) == (24, 0):
            # Open while hour >= 24 or hour < 0: never.
            raise ValueError(f"{list(value)!r} never opens (use [0, 24] for all day)")
        return (start, end)

    @field_validator("task_end_time", mode="before")
    @classmethod
    def _end(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = parse_end_time(value)
        if isinstance(value, datetime):
            return _aware(value, info)
        if value is None or isinstance(value, date):
            return value
        raise ValueError(f"must be a date, a datetime or None, not {type(value).__name__}")

    @field_validator("kwargs")
    @classmethod
    def _json_kwargs(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # The caller may have checked already (values fresh from orjson are JSON by
        # construction; add_task checks first to name the exact path).
        if not (info.context or {}).get("kwargs_checked"):
            check_json_value(value, "kwargs")
        return value

    @model_validator(mode="after")
    def _normalise(self, info: ValidationInfo) -> TaskRecord:
        values = self.__dict__
        for name in _TIMES:
            value = values[name]
            if value is not None:
                values[name] = _aware(value, info)
        values["valid_time_range"] = _shared_window(*values["valid_time_range"])
        # Every field of a record counts as set; one shared set instead of one per record
        # (about 700 bytes each), and one shared empty dict of extra keys, keep 100k records
        # affordable. Records are frozen: neither is ever mutated.
        object.__setattr__(self, "__pydantic_fields_set__", _ALL_FIELDS)
        if not self.__pydantic_extra__:
            object.__setattr__(self, "__pydantic_extra__", _NO_EXTRA)
        object.__setattr__(self, "__dict__", _compact_dict(type(self), values))
        return self

    @field_serializer("valid_time_range")
    def _window_list(self, value: tuple[int, int]) -> list[int]:
        return list(value)

    @property
    def window(self) -> tuple[int, int]:
        """The hour window ``(start, end)``; an alias of ``valid_time_range``."""
        return self.valid_time_range

    @property
    def policy(self) -> RunPolicy:
        """The run policy in effect (the defaults when the record has none)."""
        return self.run_policy or DEFAULT_POLICY

    @property
    def start_time(self) -> datetime | None:
        """When the next run starts (with its jitter), or None when none is planned."""
        planned, start = self.next_execution_time, self.next_start_time
        if planned is None or start is None or start.timestamp() < planned.timestamp():
            return planned
        return start

    @property
    def grid_time(self) -> datetime | None:
        """When the next run is counted from: the planned time of the last run (for a record
        saved before that was kept, when the last run started); None before the first run.
        Resuming or editing a task plans from here, so jitter never moves its grid."""
        return self.last_planned_time or self.last_execution_time

    @property
    def interval_delta(self) -> timedelta:
        """The interval as a ``timedelta``."""
        return timedelta(seconds=self.interval)

    def replace(self, **changes: Any) -> TaskRecord:
        """Return a copy with ``changes`` applied (field names only, values already valid).

        This is ``model_copy(update=changes)`` without copying the per-instance bookkeeping:
        records change on every run, so this is on the hot path.
        """
        values = list(_FIELD_VALUES(self))
        for name, value in changes.items():
            values[_FIELD_INDEX[name]] = value
        return _fields_only(type(self), values, self.__pydantic_extra__)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        """Validate ``obj`` as :meth:`BaseModel.model_validate` does; the record keeps its
        fields without an instance dict (see :func:`_fields_only`)."""
        validated = super().model_validate(obj, *args, **kwargs)
        return _fields_only(cls, _FIELD_VALUES(validated), validated.__pydantic_extra__)

    @classmethod
    def trusted(
        cls, raw: dict[str, Any], zone: tzinfo, times: dict[str, datetime] | None = None
    ) -> TaskRecord:
        """Rebuild a record from an object this library saved, without validating it.

        Only for objects whose checksum proved them unchanged since this library wrote them
        (validated then): the saved text is converted back to Python values exactly as
        :meth:`model_validate` would (ISO datetimes into ``zone``, the status enum, the hour
        window as a tuple, nested models), but no constraint is checked again. Anything
        unexpected goes through :meth:`model_validate`, so the result is always a valid record.

        ``times`` maps saved time texts to the times already made from them in ``zone``: records
        loaded together share equal times (and each text is parsed once).
        """
        record = cls.rebuilt(raw, zone, {} if times is None else times)
        if record is None:
            return cls.model_validate(raw, context={"zone": zone, "kwargs_checked": True})
        return record

    @classmethod
    def rebuilt(
        cls,
        raw: dict[str, Any],
        zone: tzinfo,
        times: dict[str, datetime],
        shared: dict[Any, Any] | None = None,
    ) -> TaskRecord | None:
        """What :meth:`trusted` makes of ``raw``, or None when ``raw`` is not laid out as this
        library writes records (every field, in field order, then the extras) or a value does
        not convert: the caller validates it then.

        ``shared`` makes the record reuse equal values of records loaded before it, as it is
        built (see :func:`share_record_values`).
        """
        return cls.rebuilt_all([raw], zone, times, shared)[0]

    @classmethod
    def rebuilt_all(
        cls,
        raws: Sequence[dict[str, Any]],
        zone: tzinfo,
        times: dict[str, datetime],
        shared: dict[Any, Any] | None = None,
    ) -> list[TaskRecord | None]:
        """:meth:`rebuilt` of each of ``raws``, in order.

        Records are rebuilt a few hundred at a time, a field at a time (one loop in C over
        those records per field, each distinct saved text converted once), not a record at
        a time: a cold start spends most of its time here.
        """
        return _rebuilt_all(cls, raws, zone, times, shared)

    def plain(self) -> dict[str, Any]:
        """The saved fields (extras included) as Python values, for a fast JSON encoder."""
        values = dict(zip(_FIELD_ORDER, _FIELD_VALUES(self)))  # noqa: B905 - one value per field name
        extra = self.__pydantic_extra__
        if extra:
            values.update(extra)
        return values

    def snapshot(self) -> TaskRecord:
        """A deep copy for callers: mutating its ``kwargs`` changes nothing here."""
        extra = self.__pydantic_extra__
        copy = _fields_only(type(self), _FIELD_VALUES(self), deepcopy(extra))
        _set(copy, "kwargs", deepcopy(self.kwargs))
        return copy

    def to_json_dict(self, *, masked: bool = False) -> dict[str, Any]:
        """The record exactly as saved: plain JSON types, datetimes as ISO-8601 with offset.

        ``masked`` replaces the values of secret-looking kwargs by ``***`` (for display).
        """
        data: dict[str, Any] = orjson.loads(orjson.dumps(self.plain(), default=json_default))
        if masked:
            data["kwargs"] = mask_secrets(data["kwargs"])
        return data


_ALL_FIELDS = set(TaskRecord.model_fields)
_Record = TypeVar("_Record", bound=TaskRecord)


def _compact_dict(cls: type[TaskRecord], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as a key-sharing dict: one table of field names for every record.

    CPython gives each instance dict of a class the class's shared table of keys when the
    attributes are stored through the instance, so a record's fields cost 8 bytes each
    instead of about 24 (roughly 550 bytes a record). pydantic assigns a plain dict, so a
    record made by calling the class is moved into a shared-key one here; the records the
    dispatcher keeps carry no dict at all (see :func:`_fields_only`).
    """
    compact = object.__new__(cls).__dict__
    # Item by item: updating an empty dict from a whole dict clones that dict's own table.
    compact.update(values.items())
    return compact


def _fields_only(
    cls: type[_Record], values: Iterable[Any], extra: dict[str, Any] | None
) -> _Record:
    """A record of ``values`` (every field's, valid, in field order) and ``extra`` keys.

    CPython keeps an instance's attributes in a row of values beside the object, keyed by the
    class's shared table of names, until something reads ``__dict__``; only then is a dict
    object made for it (64 bytes a record). So records are filled attribute by attribute and
    read the same way (:data:`_FIELD_VALUES`); other interpreters keep whatever they keep.
    """
    new = object.__new__(cls)
    # Set in field order by a loop in C: one call per field, no bytecode per field.
    deque(map(_set, repeat(new), _FIELD_ORDER, values), 0)
    _set(new, "__pydantic_fields_set__", _ALL_FIELDS)
    _set(new, "__pydantic_extra__", extra or _NO_EXTRA)
    _set(new, "__pydantic_private__", None)
    return new


def _share_field_names(cls: type[TaskRecord]) -> None:
    # CPython shrinks a class's shared key table for every instance created before the table
    # is filled, so fill it with every field, in order, before the first record exists.
    template = object.__new__(cls)
    for name in cls.model_fields:
        object.__setattr__(template, name, None)


_share_field_names(TaskRecord)
_set = object.__setattr__
_NO_EXTRA: dict[str, Any] = {}
_FIELD_ORDER = tuple(TaskRecord.model_fields)
_FIELD_VALUES = attrgetter(*_FIELD_ORDER)
_FIELD_INDEX = {name: index for index, name in enumerate(_FIELD_ORDER)}


_TIMES = (
    "last_execution_time",
    "next_execution_time",
    "next_start_time",
    "run_requested",
    "created_at",
    "updated_at",
    "last_planned_time",
)
_STATUSES = {status.value: status for status in TaskStatus}
_NESTED: dict[str, type[BaseModel]] = {
    "active_run": ActiveRun,
    "run_policy": RunPolicy,
    "retry": PendingRetry,
}


_WINDOWS: dict[tuple[int, int], tuple[int, int]] = {}


def _shared_window(start: int, end: int) -> tuple[int, int]:
    """One tuple per distinct hour window (at most 25 x 25 of them), shared by records."""
    window = (start, end)
    if type(start) is int and type(end) is int and 0 <= start <= 24 and 0 <= end <= 24:
        return _WINDOWS.setdefault(window, window)
    return window


def _trusted_time(value: str | datetime, zone: tzinfo) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return parsed.replace(tzinfo=zone)
    return parsed.astimezone(zone)


_FIELD_COUNT = len(_FIELD_ORDER)
_FIELD_ROW = itemgetter(*_FIELD_ORDER)
_EARLIER_ORDER = _FIELD_ORDER[:-1]
"""The fields of records saved before ``last_planned_time`` (the last field) was kept."""
_EARLIER_ROW = itemgetter(*_EARLIER_ORDER)
_SLOTS = ("__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
_SET_NAMES = (*_FIELD_ORDER, *_SLOTS)
"""What :func:`_fields_only` sets on a record, in its order: every field, then pydantic's slots."""
_NUMBERS = frozenset({int, float})
_CHUNK = 256
"""Records rebuilt together (see :func:`_rebuilt_all`)."""
_SHARED_STRINGS = ("account_id", "account_name", "task_type", "sys_type")
_SHARED_FIELDS = (*_SHARED_STRINGS, "interval")
"""The fields :func:`_share_columns` may replace (``kwargs`` it changes in place)."""


def _share_columns(columns: dict[str, Sequence[Any]], shared: dict[Any, Any]) -> None:
    """Make the values of records being loaded (``columns``: each field's values, one per
    record) reuse equal values of records loaded before them, kept in ``shared`` (each value
    its own key); one loop in C per field, none in Python per record.

    Account ids, names, task and system types, intervals and ``kwargs`` texts repeat across
    tasks, and a file parser creates a new object for every occurrence; all of them are
    immutable. A value is only shared with one of its own type (``3600`` is not ``3600.0``);
    a ``kwargs`` text equal to a task id becomes that task id itself. ``kwargs`` are changed
    in place, the other columns replaced.
    """
    setdefault = shared.setdefault
    for name in _SHARED_STRINGS:
        texts = columns[name]
        columns[name] = list(map(setdefault, texts, texts))
    intervals = columns["interval"]
    found = list(map(setdefault, intervals, intervals))
    if list(map(type, found)) != list(map(type, intervals)):  # 3600 met 3600.0 first
        found = [
            seen if type(seen) is type(own) else own
            for seen, own in zip(found, intervals, strict=True)
        ]
    columns["interval"] = found
    # Task ids first: a kwargs text equal to one (its own task's, usually) becomes it.
    task_ids = columns["task_id"]
    shared.update(zip(task_ids, task_ids, strict=True))
    kwargs = columns["kwargs"]
    values = list(chain.from_iterable(map(dict.values, kwargs)))
    texts_at = list(map(isinstance, values, repeat(str)))
    if all(texts_at):
        merged: Iterator[Any] = iter(list(map(setdefault, values, values)))
    else:
        # Texts come back shared, other values as they were: each position takes the next
        # value of its own kind (a bool indexes the pair).
        texts = list(compress(values, texts_at))
        kinds = (compress(values, map(not_, texts_at)), map(setdefault, texts, texts))
        merged = map(next, map(kinds.__getitem__, texts_at))
    # Each dict takes back as many values as it has keys, in its own key order; replacing the
    # values of its keys while iterating over them never changes its size.
    deque(
        map(dict.update, kwargs, map(zip, kwargs, map(islice, repeat(merged), map(len, kwargs)))), 0
    )


def share_record_values(records: Sequence[TaskRecord], shared: dict[Any, Any]) -> None:
    """Make records already built (validated, or changed at load) reuse equal values of
    records loaded before them, kept in ``shared``, as :meth:`TaskRecord.rebuilt_all` does
    as it builds them. They are the load's own until the load hands them out."""
    if len(records) > _CHUNK:  # a few hundred at a time, as _rebuilt_all does
        for start in range(0, len(records), _CHUNK):
            share_record_values(records[start : start + _CHUNK], shared)
        return
    if not records:
        return
    columns: dict[str, Sequence[Any]] = {
        name: list(map(attrgetter(name), records))
        for name in (*_SHARED_FIELDS, "task_id", "kwargs")
    }
    _share_columns(columns, shared)
    for name in _SHARED_FIELDS:
        deque(map(_set, records, repeat(name), columns[name]), 0)


def _rebuilt_all(
    cls: type[TaskRecord],
    raws: Sequence[dict[str, Any]],
    zone: tzinfo,
    times: dict[str, datetime],
    shared: dict[Any, Any] | None,
) -> list[TaskRecord | None]:
    """See :meth:`TaskRecord.rebuilt_all`."""
    if len(raws) > _CHUNK:
        # A few hundred at a time: each pass over a field then finds the records' objects
        # still in the processor's cache (at 100,000 records, whole-store passes were a
        # quarter slower than this).
        made: list[TaskRecord | None] = []
        for start in range(0, len(raws), _CHUNK):
            made += _rebuilt_all(cls, raws[start : start + _CHUNK], zone, times, shared)
        return made
    if all(map(_FIELD_ORDER.__eq__, map(tuple, raws))):  # every field, in field order
        rows = list(map(tuple, map(dict.values, raws)))
        return list(_converted(cls, rows, [_NO_EXTRA] * len(rows), zone, times, shared))
    made = [None] * len(raws)
    at: list[int] = []
    rows, extras = [], []
    for index, raw in enumerate(raws):
        keys = tuple(raw)
        if keys[:_FIELD_COUNT] == _FIELD_ORDER:  # extras follow the fields
            at.append(index)
            rows.append(_FIELD_ROW(raw))
            extras.append({key: raw[key] for key in keys[_FIELD_COUNT:]} or _NO_EXTRA)
        elif keys[: _FIELD_COUNT - 1] == _EARLIER_ORDER and _FIELD_ORDER[-1] not in raw:
            at.append(index)  # saved before the last field was kept: it is None
            rows.append((*_EARLIER_ROW(raw), None))
            extras.append({key: raw[key] for key in keys[_FIELD_COUNT - 1 :]} or _NO_EXTRA)
    for index, record in zip(at, _converted(cls, rows, extras, zone, times, shared), strict=True):
        made[index] = record
    return made


def _converted(
    cls: type[TaskRecord],
    rows: list[tuple[Any, ...]],
    extras: list[dict[str, Any]],
    zone: tzinfo,
    times: dict[str, datetime],
    shared: dict[Any, Any] | None,
) -> Sequence[TaskRecord | None]:
    """The records of ``rows``, None for each that does not convert: when a batch does not,
    each half is tried apart, down to the rows at fault."""
    if not rows:
        return []
    try:
        return _records(cls, rows, extras, zone, times, shared)
    except Exception:  # whatever a value raises, its record is validated instead
        if len(rows) == 1:
            return [None]
        half = len(rows) // 2
        return [
            *_converted(cls, rows[:half], extras[:half], zone, times, shared),
            *_converted(cls, rows[half:], extras[half:], zone, times, shared),
        ]


def _records(
    cls: type[TaskRecord],
    rows: list[tuple[Any, ...]],
    extras: list[dict[str, Any]],
    zone: tzinfo,
    times: dict[str, datetime],
    shared: dict[Any, Any] | None,
) -> list[TaskRecord]:
    """The records of ``rows`` (every field's saved value, in field order), converted a field
    at a time; raises if any value does not convert. Each distinct text (a time, a status,
    an hour window, an end) is converted once, and records share what it converts to."""
    count = len(rows)
    columns: dict[str, Sequence[Any]] = dict(zip(_FIELD_ORDER, zip(*rows)))  # noqa: B905 - rows are whole
    columns["status"] = list(map(_STATUSES.__getitem__, columns["status"]))
    pairs = list(map(tuple, columns["valid_time_range"]))
    windows = {pair: _shared_window(*pair) for pair in set(pairs)}
    columns["valid_time_range"] = list(map(windows.__getitem__, pairs))
    for name in _TIMES:
        texts = columns[name]
        for text in set(texts).difference(times):
            if text is not None:
                times[text] = _trusted_time(text, zone)
        columns[name] = list(map(times.get, texts))
    ends = columns["task_end_time"]
    end_of: dict[Any, date | datetime | None] = {None: None}
    for text in set(ends).difference(end_of):
        end = parse_end_time(text)
        end_of[text] = _trusted_time(end, zone) if isinstance(end, datetime) else end
    columns["task_end_time"] = list(map(end_of.__getitem__, ends))
    for name, model in _NESTED.items():
        nested = columns[name]
        if nested.count(None) != count:
            columns[name] = [
                None if value is None else model.model_validate(value) for value in nested
            ]
    if not _NUMBERS.issuperset(map(type, columns["interval"])) or set(
        map(type, columns["kwargs"])
    ) != {dict}:
        raise TypeError("an interval is not a number, or kwargs not an object")
    if shared is not None:
        _share_columns(columns, shared)
    records = list(map(_new, repeat(cls, count)))
    # Filled record by record, each in field order, by loops in C (as _fields_only does);
    # a setter bound to its record takes one argument tuple less per attribute.
    rows_of = zip(*columns.values(), repeat(_ALL_FIELDS), extras, repeat(None))
    deque(chain.from_iterable(map(map, map(_set.__get__, records), repeat(_SET_NAMES), rows_of)), 0)
    return records


_new = object.__new__


# Fields added after the seed's format that only the dispatcher sets: host keywords keep
# these names (``run_policy`` is the one new reserved keyword).
_INTERNAL_FIELDS = {
    "paused_reason",
    "next_start_time",
    "retry",
    "run_requested",
    "last_planned_time",
}

RESERVED_KWARGS = frozenset(
    _ALL_FIELDS - {"account_id", "account_name", "task_id", "task_type"} - _INTERNAL_FIELDS
)
"""Record fields that cannot be task keywords: the manager is created as
``factory(sys_type=..., **kwargs)``, and the rest belong to the dispatcher, not the manager.
(``kwargs`` also carry the account and, as the dispatcher sets them, the task's id and type.)"""


def kwargs_problems(record: TaskRecord) -> list[tuple[str, str]]:
    """``(field, message)`` for what in ``record.kwargs`` cannot run as written."""
    problems = [
        (f"kwargs.{key}", "is a record field, not a task keyword")
        for key in record.kwargs
        if key in RESERVED_KWARGS
    ]
    own_id = record.kwargs.get("task_id", record.task_id)
    if own_id != record.task_id:
        problems.append(("kwargs.task_id", f"names task {own_id!r}, not this task"))
    return problems
