"""APScheduler's view of the task table: the due index, and jobs built from records on demand.

This module and ``scheduler/engine.py`` are the only homes of APScheduler's private API.
The view follows the table (it listens to every record change, under the table's lock);
it never changes a record itself.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.job import Job
from apscheduler.triggers.base import BaseTrigger

from tasks import lifecycle
from tasks.model import TaskRecord, TaskStatus
from tasks.schedule import Schedule, Window, same_instant

__all__ = ["JobView", "TaskJob", "TaskTrigger"]

_NO_KWARGS: dict[str, Any] = {}  # shared by every job: the run target takes none
_new_job = object.__new__
_NEVER = datetime.min.replace(tzinfo=UTC)  # no question asked yet


class TaskTrigger(BaseTrigger):
    """An interval trigger gated by an hour window and an end time.

    ``get_next_fire_time`` is :meth:`Schedule.next_run`, so APScheduler never sees a window
    rule of its own.
    """

    __slots__ = ("_last", "schedule")

    def __init__(
        self,
        schedule: Schedule | None = None,
        *,
        interval: timedelta | None = None,
        window: Window | None = None,
        end: datetime | None = None,
        zone: tzinfo | None = None,
    ) -> None:
        if schedule is None:
            if interval is None or window is None or zone is None:
                raise TypeError("TaskTrigger needs a schedule, or interval, window and zone")
            schedule = Schedule(interval=interval, window=window, end=end, zone=zone)
        self.schedule = schedule
        self._last: tuple[datetime | None, datetime, datetime | None] = (None, _NEVER, None)
        """The last question and its answer: a scheduler pass asks the same one twice per
        job (finding its run times, then its next run), with the same two objects."""

    @classmethod
    def for_record(cls, record: TaskRecord, zone: tzinfo) -> TaskTrigger:
        """The trigger that plans ``record``'s runs in ``zone``."""
        return cls(Schedule.of(record, zone))

    @property
    def interval(self) -> timedelta:
        """The time between planned runs."""
        return self.schedule.interval

    @property
    def window(self) -> Window:
        """The hour window."""
        return self.schedule.window

    @property
    def end(self) -> datetime | None:
        """The last instant at which a run may start."""
        return self.schedule.end

    @property
    def timezone(self) -> tzinfo:
        """The zone whose wall-clock hours the window is read in."""
        return self.schedule.zone

    def upcoming(self, first: datetime | None) -> Iterator[datetime]:
        """The planned run times from ``first`` on."""
        return self.schedule.upcoming(first)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        previous, asked_at, answer = self._last
        if previous is previous_fire_time and asked_at is now:
            return answer
        answer = self.schedule.next_run(previous_fire_time, now)
        self._last = (previous_fire_time, now, answer)
        return answer

    def __str__(self) -> str:
        start, stop = self.window
        until = f", until {self.end.isoformat()}" if self.end else ""
        return f"every {self.interval} within hours {start}-{stop}{until}"

    def __repr__(self) -> str:
        return (
            f"<TaskTrigger interval={self.interval!r} window={self.window!r} "
            f"end={self.end!r} timezone='{self.timezone}'>"
        )


class TaskJob(Job):
    """The APScheduler job of one task, built from its record when APScheduler asks for it."""

    __slots__ = ("planned",)

    def _get_run_times(self, now: datetime) -> list[datetime]:
        # A jittered run fires at its start (next_run_time) but stands for its planned time:
        # APScheduler counts the next run from the last time returned here, so the schedule
        # does not drift by the jitter.
        planned = getattr(self, "planned", None)
        start = self.next_run_time
        if planned is None or start is None or same_instant(planned, start):
            return super()._get_run_times(now)  # type: ignore[no-any-return]
        if start.astimezone(UTC) > now.astimezone(UTC):
            return []
        run_times = [planned]
        following = self.trigger.get_next_fire_time(planned, now)
        while following is not None and following.astimezone(UTC) <= now.astimezone(UTC):
            run_times.append(following)
            following = self.trigger.get_next_fire_time(following, now)
        return run_times


class JobView:
    """APScheduler's jobs, built from the records when asked for, over a compact due index.

    The index holds, for every schedulable record, the instant of its next run (paused ones
    at infinity, so last) and its task id, in two parallel arrays sorted by (instant, id): no
    job, trigger or tuple is kept per task. A job is built from its record each time
    APScheduler asks for one, as APScheduler's SQLAlchemyJobStore rebuilds its jobs from its
    rows. APScheduler hands a changed job back through the store, which changes the record;
    the record's change refiles the task here (:meth:`sync`). The record is the one source of
    truth for when a task runs.

    The index lives between :meth:`attach` (APScheduler started the store) and
    :meth:`detach`. Callers hold the table's lock.
    """

    def __init__(
        self, zone: tzinfo, run_target: Callable[[], Any], find: Callable[[str], TaskRecord | None]
    ) -> None:
        self._zone = zone
        self._target = run_target
        self._find = find
        self._times = array("d")
        self._ids: list[str] = []
        self._head = 0
        """Entries before it were taken off the front (a scheduler pass takes the earliest
        first): taking one off costs no move; the arrays are cut when half is taken."""
        self._dropped: set[str] = set()
        """Schedulable tasks APScheduler removed (or whose schedule raised): no job until
        their record changes or APScheduler adds them again."""
        self._triggers: dict[Schedule, TaskTrigger] = {}
        self._by_rules: dict[tuple[Any, ...], TaskTrigger] = {}
        """The same triggers by the fields of a record they are made of (all a trigger reads):
        a job is built for APScheduler at every question, so this is on the hot path."""
        self._assigned: dict[str, BaseTrigger] = {}
        """Triggers APScheduler gave a job (``modify_job(trigger=...)``): they hold until the
        task's record changes, which plans it by its own rules again."""
        self._scheduler: Any = None
        self._alias: str | None = None

    @property
    def attached(self) -> bool:
        """Whether APScheduler runs this view."""
        return self._scheduler is not None

    def trigger(self, record: TaskRecord) -> TaskTrigger:
        """The trigger that plans ``record``'s runs (shared by tasks with the same schedule)."""
        rules = (record.interval, record.valid_time_range, record.task_end_time)
        trigger = self._by_rules.get(rules)
        if trigger is None:
            schedule = Schedule.of(record, self._zone)
            trigger = self._triggers.get(schedule)
            if trigger is None:
                trigger = self._triggers[schedule] = TaskTrigger(schedule)
            self._by_rules[rules] = trigger
        return trigger

    def attach(
        self, scheduler: Any, alias: str, records: Iterable[TaskRecord]
    ) -> list[tuple[str, Exception]]:
        """APScheduler started: file every schedulable record.

        Returns the tasks whose trigger could not be built, with the error (they get no job;
        the others carry on).
        """
        self._scheduler = scheduler
        self._alias = alias
        self._dropped.clear()
        self._assigned.clear()
        faults: list[tuple[str, Exception]] = []
        keys: list[tuple[float, str]] = []
        schedulable, trigger, append = lifecycle.schedulable, self.trigger, keys.append
        instant = _Instants()
        for record in records:
            if not schedulable(record):
                continue
            try:
                trigger(record)
            except Exception as exc:
                faults.append((record.task_id, exc))
                self._dropped.add(record.task_id)
                continue
            append((_key(record, instant), record.task_id))
        keys.sort()
        self._times = array("d", [when for when, _ in keys])
        self._ids = [task_id for _, task_id in keys]
        self._head = 0
        return faults

    def detach(self) -> None:
        """APScheduler shut down: the index is let go."""
        self._times = array("d")
        self._ids = []
        self._head = 0
        self._dropped.clear()
        self._assigned.clear()
        self._scheduler = None

    # ------------------------------------------------------------------ queries

    def __contains__(self, task_id: object) -> bool:
        """Whether ``task_id`` has a job."""
        if self._scheduler is None or not isinstance(task_id, str) or task_id in self._dropped:
            return False
        record = self._find(task_id)
        return record is not None and lifecycle.schedulable(record)

    def __len__(self) -> int:
        return len(self._ids) - self._head

    def lookup(self, task_id: str) -> TaskJob | None:
        """The job of ``task_id`` (built now), or None."""
        if task_id not in self:
            return None
        record = self._find(task_id)
        assert record is not None
        return self._build(record)

    def due(
        self, now: datetime, limit: int | None = None
    ) -> tuple[list[TaskJob], list[tuple[str, Exception]]]:
        """Jobs whose next run time is at or before ``now``, earliest first (the first
        ``limit`` of them); and the tasks whose job could not be built, with the error."""
        end = bisect.bisect_right(self._times, now.timestamp(), self._head)
        if limit is not None:
            end = min(end, self._head + limit)
        return self._jobs_of(self._ids[self._head : end])

    def next_run_time(self) -> datetime | None:
        """The earliest next run time, or None when nothing is scheduled."""
        first = self.first()
        return None if first is None else first[1]

    def first(self) -> tuple[str, datetime] | None:
        """The task whose run is next, and when it starts; None when nothing is scheduled."""
        if self._head == len(self._ids) or self._times[self._head] == math.inf:
            return None
        task_id = self._ids[self._head]
        record = self._find(task_id)
        when = None if record is None else _job_time(record)
        return None if when is None else (task_id, when)

    def ids(self) -> list[str]:
        """The task ids with a job, earliest first, paused ones last."""
        return self._ids[self._head :]

    def all(self) -> tuple[list[TaskJob], list[tuple[str, Exception]]]:
        """Every job, earliest first, paused jobs last; and the tasks whose job could not be
        built, with the error."""
        return self._jobs_of(self.ids())

    def _jobs_of(self, ids: list[str]) -> tuple[list[TaskJob], list[tuple[str, Exception]]]:
        jobs: list[TaskJob] = []
        faults: list[tuple[str, Exception]] = []
        find, build, append = self._find, self._build, jobs.append
        for task_id in ids:
            record = find(task_id)
            if record is None:  # pragma: no cover - a removed record is unfiled at once
                continue
            try:
                append(build(record))
            except Exception as exc:
                faults.append((task_id, exc))
        return jobs, faults

    # ------------------------------------------------------------------ changes

    def drop(self, task_id: str) -> None:
        """Take ``task_id``'s job away (APScheduler removed it, or it cannot be planned)
        until its record changes or :meth:`readmit`."""
        if self._scheduler is None or task_id in self._dropped:
            return
        record = self._find(task_id)
        if record is None or not lifecycle.schedulable(record):
            return
        self._unfile(task_id, _key(record))
        self._dropped.add(task_id)
        self._assigned.pop(task_id, None)

    def readmit(self, task_id: str) -> None:
        """Give ``task_id`` its job back after :meth:`drop` (APScheduler added it again)."""
        if task_id not in self._dropped:
            return
        self._dropped.discard(task_id)
        record = self._find(task_id)
        if record is not None and lifecycle.schedulable(record):
            self._file(task_id, _key(record))

    def assign(self, job: Job) -> None:
        """APScheduler handed ``job`` back: keep its trigger if it is a foreign one.

        A :class:`TaskTrigger` is always the record's: the job may have been built before the
        record's rules were edited, and the record decides.
        """
        if isinstance(job.trigger, TaskTrigger) or self._find(job.id) is None:
            self._assigned.pop(job.id, None)
        else:
            self._assigned[job.id] = job.trigger

    def sync(self, task_id: str, old: TaskRecord | None, new: TaskRecord | None) -> None:
        """Refile ``task_id`` after its record changed from ``old`` to ``new`` (a table
        listener; None: added or removed)."""
        if self._scheduler is None or old is new:
            return
        if self._assigned:
            self._assigned.pop(task_id, None)
        if (
            old is not None
            and new is not None
            and task_id not in self._dropped
            and _same_place(old, new)
        ):
            # Filed where it was (most changes are a run's progress); only an edit of the
            # rules needs its trigger checked.
            if not _same_rules(old, new) and lifecycle.schedulable(new):
                self.trigger(new)
            return
        dropped = task_id in self._dropped
        self._dropped.discard(task_id)
        filed = None if old is None or dropped or not lifecycle.schedulable(old) else _key(old)
        wanted = None if new is None or not lifecycle.schedulable(new) else _key(new)
        if filed != wanted:
            if filed is not None:
                self._unfile(task_id, filed)
            if wanted is not None:
                self._file(task_id, wanted)
        if (
            new is not None
            and wanted is not None
            and (filed is None or not _same_rules(old, new))  # filed: its rules were planned
        ):
            self.trigger(new)  # rules that cannot be planned raise to the change's caller

    def _position(self, when: float, task_id: str) -> int:
        """Where ``(when, task_id)`` is, or would be, filed."""
        low = bisect.bisect_left(self._times, when, self._head)
        high = bisect.bisect_right(self._times, when, low)
        return bisect.bisect_left(self._ids, task_id, low, high)

    def _file(self, task_id: str, when: float) -> None:
        position = self._position(when, task_id)
        if position == self._head and position > 0:
            # Before every live entry: the slot in front is free.
            position = self._head = position - 1
            self._times[position] = when
            self._ids[position] = task_id
            return
        self._times.insert(position, when)
        self._ids.insert(position, task_id)

    def _unfile(self, task_id: str, when: float) -> None:
        position = self._position(when, task_id)
        ids = self._ids
        if position == len(ids) or ids[position] != task_id or self._times[position] != when:
            # Not where its record says: look for it (never expected; keeps the index whole).
            try:
                position = ids.index(task_id, self._head)
            except ValueError:
                return
        if position == self._head:
            ids[position] = ""
            self._head += 1
            if self._head * 2 > len(ids):
                del self._times[: self._head]
                del ids[: self._head]
                self._head = 0
            return
        del self._times[position]
        del ids[position]

    def _build(self, record: TaskRecord) -> TaskJob:
        # Fill the job's slots directly, as APScheduler's own stores do when they restore a
        # job (Job.__setstate__): Job.__init__ re-validates the callable's signature with
        # inspect.
        task_id = record.task_id
        job = _new_job(TaskJob)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        job.id = task_id
        job.name = f"{record.task_type} for {record.account_id}"
        job.func = self._target
        job.func_ref = None
        job.args = ()
        job.kwargs = _NO_KWARGS
        job.trigger = (self._assigned and self._assigned.get(task_id)) or self.trigger(record)
        job.executor = "default"
        job.misfire_grace_time = None
        job.coalesce = True
        job.max_instances = 1
        job.next_run_time = None if record.status is TaskStatus.PAUSED else record.start_time
        job.planned = record.next_execution_time
        return job


def _same_rules(old: TaskRecord | None, new: TaskRecord) -> bool:
    """Whether ``new`` has the very rules (the objects) ``old`` has: all a trigger reads."""
    return (
        old is not None
        and old.interval is new.interval
        and old.valid_time_range is new.valid_time_range
        and old.task_end_time is new.task_end_time
    )


def _same_place(old: TaskRecord, new: TaskRecord) -> bool:
    """Whether ``new`` is filed where ``old`` is, without computing either place."""
    if (
        old.next_execution_time is not new.next_execution_time
        or old.next_start_time is not new.next_start_time
    ):
        return False
    if old.status is new.status:
        return True
    return (old.status is TaskStatus.PAUSED) == (new.status is TaskStatus.PAUSED) and (
        lifecycle.schedulable(old) == lifecycle.schedulable(new)
    )


class _Instants:
    """``when.timestamp()``, remembering the last time asked about: records loaded together
    share equal times (one object), so filing them all asks about the same few."""

    __slots__ = ("_instant", "_when")

    def __init__(self) -> None:
        self._when: datetime | None = None
        self._instant = 0.0

    def __call__(self, when: datetime) -> float:
        if when is not self._when:
            self._when, self._instant = when, float(when.timestamp())
        return self._instant


def _timestamp(when: datetime) -> float:
    return float(when.timestamp())


def _key(record: TaskRecord, instant: Callable[[datetime], float] = _timestamp) -> float:
    """Where ``record`` is filed: the instant of its next run (infinity when paused)."""
    if record.status is TaskStatus.PAUSED:
        return math.inf
    when = record.start_time
    return math.inf if when is None else instant(when)


def _job_time(record: TaskRecord) -> datetime | None:
    return None if record.status is TaskStatus.PAUSED else record.start_time
