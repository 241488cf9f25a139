"""``SchedulerCalls``: APScheduler's calls on the job store, turned into the core's commands.

APScheduler sees one job per schedulable task (a :class:`~jobstores.jobs.JobView` built from
the table) and calls the job store holding the table's lock (its job store lock). Here its
calls become commands: ``update_job`` is :class:`~jobstores.commands.Planned` (the next run
moved; None pauses, a time resumes), ``remove_job`` is :class:`~jobstores.commands.Exhausted`
(no further run: the task is completed and stays on file), a job that cannot be scheduled is
:class:`~jobstores.commands.Faulted`; a run waiting for its lane (the runner says which)
holds completion back until its end. They never write: each change requests a save, one per
scheduler pass (:meth:`SchedulerCalls.deferred_saves`), whose changes share one reading of the
clock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, tzinfo
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError

from jobstores.commands import Exhausted, Faulted, Planned, RunSettled
from jobstores.core import Applied, TaskCore
from jobstores.jobs import JobView
from jobstores.table import TaskTable
from tasks.events import DispatcherEvent, TaskCompleted
from tasks.model import TaskRecord

__all__ = ["SchedulerCalls"]

logger = logging.getLogger("jobstores.jsonfile")  # the store's log, as it always was


class SchedulerCalls:
    """APScheduler's side of one store: its jobs, and its calls as commands."""

    def __init__(
        self,
        table: TaskTable,
        core: TaskCore,
        jobs: JobView,
        zone: tzinfo,
        now: Callable[[], datetime],
        request_save: Callable[[], None],
        announce: Callable[[Sequence[DispatcherEvent]], None],
        completed: Callable[[TaskRecord], None],
        runs_waiting: Callable[[str], bool],
    ) -> None:
        self._table = table
        self.lock = table.lock
        self._core = core
        self.jobs = jobs
        self._zone = zone
        self._now = now
        self._request_save = request_save
        self._announce = announce
        self._completed = completed
        self._runs_waiting = runs_waiting
        self._defer_depth = 0
        self._deferred = False
        self._held_now: datetime | None = None
        """The clock reading of the :meth:`deferred_saves` block under way (None: none)."""

    def _pass_now(self) -> datetime:
        return self._held_now or self._now()

    # ------------------------------------------------------------------ saving

    def _persist(self) -> None:
        if self._defer_depth:
            self._deferred = True
        else:
            self._request_save()

    @contextlib.contextmanager
    def deferred_saves(self) -> Iterator[None]:
        """Request one save when the block ends instead of one per change inside it; the
        changes inside are stamped with one reading of the clock, taken when it began."""
        with self.lock:
            self._defer_depth += 1
            if self._defer_depth == 1:
                self._held_now = self._now()
        try:
            yield
        finally:
            with self.lock:
                self._defer_depth -= 1
                flush = not self._defer_depth and self._deferred
                if not self._defer_depth:
                    self._held_now = None
                if flush:
                    self._deferred = False
            if flush:
                self._request_save()

    # ------------------------------------------------------------------ jobs

    def attach(self, scheduler: Any, alias: str) -> None:
        """File every schedulable record (its job is built when APScheduler asks for it)."""
        with self.lock:
            self._faulted(self.jobs.attach(scheduler, alias, self._table.records()))

    def detach(self) -> None:
        """Let the jobs go (the records stay)."""
        with self.lock:
            self.jobs.detach()

    def lookup(self, job_id: str) -> Job | None:
        """The job of ``job_id``, or None."""
        with self.lock:
            return self.jobs.lookup(job_id)

    def due(self, now: datetime, limit: int) -> list[Job]:
        """The first ``limit`` jobs due at ``now``, earliest first."""
        with self.lock:
            jobs, faults = self.jobs.due(now, limit)
            self._faulted(faults)
            return list(jobs)

    def next_run_time(self) -> datetime | None:
        """The earliest next run time, or None."""
        with self.lock:
            return self.jobs.next_run_time()

    def first(self) -> tuple[str, datetime] | None:
        """The task whose run is next and when (None: nothing scheduled, or not started)."""
        with self.lock:
            return self.jobs.first()

    def all(self) -> list[Job]:
        """Every job, earliest first, paused jobs last."""
        with self.lock:  # one job per task, built now
            jobs, faults = self.jobs.all()
            self._faulted(faults)
            return list(jobs)

    def _faulted(self, faults: list[tuple[str, Exception]]) -> None:
        for task_id, exc in faults:
            self.fault(task_id, exc)

    def add(self, job: Job) -> None:
        """Attach ``job`` to its task record; only tasks added through the store qualify."""
        with self.lock:
            if job.id in self.jobs:
                raise ConflictingIdError(job.id)
            if self._table.find(job.id) is None:
                raise ValueError(
                    f"JsonJobStore holds task-dispatcher tasks only; add task {job.id!r} with "
                    "TaskDispatcher.add_task()"
                )
            self.jobs.readmit(job.id)
            self.jobs.assign(job)
            self._adopt(job)

    def update(self, job: Job) -> None:
        """Record ``job``'s new next run time (None pauses the task, a time resumes it)."""
        with self.lock:
            if job.id not in self.jobs:
                raise JobLookupError(job.id)
            self.jobs.assign(job)
            self._adopt(job)

    def _adopt(self, job: Job) -> None:
        when = job.next_run_time
        when = None if when is None else when.astimezone(self._zone)
        version = self._table.version
        self._core.apply(Planned(job.id, when), self._pass_now())
        if self._table.version != version:
            self._persist()

    def remove(self, job_id: str) -> None:
        """No further run: the task is completed (once its run out, if any, has ended)."""
        with self.lock:
            if job_id not in self.jobs:
                raise JobLookupError(job_id)
            self.jobs.drop(job_id)
            command = Exhausted(job_id, run_waiting=self._runs_waiting(job_id))
            self.tell(self._core.apply(command, self._pass_now()))
            self._persist()

    def remove_all(self) -> None:
        """Unschedule every job: each task is completed."""
        with self.lock, self.deferred_saves():
            for job_id in self.jobs.ids():
                self.remove(job_id)

    def fault(self, task_id: str, exc: BaseException) -> None:
        """Scheduling ``task_id`` raised: log it, unschedule it and put it in ``error``."""
        error = f"scheduling failed: {type(exc).__name__}: {exc}"
        now = self._now()
        with self.lock:
            self.jobs.drop(task_id)
            record = self._table.find(task_id)
            if record is None:
                return
            self._core.apply(Faulted(task_id, error, self._runs_waiting(task_id)), now)
            self._persist()
        logger.error(
            "task %s (account %s) put in error, no further runs planned: %s",
            task_id,
            record.account_id,
            error,
            exc_info=exc,
        )

    # ------------------------------------------------------------------ runs

    def run_settled(self, task_id: str) -> bool:
        """A run of ``task_id`` is over without having opened (skipped, or cut off in its
        lane): a task with no further run is completed now. Returns whether its record
        changed."""
        applied = self._core.apply(RunSettled(task_id), self._now())
        self.tell(applied)
        return any(change.before is not change.after for change in applied.changes)

    def tell(self, applied: Applied) -> None:
        """Announce the events of a change (and log and report a completion)."""
        for event in applied.events:
            if isinstance(event, TaskCompleted):
                record = self._table.get(event.task_id)
                logger.info(
                    "task %s (account %s) completed: no run left before its end time",
                    event.task_id,
                    event.account_id,
                )
                self._completed(record)
        if applied.events:
            self._announce(applied.events)
