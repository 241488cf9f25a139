"""From what a caller passes to ``add_task`` or ``update_task`` to a valid task record.

The one place where keywords become a :class:`~tasks.model.TaskRecord` (which itself validates
each field): the account is found among the keywords, record fields are refused as task
keywords, kwargs are checked to be plain JSON, and the first (or next) run is planned.
Nothing here saves or schedules.
"""

from __future__ import annotations

import enum
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Protocol

from pydantic import ValidationError

from jobstores.loading import describe_validation_error
from jobstores.table import TaskTable
from tasks.errors import InvalidTaskError, TaskExistsError
from tasks.model import RESERVED_KWARGS, TaskRecord, check_json_value, new_task_id_problem
from tasks.policy import RunPolicy
from tasks.schedule import Schedule

__all__ = ["UNSET", "IntakeStore", "TaskIntake", "Unset"]

_SCHEDULING_KEYWORDS = frozenset(
    {
        "sys_type",
        "task_type",
        "interval",
        "valid_time_range",
        "task_end_time",
        "task_id",
        "run_policy",
    }
)


class Unset(enum.Enum):
    """The type of :data:`UNSET`."""

    UNSET = "unset"


UNSET = Unset.UNSET
"""``update_task``'s default: the field keeps its value (None is a value: no end)."""


def _account(keywords: Mapping[str, Any], suffix: str, required: bool) -> Any:
    explicit = suffix.lstrip("_")
    if explicit in keywords:
        return keywords[explicit]
    matches = sorted(key for key in keywords if key.endswith(suffix))
    if len(matches) > 1:
        raise InvalidTaskError(
            explicit, f"ambiguous: several keywords end in {suffix!r}: {matches}"
        )
    if matches:
        return keywords[matches[0]]
    if required:
        raise InvalidTaskError(
            explicit, f"is required: pass {explicit}= or a keyword ending in {suffix!r}"
        )
    return None


class IntakeStore(Protocol):
    """What the intake reads of a store: the ids its table holds, its zone, schedules (a
    dispatcher's job store, or a stopped store owned for a change)."""

    @property
    def table(self) -> TaskTable:
        """The task table (which ids are taken)."""
        ...

    @property
    def timezone(self) -> tzinfo:
        """The zone of the hour windows."""
        ...

    def schedule(self, record: TaskRecord) -> Schedule:
        """When ``record`` may run, in that zone."""
        ...


class TaskIntake:
    """Validates new tasks and edits against the store's records and zone."""

    def __init__(self, store: IntakeStore) -> None:
        self._store = store

    def new_records(self, tasks: Iterable[Mapping[str, Any]], now: datetime) -> list[TaskRecord]:
        """One record per item of ``add_task`` keywords; ids unique within the batch too."""
        records: list[TaskRecord] = []
        taken: set[str] = set()
        for keywords in tasks:
            record = self.new_record(now, dict(keywords), taken)
            taken.add(record.task_id)
            records.append(record)
        return records

    def new_record(self, now: datetime, keywords: dict[str, Any], taken: set[str]) -> TaskRecord:
        """Validate ``add_task``'s keywords and build the new task's record."""
        if "valid_time_rage" in keywords:
            warnings.warn(
                "valid_time_rage is a misspelling; use valid_time_range",
                DeprecationWarning,
                stacklevel=5,
            )
            if "valid_time_range" in keywords:
                raise InvalidTaskError("valid_time_rage", "give valid_time_range only")
            keywords["valid_time_range"] = keywords.pop("valid_time_rage")
        task_id = keywords.get("task_id")
        if task_id is None:
            task_id = uuid.uuid4().hex[:12]
            while task_id in taken or self._store.table.taken(task_id):
                task_id = uuid.uuid4().hex[:12]
        elif not isinstance(task_id, str):
            raise InvalidTaskError("task_id", f"must be a string, not {type(task_id).__name__}")
        elif (problem := new_task_id_problem(task_id)) is not None:
            raise InvalidTaskError("task_id", problem)
        elif task_id in taken:
            raise TaskExistsError(task_id, f"{task_id!r} appears more than once in this batch")
        elif self._store.table.taken(task_id):
            raise TaskExistsError(task_id)
        return self.validated(now, keywords, task_id, created_at=now, previous=None)

    def validated(
        self,
        now: datetime,
        keywords: Mapping[str, Any],
        task_id: str,
        *,
        created_at: datetime,
        previous: datetime | None,
    ) -> TaskRecord:
        """The record of ``task_id`` built from ``add_task``'s keywords, with its next run
        planned from ``previous`` (its last run); raises :class:`InvalidTaskError`."""
        for field in ("sys_type", "task_type", "interval"):
            if keywords.get(field) is None:
                raise InvalidTaskError(field, "is required")
        extra = {k: v for k, v in keywords.items() if k not in _SCHEDULING_KEYWORDS}
        for key in extra:
            if key in RESERVED_KWARGS:
                raise InvalidTaskError(
                    key, "is a task record field the dispatcher keeps; it cannot be a task keyword"
                )
        account_id = _account(extra, "_account_id", required=True)
        account_name = _account(extra, "_account_name", required=False)
        try:
            check_json_value(extra, "kwargs")
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            raise InvalidTaskError(field, message) from None
        window = keywords.get("valid_time_range")
        policy = keywords.get("run_policy")
        try:
            record = TaskRecord.model_validate(
                {
                    "task_id": task_id,
                    "account_id": account_id,
                    "account_name": account_name,
                    "task_type": keywords["task_type"],
                    "sys_type": keywords["sys_type"],
                    "interval": keywords["interval"],
                    "valid_time_range": (0, 24) if window is None else window,
                    "task_end_time": keywords.get("task_end_time"),
                    "run_policy": None if policy is None or policy == {} else policy,
                    "created_at": created_at,
                    "updated_at": now,
                    "kwargs": {**extra, "task_id": task_id, "task_type": keywords["task_type"]},
                },
                context={"zone": self._store.timezone, "kwargs_checked": True},
            )
        except ValidationError as exc:
            raise InvalidTaskError(*describe_validation_error(exc)) from None
        if record.run_policy is not None and record.run_policy.is_default:
            record = record.replace(run_policy=None)
        schedule = self._store.schedule(record)
        if schedule.ended(now):
            raise InvalidTaskError("task_end_time", f"{record.task_end_time} is already past")
        first = schedule.next_run(previous, now)
        if first is None:
            raise InvalidTaskError(
                "task_end_time",
                f"no run can start before {record.task_end_time} within hours "
                f"{record.valid_time_range[0]}-{record.valid_time_range[1]}",
            )
        return record.replace(next_execution_time=first)

    def edited(
        self,
        current: TaskRecord,
        now: datetime,
        *,
        interval: float | timedelta | Unset,
        valid_time_range: Sequence[int] | Unset,
        task_end_time: date | datetime | str | Unset | None,
        run_policy: RunPolicy | Mapping[str, Any] | Unset | None,
        kwargs: Mapping[str, Any] | Unset,
    ) -> TaskRecord:
        """``current``'s rules with the fields given changed, validated as ``add_task``
        validates them, the next run planned from its last run."""
        keywords: dict[str, Any] = {
            key: value
            for key, value in current.kwargs.items()
            if key not in ("task_id", "task_type")
        }
        if not isinstance(kwargs, Unset):
            keywords = self._new_kwargs(current, kwargs)
        keywords.update(
            sys_type=current.sys_type,
            task_type=current.task_type,
            interval=current.interval if isinstance(interval, Unset) else interval,
            valid_time_range=(
                current.valid_time_range
                if isinstance(valid_time_range, Unset)
                else valid_time_range
            ),
            task_end_time=current.task_end_time
            if isinstance(task_end_time, Unset)
            else task_end_time,
            run_policy=self._new_policy(current, run_policy),
        )
        rules = self.validated(
            now,
            keywords,
            current.task_id,
            created_at=current.created_at,
            previous=current.grid_time,
        )
        if rules.account_id != current.account_id:
            raise InvalidTaskError(
                "kwargs",
                f"names account {rules.account_id!r}: a task cannot move to another account "
                f"(it belongs to {current.account_id!r}); add a new task instead",
            )
        return rules

    @staticmethod
    def _new_kwargs(current: TaskRecord, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(kwargs, Mapping):
            raise InvalidTaskError("kwargs", f"must be a dict, not {type(kwargs).__name__}")
        keywords = dict(kwargs)
        for key in ("task_id", "task_type"):
            if key in keywords and keywords.pop(key) != getattr(current, key):
                raise InvalidTaskError(
                    f"kwargs.{key}", f"cannot change (it is {getattr(current, key)!r})"
                )
        clash = sorted(_SCHEDULING_KEYWORDS & keywords.keys())
        if clash:
            raise InvalidTaskError(
                f"kwargs.{clash[0]}", "is a parameter of update_task, not a task keyword"
            )
        return keywords

    @staticmethod
    def _new_policy(
        current: TaskRecord, run_policy: RunPolicy | Mapping[str, Any] | Unset | None
    ) -> RunPolicy | Mapping[str, Any] | None:
        if isinstance(run_policy, Unset):
            return current.run_policy
        if isinstance(run_policy, Mapping) and current.run_policy is not None:
            return {**current.run_policy.model_dump(), **run_policy}
        return run_policy
