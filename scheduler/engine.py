"""The APScheduler wiring: an AsyncIOScheduler over the JSON job store and the task runner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, tzinfo
from functools import partial
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.executors.base import BaseExecutor, MaxInstancesReachedError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_PAUSED, TIMEOUT_MAX, BaseScheduler

from jobstores.jsonfile import JsonJobStore
from tasks.runs import RunEvent

__all__ = ["DispatchExecutor", "DispatchScheduler"]

logger = logging.getLogger(__name__)

Submit = Callable[[str, datetime], asyncio.Future[RunEvent | None]]


class DispatchExecutor(BaseExecutor):
    """Hands each due job to the task runner (which applies lanes and gating)."""

    def __init__(self, submit: Submit) -> None:
        super().__init__()
        self._submit = submit

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        run_time = run_times[-1]
        task = self._submit(job.id, run_time)
        task.add_done_callback(partial(self._settled, job.id, job._jobstore_alias, run_time))

    def _settled(self, job_id: str, alias: str, run_time: datetime, task: Any) -> None:
        if task.cancelled():
            self._run_job_success(job_id, [])
            return
        exc = task.exception()
        if exc is not None:
            self._run_job_error(job_id, exc, exc.__traceback__)
            return
        outcome: RunEvent | None = task.result()
        if not self._scheduler._listeners:  # nobody to tell: the run is only counted off
            self._run_job_success(job_id, [])
            return
        if outcome is None:
            event = JobExecutionEvent(EVENT_JOB_MISSED, job_id, alias, run_time)
        elif outcome.ok:
            event = JobExecutionEvent(EVENT_JOB_EXECUTED, job_id, alias, run_time)
        else:
            event = JobExecutionEvent(
                EVENT_JOB_ERROR, job_id, alias, run_time, exception=RuntimeError(outcome.error)
            )
        self._run_job_success(job_id, [event])


class _LaneWaitFilter(logging.Filter):
    """Turns APScheduler's "maximum number of running instances reached" into DEBUG.

    A task's run waiting for its account's lane is still "running" to APScheduler, so the
    task's next due time is skipped with that WARNING: normal here, not worth a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "maximum number of running instances" in str(
            record.msg
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_scheduler_logger = logging.getLogger("apscheduler.scheduler.dispatch")
"""The scheduler's own logger: a child of APScheduler's, so the host's settings for it apply."""
_scheduler_logger.addFilter(_LaneWaitFilter())


class DispatchScheduler(AsyncIOScheduler):
    """An AsyncIOScheduler whose job store lock is the store's own lock.

    Sharing the lock makes a scheduler pass (find due jobs, submit, move their next run time)
    atomic with respect to pause/resume/remove calls from other threads. A pass saves once, in
    the background, instead of after every job it moves. A pass reads the time from the
    store's clock (:meth:`JsonJobStore.now`), not from the system's (see :meth:`_pass`).
    """

    def __init__(self, store: JsonJobStore, executor: DispatchExecutor, zone: tzinfo) -> None:
        super().__init__(
            jobstores={"default": store},
            executors={"default": executor},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=zone,
            logger=_scheduler_logger,
        )
        self._store = store
        self._jobstores_lock = store.lock

    def _process_jobs(self) -> float | None:
        with self._store.calls.deferred_saves():
            while True:
                try:
                    return self._pass()
                except Exception:
                    # One task's schedule raised mid-pass: put it in error and pass again,
                    # so the other tasks run and the timer is re-armed. Each retry follows
                    # at least one task taken out, so this ends.
                    if not self._isolate_faults():
                        logger.exception(
                            "scheduler pass failed; trying again in %ss",
                            self.jobstore_retry_interval,
                        )
                        return float(self.jobstore_retry_interval)

    def _pass(self) -> float | None:
        """One scheduler pass at the store's clock: submit the due jobs, move their next run
        times, and return the seconds until the next pass (None: nothing scheduled).

        APScheduler 3.11's ``BaseScheduler._process_jobs`` for this scheduler's one job store
        and executor (coalescing, no misfire grace), except that it reads the time from
        ``self._store.now()`` where APScheduler reads ``datetime.now(self.timezone)``, so a
        clock given to the dispatcher decides what is due. Its log messages and events are
        APScheduler's.
        """
        if self.state == STATE_PAUSED:
            return None
        now = self._store.now()
        events: list[JobSubmissionEvent] = []
        with self._jobstores_lock:
            executor = self._lookup_executor("default")
            try:
                due_jobs = self._store.get_due_jobs(now)
            except Exception as exc:
                self._logger.warning("Error getting due jobs from job store %r: %s", "default", exc)
                return float(self.jobstore_retry_interval)
            for job in due_jobs:
                run_times = job._get_run_times(now)
                run_times = run_times[-1:] if run_times and job.coalesce else run_times
                if not run_times:
                    continue
                kind: int | None = EVENT_JOB_SUBMITTED
                try:
                    executor.submit_job(job, run_times)
                except MaxInstancesReachedError:
                    self._logger.warning(
                        'Execution of job "%s" skipped: maximum number of running instances '
                        "reached (%d)",
                        job,
                        job.max_instances,
                    )
                    kind = EVENT_JOB_MAX_INSTANCES
                except BaseException:
                    self._logger.exception('Error submitting job "%s" to executor "default"', job)
                    kind = None
                if kind is not None:
                    events.append(JobSubmissionEvent(kind, job.id, "default", run_times))
                next_run = job.trigger.get_next_fire_time(run_times[-1], now)
                if next_run:
                    job._modify(next_run_time=next_run)
                    self._store.update_job(job)
                else:
                    self.remove_job(job.id, "default")
            next_wakeup = self._store.get_next_run_time()
        for event in events:
            self._dispatch_event(event)
        if self.state == STATE_PAUSED or next_wakeup is None:
            return None
        wait = next_wakeup.timestamp() - self._store.now().timestamp()
        return float(min(max(wait, 0), TIMEOUT_MAX))

    def _isolate_faults(self) -> int:
        """Put every due task whose schedule raises in error; return how many there were."""
        now = self._store.now()
        faults = 0
        for job in self._store.get_due_jobs(now):
            try:
                run_times = job._get_run_times(now)
                if run_times:
                    job.trigger.get_next_fire_time(run_times[-1], now)
            except Exception as exc:
                self._store.fault(job.id, exc)
                faults += 1
        return faults

    def _dispatch_event(self, event: Any) -> None:
        # A pass makes an event per job it submits and every run ends with one: with nobody
        # listening (the usual case) there is nothing to hand them to.
        if self._listeners:
            super()._dispatch_event(event)

    def process_due(self) -> None:
        """Submit every job due now, in as many scheduler passes as that takes (on the event
        loop thread), and re-arm the timer."""
        self._stop_timer()
        for _ in range(len(self._store.table) // self._store.pass_limit + 1):
            wait = self._process_jobs()
            if wait is None or wait > 0:  # no wait: a job is due still (the pass took its limit)
                break
        self._start_timer(wait)

    def shutdown(self, wait: bool = True) -> None:
        """Shut down at once (the caller is on the event loop thread)."""
        if not self.running:
            raise SchedulerNotRunningError
        BaseScheduler.shutdown(self, wait)
        self._stop_timer()
        self._eventloop = None
