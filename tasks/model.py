"""The task record: the one place where task data is validated and converted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from copy import deepcopy
from datetime import date, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any, Self

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


def _check_text(value: str, path: str) -> None:
    """Raise ``ValueError`` naming ``path`` if ``value`` holds a lone surrogate (text no
    UTF-8 file or database can hold, as ``os.fsdecode`` makes of undecodable bytes)."""
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{path}: character {exc.start} ({value[exc.start]!r}) is a lone surrogate, "
            "which no UTF-8 text can hold"
        ) from None


def check_json_value(value: Any, path: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``value`` survives a JSON round trip unchanged.

    Only dicts with string keys, lists, strings, finite floats, 64-bit ints, bools and None
    qualify: anything else would come back from the file as a different type, and the stored
    kwargs must re-create the task manager exactly.
    """
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if not value.isascii():
            _check_text(value, path)
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


def _in_zone(value: datetime, zone: tzinfo | None) -> datetime:
    """``value`` in ``zone``; naive values (the seed's own files) are wall times of the zone."""
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
        if type(value) is int and MIN_INTERVAL <= value <= _MAX_INTERVAL:
            return value  # what a record loaded holds, mostly: the checks below let it pass
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
        if type(value) is list and len(value) == 2:  # as read from a file
            start, end = value
            if type(start) is int and type(end) is int:
                window = _WINDOWS.get((start, end))
                if window is not None:
                    return window
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
        if value is None:
            return value
        if isinstance(value, str):
            value = parse_end_time(value)
        if isinstance(value, datetime):
            return _in_zone(value, _zone(info))
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
        context = info.context  # read once: each read of it costs a call into pydantic
        zone = shared = None
        if context:
            zone, shared = context.get("zone"), context.get("shared")
            zone = zone if isinstance(zone, tzinfo) else None
        values = self.__dict__
        if shared is not None and zone is not None:
            # Records loaded together: each distinct time is put in the zone once and the
            # records share it, and equal texts become one (see share_record_values).
            _zone_shared(values, zone, shared)
            _share_values(values, shared)
        else:
            for name in _TIMES:
                value = values[name]
                if value is not None:
                    values[name] = _in_zone(value, zone)
            if shared is not None:
                _share(values, shared)
        window = values["valid_time_range"]
        values["valid_time_range"] = _WINDOWS.get(window, window)
        # What pydantic keeps for each instance, made small enough for 100,000 records (see
        # docs/performance.md): every field counts as set, in one shared set (a set per
        # record is 1.2 KB); records without extra keys share one empty dict; and the fields
        # move to a dict that shares its class's table of keys (280 bytes instead of 830).
        # Records are frozen: none of these is ever mutated.
        object.__setattr__(self, "__pydantic_fields_set__", _ALL_FIELDS)
        if not self.__pydantic_extra__:
            object.__setattr__(self, "__pydantic_extra__", _NO_EXTRA)
        object.__setattr__(self, "__dict__", _key_sharing(type(self), values))
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

        This is ``model_copy(update=changes)``, except that the copy shares what every record
        shares (see :meth:`_normalise`) instead of copying it: records change on every run.
        """
        if not _ALL_FIELDS.issuperset(changes):
            raise KeyError(f"not record fields: {sorted(set(changes) - _ALL_FIELDS)}")
        values = self.__dict__.copy()  # a copy of a key-sharing dict shares the keys too
        values.update(changes)
        return self._constructed(values, self.__pydantic_extra__)

    @classmethod
    def _constructed(cls, values: dict[str, Any], extra: dict[str, Any] | None) -> Self:
        """The record of ``values`` (every field, valid) and ``extra`` keys, made as
        ``model_construct`` makes one (without its per-field loop)."""
        record = cls.__new__(cls)
        object.__setattr__(record, "__dict__", values)
        object.__setattr__(record, "__pydantic_fields_set__", _ALL_FIELDS)
        object.__setattr__(record, "__pydantic_extra__", extra or _NO_EXTRA)
        object.__setattr__(record, "__pydantic_private__", None)
        return record

    @classmethod
    def trusted(
        cls, raw: dict[str, Any], zone: tzinfo, times: dict[Any, datetime] | None = None
    ) -> TaskRecord:
        """A record from an object this library saved: :meth:`model_validate` in ``zone``,
        its ``kwargs`` taken as JSON already (they came from a JSON parser).

        ``times`` is kept by the caller across records loaded together: their equal values
        (times among them) become one object (see :func:`share_record_values`).
        """
        context = {"zone": zone, "kwargs_checked": True, "shared": times}
        return cls.model_validate(raw, context=context)

    @classmethod
    def rebuilt(
        cls,
        raw: dict[str, Any],
        zone: tzinfo,
        times: dict[Any, datetime],
        shared: dict[Any, Any] | None = None,
    ) -> TaskRecord | None:
        """:meth:`trusted`, or None when ``raw`` is not a valid record (the caller keeps it
        aside); ``shared``: see :func:`share_record_values`."""
        return cls.rebuilt_all([raw], zone, times, shared)[0]

    @classmethod
    def rebuilt_all(
        cls,
        raws: Sequence[dict[str, Any]],
        zone: tzinfo,
        times: dict[Any, datetime],
        shared: dict[Any, Any] | None = None,
    ) -> list[TaskRecord | None]:
        """:meth:`rebuilt` of each of ``raws``, in order."""
        made: list[TaskRecord | None] = []
        for raw in raws:
            try:
                made.append(cls.trusted(raw, zone, times))
            except Exception:  # invalid, or a time that does not fit in the zone
                made.append(None)
        if shared is not None:
            share_record_values([record for record in made if record is not None], shared)
        return made

    def plain(self) -> dict[str, Any]:
        """The saved fields (extras included) as Python values, for a fast JSON encoder."""
        extra = self.__pydantic_extra__
        return {**self.__dict__, **extra} if extra else self.__dict__.copy()

    def snapshot(self) -> TaskRecord:
        """A deep copy for callers: mutating its ``kwargs`` changes nothing here."""
        values = self.__dict__.copy()
        values["kwargs"] = deepcopy(self.kwargs)
        return self._constructed(values, deepcopy(self.__pydantic_extra__))

    def to_json_dict(self, *, masked: bool = False) -> dict[str, Any]:
        """The record exactly as saved: plain JSON types, datetimes as ISO-8601 with offset.

        ``masked`` replaces the values of secret-looking kwargs by ``***`` (for display).
        """
        data: dict[str, Any] = orjson.loads(orjson.dumps(self.plain(), default=json_default))
        if masked:
            data["kwargs"] = mask_secrets(data["kwargs"])
        return data


_ALL_FIELDS = set(TaskRecord.model_fields)
_NO_EXTRA: dict[str, Any] = {}
_TIMES = tuple(
    name
    for name, field in TaskRecord.model_fields.items()
    if field.annotation in (datetime, datetime | None)
)
"""The fields that hold an instant: each is put in the dispatcher's zone when a record is
made (read from the model, so a field added later is never left out)."""
_WINDOWS: dict[tuple[int, int], tuple[int, int]] = {
    (start, end): (start, end)
    for start in range(25)
    for end in range(25)
    if start != end and (start, end) != (24, 0)
}
"""One tuple per valid hour window, shared by the records."""


def _key_sharing(cls: type[TaskRecord], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` in a dict that shares its class's table of keys.

    CPython gives the dict of an instance made without attributes the class's shared table
    of keys, and keeps it shared as items are added one by one, so a record's fields cost 8
    bytes each instead of about 24. pydantic makes a plain dict; this moves it.
    """
    shared = object.__new__(cls).__dict__
    shared.update(values.items())  # item by item: a whole dict would bring its own table
    return shared


# Fill the shared table with every field, in order, before the first record: CPython shrinks
# the table it gives to instances made while the table is still filling.
_key_sharing(TaskRecord, dict.fromkeys(TaskRecord.model_fields))


def share_record_values(records: Sequence[TaskRecord], shared: dict[Any, Any]) -> None:
    """Make ``records`` reuse equal values of records loaded before them, kept in ``shared``.

    Account ids and names, task and system types, intervals, times and the texts in
    ``kwargs`` repeat across tasks; a text equal to a task id becomes that task id. The
    records are the load's own until it hands them out, so their values are replaced in
    place. Validation does the same with ``context={"shared": shared}``.
    """
    for record in records:
        _share(record.__dict__, shared)


def _share(values: dict[str, Any], shared: dict[Any, Any]) -> None:
    setdefault = shared.setdefault
    for name in _TIMES:  # equal, in the same zone and fold: the same time, written alike
        time = values[name]
        if type(time) is datetime:
            values[name] = setdefault((time, time.fold, time.tzinfo), time)
    _share_values(values, shared)


def _share_values(values: dict[str, Any], shared: dict[Any, Any]) -> None:
    """Share the texts and the interval of ``values`` (not its times)."""
    setdefault = shared.setdefault
    values["task_id"] = setdefault(values["task_id"], values["task_id"])
    for name in _SHARED_TEXTS:
        text = values[name]
        values[name] = setdefault(text, text)
    interval = values["interval"]  # 3600 and 3600.0 are equal, but not the same value
    values["interval"] = setdefault((type(interval), interval), interval)
    kwargs = values["kwargs"]
    for key, value in kwargs.items():
        if type(value) is str:
            kwargs[key] = setdefault(value, value)


def _zone_shared(values: dict[str, Any], zone: tzinfo, shared: dict[Any, Any]) -> None:
    """The times of ``values`` in ``zone``, each distinct one converted once for the records
    loaded together (kept in ``shared`` under the time as validated).

    Equal times (one instant, however written) are the same time in ``zone``, so the first
    conversion serves the others. Only plain datetimes of fold 0 are looked up that way (a
    naive time's fold is not part of its equality; subclasses keep their class).
    """
    for name in _TIMES:
        value = values[name]
        if value is None:
            continue
        if type(value) is datetime and not value.fold:
            same = shared.get(value)
            if same is None:
                same = shared[value] = _in_zone(value, zone)
            values[name] = same
        else:
            values[name] = _in_zone(value, zone)


_SHARED_TEXTS = ("account_id", "account_name", "task_type", "sys_type")


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
