"""``JsonJobStore``: task records in ``dispatch_config.json``, served to APScheduler as jobs.

A thin adapter: the records and the runs in flight live in a :class:`~jobstores.core.TaskCore`
(over a :class:`~jobstores.table.TaskTable`), their jobs in a :class:`~jobstores.jobs.JobView`,
durability in a :class:`~jobstores.saver.Saver` over a storage backend. APScheduler's calls
become the core's commands (in :class:`~jobstores.scheduler_calls.SchedulerCalls`):
``update_job`` after a run was submitted is :class:`~jobstores.core.Planned`
(``next_execution_time`` moves); ``remove_job`` (a trigger with no further run) is
:class:`~jobstores.core.Exhausted` (the task is completed and stays on file). The store never
deletes a record on APScheduler's behalf; only :meth:`remove_task` does.

APScheduler calls these methods holding the table's lock (it is the scheduler's job store
lock), so they never write: they request a save, made on the save thread.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore

from jobstores.commands import (
    AddTasks,
    Command,
    RemoveTask,
    ReorderTask,
)
from jobstores.core import Applied, TaskCore
from jobstores.jobs import JobView
from jobstores.loading import describe_validation_error, parse_record
from jobstores.saver import SaveHealth, Saver
from jobstores.scheduler_calls import SchedulerCalls
from jobstores.state import StateStore, StoredState
from jobstores.storage import STATE_FILENAME
from jobstores.stores import resolve_store
from jobstores.table import TaskTable
from tasks.clock import Clock, resolve_clock
from tasks.errors import DispatcherClosedError
from tasks.events import DispatcherEvent
from tasks.model import TaskRecord
from tasks.schedule import Schedule

__all__ = [
    "SNAPSHOT_BELOW",
    "STATE_FILENAME",
    "JsonJobStore",
    "SaveHealth",
    "describe_validation_error",
    "parse_record",
]

logger = logging.getLogger(__name__)

SNAPSHOT_BELOW = 2000
"""Below this many tasks each commit writes the whole ``dispatch_config.json``, so the file
itself holds every acknowledged change; at or above it the journal takes the changes and the
file follows within :data:`jobstores.journal.MAX_AGE` (see :class:`JsonJobStore`)."""

PASS_LIMIT = 256
"""Due jobs a scheduler pass takes at most; the next pass follows at once with the others.
A pass costs tens of microseconds a job on the event loop: 100,000 tasks due together (a
start after an outage) would hold it for seconds in one pass."""


def _not_a_manager() -> None:  # pragma: no cover - the dispatcher's executor runs tasks
    raise RuntimeError("task-dispatcher jobs are run by the dispatcher, not called")


class JsonJobStore(BaseJobStore):
    """A job store that keeps task records in ``<directory>/dispatch_config.json``.

    Creating the store acquires its :class:`~jobstores.state.StateStore` (``storage``: the
    journal on ``directory`` by default, see :func:`~jobstores.stores.resolve_store`), which
    takes the directory's lock (one owner at a time), sets aside anything unreadable and
    loads the records; :meth:`close` releases it. A record that cannot be restored (invalid,
    or refused by ``accept``) is logged and kept verbatim in the file through later saves.

    ``snapshot_below`` (:data:`SNAPSHOT_BELOW` by default): while the store holds fewer tasks,
    every save writes the whole state file, which a host can then read with ``json.load``
    as soon as a change is acknowledged (a store loaded below it with a journal beside its
    file is folded at once). From that many tasks on, the default storage appends each
    save's changes to a journal instead, at a cost that does not grow with the store, and
    the file follows within :data:`jobstores.journal.MAX_AGE` (10 minutes; readers such as
    ``read_snapshot`` and the CLI fold the journal in themselves). ``0``: the journal always.
    ``clock`` is what :meth:`now` reads, from loading on (:data:`~tasks.clock.SYSTEM_CLOCK`).

    Every method is thread-safe. Record changes (:meth:`add_tasks`, :meth:`update_task`, ...)
    leave saving to the caller, who picks :meth:`save` (durable on return; never while
    holding :attr:`lock`), :meth:`save_async` or :meth:`request_save`. APScheduler's methods
    request a save in the background.

    The store owns its parts and lends them: the records are read from :attr:`table`, saving
    is watched and waited for on :attr:`saver`, and a scheduler pass defers its saves through
    :attr:`calls`.
    """

    pass_limit = PASS_LIMIT
    """Due jobs a scheduler pass takes at most (see :data:`PASS_LIMIT`)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        timezone: tzinfo | None,
        now: datetime | None = None,
        convert_timezone: bool = False,
        storage: StateStore | str | None = None,
        accept: Callable[[TaskRecord], None] | None = None,
        fraction: Callable[[], float] | None = None,
        snapshot_below: int = SNAPSHOT_BELOW,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        self.clock = resolve_clock(clock)
        if isinstance(snapshot_below, bool) or not isinstance(snapshot_below, int):
            raise TypeError(
                f"snapshot_below: must be an integer, not {type(snapshot_below).__name__}"
            )
        if snapshot_below < 0:
            raise ValueError(f"snapshot_below: must be 0 or more, not {snapshot_below}")
        self.snapshot_below = snapshot_below
        """Below this many tasks every save writes the whole state file."""
        self._fraction = fraction or random.random
        """Where jitter draws come from (a fraction in [0, 1])."""
        self.directory = Path(directory)
        self._storage = resolve_store(storage, self.directory)
        self.path = self._storage.path
        self.backup_path = self.directory / f"{STATE_FILENAME}.bak"
        self.timezone: tzinfo = timezone or UTC
        """The zone of the hour windows; settled at load from the zone the file records."""
        self._table = TaskTable(f"job store of {str(self.directory)!r}")
        self.lock = self._table.lock
        """The table's lock; the scheduler shares it as its job store lock."""
        self._saver = Saver(self._table, self._storage, self.now, snapshot_below=snapshot_below)
        self._core = TaskCore(self._table, self.schedule, self._fraction)
        self._closed = False
        self.on_events: Callable[[Sequence[DispatcherEvent]], None] | None = None
        """Told of the events of every change :meth:`apply` makes with ``tell`` and of those
        APScheduler's calls make (possibly under the lock: defer any work)."""
        self.on_completed: Callable[[TaskRecord], None] | None = None
        """Told (under the lock: defer any work) when a task is completed."""
        self.runs_waiting: Callable[[str], bool] = _none_waiting
        """Whether a run of a task waits for its lane (the runner's ``waiting``): its end,
        not the schedule running out, completes the task."""

        self._storage.acquire()
        try:
            now = self.clock.now() if now is None else now
            state = self._storage.load(
                timezone, convert=convert_timezone, now=now, accept=accept, fraction=self._fraction
            )
            self.timezone = state.timezone
            self._jobs = JobView(self.timezone, _not_a_manager, self._table.find)
            self._table.listen(self._jobs.sync)
            self._calls = SchedulerCalls(
                self._table,
                self._core,
                self._jobs,
                self.timezone,
                lambda: self.now(),  # read late: a test (or a host) may replace the clock
                self.request_save,
                self._announce,
                self._complete,
                lambda task_id: self.runs_waiting(task_id),  # plugged in by the runner later
            )
            self._load(state)
        except BaseException:
            self._storage.release()
            raise

    def _load(self, state: StoredState) -> None:
        self._table.load(state.records, state.kept, state.account_tasks)
        self._table.extra.update(state.extra)
        small = len(state.records) + len(state.kept) < self.snapshot_below
        if state.repaired or state.kept or (small and self._storage.wants_full_image(closing=True)):
            # Repaired, or small with a journal beside the file: the file is made whole now.
            self._table.touch()
            self.save()

    # ------------------------------------------------------------------ queries

    def now(self) -> datetime:
        """The current instant in the dispatcher's zone (how records carry time)."""
        return self.clock.now().astimezone(self.timezone)

    @property
    def table(self) -> TaskTable:
        """The task table (records, account order, unrestorable records)."""
        return self._table

    @property
    def core(self) -> TaskCore:
        """The task core (the task table and the runs in flight)."""
        return self._core

    @property
    def saver(self) -> Saver:
        """The saver (durability, background saves and their retries, the health of saving)."""
        return self._saver

    @property
    def calls(self) -> SchedulerCalls:
        """APScheduler's calls as commands (its jobs, the scheduler pass's deferred saves)."""
        return self._calls

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def schedule(self, record: TaskRecord) -> Schedule:
        """When ``record`` may run, in the dispatcher's zone."""
        return Schedule.of(record, self.timezone)

    @property
    def save_health(self) -> SaveHealth:
        """The state of saving, for the host to watch."""
        return self._saver.health

    # ------------------------------------------------------------------ record changes

    def _check_open(self) -> None:
        if self._closed:
            raise DispatcherClosedError(f"the job store of {str(self.directory)!r} is closed")

    def apply(self, command: Command, now: datetime | None = None, *, tell: bool = True) -> Applied:
        """Apply ``command`` to the core at ``now`` (the clock's reading by default): what
        changed and its events, told to :attr:`on_events` too with ``tell``. Not saved."""
        self._check_open()
        applied = self._core.apply(command, self.now() if now is None else now)
        if tell and applied.events:
            self._calls.tell(applied)
        return applied

    def add_tasks(self, records: Sequence[TaskRecord]) -> None:
        """Add new tasks all together, or none of them (raises :class:`InvalidTaskError`)."""
        self.apply(AddTasks(records), tell=False)

    def remove_task(self, task_id: str) -> TaskRecord:
        """Delete ``task_id`` for good; returns its last record."""
        return self.apply(RemoveTask(task_id), tell=False).record

    def update_task(self, task_id: str, change: Callable[[TaskRecord], TaskRecord]) -> TaskRecord:
        """Replace ``task_id``'s record with ``change(record)`` atomically; returns the new one.

        A next run planned by the change gets its jitter drawn in the same change.
        """
        self._check_open()
        return self._table.update(task_id, lambda record: self._core.jittered(change(record)))

    def reorder(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based) in its account's priority order."""
        self.apply(ReorderTask(task_id, position), tell=False)

    # ------------------------------------------------------------------ saving

    def save(self) -> bool:
        """Write every change made so far; durable when it returns True (see :class:`Saver`)."""
        return self._saver.save()

    async def save_async(self) -> bool:
        """Write every change made so far, off the event loop; durable when it returns True."""
        return await self._saver.save_async()

    def request_save(self) -> None:
        """Save soon, in the background, without writing here."""
        if not self._closed:
            self._saver.request()

    # APScheduler's job store interface: its calls become commands (see SchedulerCalls) ---

    def start(self, scheduler: Any, alias: str) -> None:
        """Called by APScheduler when it starts: file every schedulable record (its job is
        built when APScheduler asks for it)."""
        super().start(scheduler, alias)
        self._calls.attach(scheduler, alias)

    def shutdown(self) -> None:
        """Called by APScheduler when it shuts down: the records stay; jobs are let go."""
        self._calls.detach()

    def lookup_job(self, job_id: str) -> Job | None:
        """The job of ``job_id``, or None."""
        return self._calls.lookup(job_id)

    def get_due_jobs(self, now: datetime) -> list[Job]:
        """Jobs whose next run time is at or before ``now``, earliest first: the first
        :attr:`pass_limit` of them (the next pass, at once, takes the others)."""
        return self._calls.due(now, self.pass_limit)

    def get_next_run_time(self) -> datetime | None:
        """The earliest next run time, or None when nothing is scheduled."""
        return self._calls.next_run_time()

    def get_all_jobs(self) -> list[Job]:
        """Every job, earliest first, paused jobs last."""
        return self._calls.all()

    def add_job(self, job: Job) -> None:
        """Attach ``job`` to its task record; only tasks added through the store qualify."""
        self._calls.add(job)

    def update_job(self, job: Job) -> None:
        """Record ``job``'s new next run time (None pauses the task, a time resumes it)."""
        self._calls.update(job)

    def remove_job(self, job_id: str) -> None:
        """No further run (APScheduler): ``completed`` once a run still out ends; kept on file."""
        self._calls.remove(job_id)

    def remove_all_jobs(self) -> None:
        """Unschedule every job: each task is ``completed`` (records are never dropped here)."""
        self._calls.remove_all()

    def fault(self, task_id: str, exc: BaseException) -> None:
        """Scheduling ``task_id`` raised: log it, unschedule it and put it in ``error``.

        The other tasks carry on; the task's record says what went wrong, and pausing then
        resuming it (or a restart) plans it again.
        """
        self._calls.fault(task_id, exc)

    def run_settled(self, task_id: str) -> bool:
        """A run of ``task_id`` is over without having opened (skipped, or cut off in its
        lane): a task with no further run is completed now. Returns whether the record
        changed (then it is the caller's to save)."""
        return self._calls.run_settled(task_id)

    def _announce(self, events: Sequence[DispatcherEvent]) -> None:
        if self.on_events is not None:
            self.on_events(events)

    def _complete(self, record: TaskRecord) -> None:
        if self.on_completed is not None:
            self.on_completed(record)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop accepting changes, finish saving and give up the directory lock."""
        if self._closed:
            return
        self._closed = True
        self._table.close()
        if self._saver.durable and self._storage.wants_full_image(closing=True):
            # A journal folds itself into the snapshot: the file a person reads is whole.
            self._table.touch()
            self._saver.save()
        self._saver.close()
        try:
            self._storage.close()
        finally:
            self._storage.release()


def _none_waiting(task_id: str) -> bool:
    """No runner serves the store: no run waits for a lane."""
    return False
