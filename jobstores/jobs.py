"""APScheduler's view of the task table: a trigger and a job per task, and the due index.

This module and ``scheduler/engine.py`` are the only homes of APScheduler's private API.
The view follows the table (it listens to every record change, under the table's lock);
it never changes a record itself.
"""

from __future__ import annotations

import bisect
import math
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


class TaskTrigger(BaseTrigger):
    """An interval trigger gated by an hour window and an end time.

    ``get_next_fire_time`` is :meth:`Schedule.next_run`, so APScheduler never sees a window
    rule of its own.
    """

    __slots__ = ("schedule",)

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
        return self.schedule.next_run(previous_fire_time, now)

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
    """The APScheduler job of one task; also remembers where it is filed in the due index."""

    __slots__ = ("filed_at", "planned")

    @classmethod
    def adopt(cls, job: Job) -> TaskJob:
        """``job`` itself if it is a TaskJob, else a TaskJob copy of it."""
        if isinstance(job, cls):
            return job
        copy = cls.__new__(cls)
        for name in Job.__slots__:
            if name != "__weakref__" and hasattr(job, name):
                setattr(copy, name, getattr(job, name))
        copy.planned = None
        return copy

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


def _timestamp(when: datetime | None) -> float:
    return math.inf if when is None else float(when.timestamp())


class JobView:
    """A job for every schedulable record, ordered by next run time (paused ones last).

    Jobs exist only between :meth:`attach` (APScheduler started the store) and
    :meth:`detach`. Callers hold the table's lock.
    """

    def __init__(self, zone: tzinfo, run_target: Callable[[], Any]) -> None:
        self._zone = zone
        self._target = run_target
        self._jobs: dict[str, TaskJob] = {}
        self._index: list[tuple[float, str]] = []
        self._triggers: dict[Schedule, TaskTrigger] = {}
        self._names: dict[str, str] = {}
        self._scheduler: Any = None
        self._alias: str | None = None

    @property
    def attached(self) -> bool:
        """Whether APScheduler runs this view."""
        return self._scheduler is not None

    def trigger(self, record: TaskRecord) -> TaskTrigger:
        """The trigger that plans ``record``'s runs (shared by tasks with the same schedule)."""
        schedule = Schedule.of(record, self._zone)
        trigger = self._triggers.get(schedule)
        if trigger is None:
            trigger = self._triggers[schedule] = TaskTrigger(schedule)
        return trigger

    def attach(
        self, scheduler: Any, alias: str, records: Iterable[TaskRecord]
    ) -> list[tuple[str, Exception]]:
        """APScheduler started: build a job for every schedulable record.

        Returns the tasks whose job could not be built, with the error (the others carry on).
        """
        self._scheduler = scheduler
        self._alias = alias
        self._jobs.clear()
        faults: list[tuple[str, Exception]] = []
        for record in records:
            if lifecycle.schedulable(record):
                try:
                    job = self._build(record)
                except Exception as exc:
                    faults.append((record.task_id, exc))
                    continue
                job.filed_at = _timestamp(job.next_run_time)
                self._jobs[job.id] = job
        self._index = sorted((job.filed_at, task_id) for task_id, job in self._jobs.items())
        return faults

    def detach(self) -> None:
        """APScheduler shut down: the jobs are let go."""
        self._jobs.clear()
        self._index.clear()
        self._scheduler = None

    # ------------------------------------------------------------------ queries

    def lookup(self, task_id: str) -> TaskJob | None:
        """The job of ``task_id``, or None."""
        return self._jobs.get(task_id)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._jobs

    def due(self, now: datetime) -> list[TaskJob]:
        """Jobs whose next run time is at or before ``now``, earliest first."""
        end = bisect.bisect_right(self._index, (now.timestamp(), "\U0010ffff"))
        return [self._jobs[task_id] for _, task_id in self._index[:end]]

    def next_run_time(self) -> datetime | None:
        """The earliest next run time, or None when nothing is scheduled."""
        if not self._index or self._index[0][0] == math.inf:
            return None
        return self._jobs[self._index[0][1]].next_run_time  # type: ignore[no-any-return]

    def all(self) -> list[TaskJob]:
        """Every job, earliest first, paused jobs last."""
        return [self._jobs[task_id] for _, task_id in self._index]

    # ------------------------------------------------------------------ changes

    def drop(self, task_id: str) -> None:
        """Forget ``task_id``'s job (if any)."""
        job = self._jobs.pop(task_id, None)
        if job is not None:
            # The job's place in the index is the one it was filed under: APScheduler changes
            # a job's next run time before it calls update_job().
            key = (job.filed_at, task_id)
            position = bisect.bisect_left(self._index, key)
            if position < len(self._index) and self._index[position] == key:
                del self._index[position]

    def place(self, job: Job) -> TaskJob:
        """File ``job`` (replacing the one of the same id) under its next run time."""
        self.drop(job.id)
        adopted = TaskJob.adopt(job)
        adopted.filed_at = _timestamp(adopted.next_run_time)
        self._jobs[adopted.id] = adopted
        bisect.insort(self._index, (adopted.filed_at, adopted.id))
        return adopted

    def sync(self, task_id: str, record: TaskRecord | None) -> None:
        """Make ``task_id``'s job agree with its record (a table listener)."""
        if self._scheduler is None:
            return
        if record is None or not lifecycle.schedulable(record):
            self.drop(task_id)
            return
        job = self._jobs.get(task_id)
        wanted = _job_time(record)
        if job is None:
            self.place(self._build(record))
            return
        job.planned = record.next_execution_time
        trigger = self.trigger(record)
        if job.trigger is not trigger:  # the task's rules were edited
            job.trigger = trigger
        if not same_instant(job.next_run_time, wanted):
            job._modify(next_run_time=wanted)
            self.place(job)

    def _build(self, record: TaskRecord) -> TaskJob:
        # Fill the job's slots directly, as APScheduler's own stores do when they restore a
        # job (Job.__setstate__): Job.__init__ re-validates the callable's signature with
        # inspect, which is most of the cost of starting a dispatcher with many tasks.
        job = TaskJob.__new__(TaskJob)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        job.id = record.task_id
        name = f"{record.task_type} for {record.account_id}"
        job.name = self._names.setdefault(name, name)
        job.func = self._target
        job.func_ref = None
        job.args = ()
        job.kwargs = _NO_KWARGS
        job.trigger = self.trigger(record)
        job.executor = "default"
        job.misfire_grace_time = None
        job.coalesce = True
        job.max_instances = 1
        job.next_run_time = _job_time(record)
        job.planned = record.next_execution_time
        return job


def _job_time(record: TaskRecord) -> datetime | None:
    return None if record.status is TaskStatus.PAUSED else record.start_time
