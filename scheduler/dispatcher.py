"""``Dispatcher``: the facade that wires a directory's tasks, their runs and their observers
(``scheduler.serve.TaskDispatcher`` adds the control plane that serves it)."""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from jobstores.commands import (
    AddTasks,
    EditTask,
    PauseTask,
    RemoveTask,
    RequestRun,
    ResumeTask,
)
from jobstores.core import Applied
from jobstores.jsonfile import SNAPSHOT_BELOW, JsonJobStore
from jobstores.saver import SaveHealth
from jobstores.state import StateStore
from scheduler.backends.local import LocalRunBackend, create_manager
from scheduler.engine import DispatchExecutor, DispatchScheduler
from scheduler.history import RunEntry, RunHistory, open_history
from scheduler.intake import UNSET, TaskIntake, Unset
from scheduler.lanes import AccountLanes
from scheduler.leadership import Standing, standing_of
from scheduler.ledger import RunLedger, RunObserver, on_reports
from scheduler.listeners import (
    DispatcherEvent,
    EventFilter,
    Listener,
    Listeners,
    SaveFailed,
    SaveRecovered,
    TaskPaused,
    WebhookListener,
)
from scheduler.retries import RetryTimer
from scheduler.runner import TaskRunner
from tasks import lifecycle
from tasks.errors import (
    AccountNotFoundError,
    DispatcherClosedError,
    DispatcherNotRunningError,
    HistoryUnavailableError,
    SaveFailedError,
)
from tasks.manager import TaskManagerFactory
from tasks.model import TaskRecord, TaskStatus
from tasks.policy import RunPolicy
from tasks.runs import RunBackend, RunEvent, RunRequest
from tasks.schedule import RunPreview, preview_runs
from tasks.zones import resolve_timezone

if TYPE_CHECKING:
    from scheduler.metrics import DispatcherMetrics

__all__ = [
    "CONTROL_SOCKET",
    "DEFAULT_DISPATCHER_DIR",
    "DIR_ENV_VAR",
    "AccountChange",
    "Dispatcher",
    "resolve_timezone",
]

logger = logging.getLogger(__name__)

DIR_ENV_VAR = "TASK_DISPATCHER_DIR"
"""Environment variable naming the default dispatcher directory."""
DEFAULT_DISPATCHER_DIR = "dispatcher"
"""The dispatcher directory when none is given (relative to the working directory)."""
CONTROL_SOCKET = "control.sock"
"""The control API's Unix socket, in the dispatcher directory."""


_LISTENER_GRACE = 10.0
"""Seconds :meth:`Dispatcher.stop` waits for coroutine listeners (webhooks) to finish."""


def _task_id(value: Any, name: str = "task_id") -> str:
    """``value`` if it is a string; else a ``TypeError`` naming the parameter."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: must be a string, not {type(value).__name__}")
    return value


class AccountChange(NamedTuple):
    """What pausing or resuming a whole account did to one of its tasks."""

    task_id: str
    status: TaskStatus
    """The task's status after the change."""
    changed: bool
    """False for a task already so (paused, or not paused), or completed."""


def default_directory() -> Path:
    """``$TASK_DISPATCHER_DIR``, else ``./dispatcher``."""
    return Path(os.environ.get(DIR_ENV_VAR) or DEFAULT_DISPATCHER_DIR)


def _manual_done(outcome: asyncio.Future[RunEvent | None]) -> None:
    """Collect a manual run's outcome (its errors are logged where they happen)."""
    if not outcome.cancelled() and outcome.exception() is not None:
        logger.error("a manual run raised: %s", outcome.exception())


class Dispatcher:
    """The dispatcher of one directory's tasks, without the control plane that serves it.

    It wires the job store, the APScheduler engine, the account lanes, the runner and the run
    backend, and the observers (listeners, run history, metrics, the retry timer); its
    methods are the API hosts use. Hosts use :class:`scheduler.TaskDispatcher` (of
    ``scheduler.serve``), which adds serving the control API and the dashboard, and whose
    documentation describes the parameters and behaviour.
    """

    def __init__(
        self,
        dispatcher_dir: str | os.PathLike[str] | None = None,
        *,
        task_manager_factory: TaskManagerFactory | None = None,
        timezone: str | tzinfo | None = None,
        max_concurrent_runs: int = 10,
        run_backend: RunBackend | None = None,
        convert_timezone: bool = False,
        history: bool | RunHistory = True,
        snapshot_below: int = SNAPSHOT_BELOW,
        store: StateStore | str | None = None,
    ) -> None:
        directory = Path(dispatcher_dir) if dispatcher_dir is not None else default_directory()
        self._backend: RunBackend = run_backend or LocalRunBackend(task_manager_factory)
        self._factory = task_manager_factory
        self._store = JsonJobStore(
            directory,
            timezone=None if timezone is None else resolve_timezone(timezone),
            convert_timezone=convert_timezone,
            accept=self._check_manager,
            snapshot_below=snapshot_below,
            storage=store,
        )
        self.timezone = self._store.timezone
        """The zone whose wall-clock hours the windows and end dates are read in."""
        self._intake = TaskIntake(self._store)
        self._lanes = AccountLanes(
            max_concurrent_runs, self._store.rank, lambda: self._store.order_version
        )
        self._ledger = RunLedger(self._store, remote=self._backend.remote)
        self._runner = TaskRunner(self._store, self._backend, self._lanes, self._ledger)
        self._scheduler = DispatchScheduler(
            self._store, DispatchExecutor(self._runner.submit), self.timezone
        )
        self._retries = RetryTimer(self._store, self._runner.submit)
        self._ledger.watch(self._take_up_manual)
        # Listeners (typed events): the core's events, relayed (those of this class's API
        # calls when the call is done, the others from the loop), and save health.
        self._listeners = Listeners()
        self._observers: list[Callable[[DispatcherEvent], None]] = [self._retries.observe]
        """Told of every event where its change was applied (on the loop for run events)."""
        self._store.on_events = self._relay
        self._store.on_save_health(self._tell_save)
        self._history = open_history(directory, history, self.timezone, self._store._storage)
        if self._history is not None:
            self._observers.append(on_reports(self._history.record))
        self._metrics = self._make_metrics()
        if self._metrics is not None:
            self._observers.append(on_reports(self._metrics.observe))
        self._started_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._manual_queued: set[str] = set()
        """Tasks whose manual run is queued for its lane (so it is queued once)."""
        if not self._backend.remote:
            self._ledger.recover()
        if not self._store.durable:
            self._store.save()
        logger.info(
            "dispatcher on %s loaded %d task(s) (%d kept unrestored)",
            directory,
            len(self._store.table),
            len(self._store.kept_records()),
        )

    def _check_manager(self, record: TaskRecord, *, renew: bool = False) -> None:
        """Create ``record``'s manager now: a task whose manager cannot be created is refused
        at add time, and kept unrestored at load. ``renew``: its kwargs or sys_type were
        edited, so the manager made for the old ones is replaced."""
        self._backend.prepare(record.task_id, record.sys_type, record.kwargs, renew=renew)
        if self._backend.remote and self._factory is not None:
            # The workers create the managers; this process checks it could.
            create_manager(self._factory, record.sys_type, record.kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def directory(self) -> Path:
        """The dispatcher directory."""
        return self._store.directory

    @property
    def state_file(self) -> Path:
        """``<directory>/dispatch_config.json``."""
        return self._store.path

    @property
    def running(self) -> bool:
        """Whether :meth:`start` was called and :meth:`stop` not yet."""
        return bool(self._scheduler.running)

    @property
    def closed(self) -> bool:
        """Whether the dispatcher was stopped (it then owns nothing and changes nothing)."""
        return self._store.closed

    @property
    def save_health(self) -> SaveHealth:
        """The last save error (if the latest save failed) and when state was last saved."""
        return self._store.save_health

    @property
    def scheduler(self) -> DispatchScheduler:
        """The underlying APScheduler scheduler (for listeners; jobs derive from tasks)."""
        return self._scheduler

    @property
    def run_backend(self) -> RunBackend:
        """Where runs execute."""
        return self._backend

    def observe_runs(self, observer: RunObserver) -> None:
        """Call ``observer(request, event)`` for every run event applied (from the loop)."""
        self._observers.append(on_reports(observer))

    @property
    def order_version(self) -> int:
        """A number that changes whenever an account's task order may have changed (a task
        added, removed or moved); it starts again from 0 in each process."""
        return self._store.order_version

    @property
    def account_tasks(self) -> dict[str, list[str]]:
        """Account id -> its task ids in priority order (a copy)."""
        return self._store.account_tasks()

    @property
    def history(self) -> RunHistory | None:
        """The run history (None if off or its file could not be opened)."""
        return self._history

    @property
    def metrics(self) -> DispatcherMetrics | None:
        """The Prometheus metrics (None without the ``prometheus_client`` package)."""
        return self._metrics

    def _make_metrics(self) -> DispatcherMetrics | None:
        try:
            from scheduler.metrics import DispatcherMetrics, MetricsSource
        except ImportError:  # prometheus_client comes with the optional 'control' extra
            return None
        store = self._store

        def tasks_by_status() -> dict[str, int]:
            return dict(Counter(record.status.value for record in store.records()))

        return DispatcherMetrics(
            MetricsSource(tasks_by_status, self._lanes.waiting_counts, lambda: store.save_health)
        )

    # ------------------------------------------------------------------ listeners

    def add_listener(self, callback: Listener, events: EventFilter = None) -> None:
        """Call ``callback(event)`` for every event of the classes in ``events``.

        ``events`` holds event classes of :mod:`scheduler.listeners` (``RunFailed``,
        ``TaskPaused``, ...) or their ``kind`` names; None means every event (for a
        :class:`~scheduler.listeners.WebhookListener`: the events it was made for). Callbacks
        run on the event loop; coroutine functions are run as tasks. One that raises is logged
        and never stops the dispatcher.
        """
        if events is None and isinstance(callback, WebhookListener):
            events = callback.events
        self._listeners.add(callback, events)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback``."""
        self._listeners.remove(callback)

    def _tell(self, event: DispatcherEvent) -> None:
        if self._listeners:
            self._listeners.emit(event)

    def _tell_all(self, applied: Applied) -> None:
        """Tell the observers and listeners the events of a change this class applied
        (after saving)."""
        for event in applied.events:
            self._observe(event)
            if self._listeners:
                self._listeners.emit(event)

    def _relay(self, events: Sequence[DispatcherEvent]) -> None:
        # From the store, maybe under the table's lock: listeners hear of them from the
        # loop, after it is released.
        for event in events:
            self._observe(event)
            if self._listeners:
                self._listeners.emit_soon(event)

    def _observe(self, event: DispatcherEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                logger.exception("an observer failed on %s of task %s", event.kind, event.task_id)

    def _tell_save(self, error: str | None) -> None:
        if not self._listeners:
            return
        now = self._store.now()
        event: DispatcherEvent = (
            SaveRecovered(at=now) if error is None else SaveFailed(at=now, error=error)
        )
        self._listeners.emit_soon(event)

    # ------------------------------------------------------------------ queries

    def get_task(self, task_id: str) -> TaskRecord:
        """A snapshot of ``task_id``'s record; raises :class:`TaskNotFoundError`."""
        return self._store.get(_task_id(task_id)).snapshot()

    def list_tasks(self) -> list[TaskRecord]:
        """Snapshots of every task, in the order they were added."""
        return [record.snapshot() for record in self._store.records()]

    def peek_tasks(self) -> list[TaskRecord]:
        """Every task's current record, in the order they were added, without a copy: for
        readers that only read and look often (the dashboard's live feed).

        Records are immutable and a change replaces a task's record, so a record seen here
        never changes; only its ``kwargs`` dict could be changed in place, and must not be
        (:meth:`list_tasks` gives copies, at about 10 us a task).
        """
        return self._store.records()

    def runs(
        self,
        task_id: str | None = None,
        *,
        account_id: str | None = None,
        failed: bool | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        before_run: str | None = None,
    ) -> list[RunEntry]:
        """Recorded runs, newest first, filtered as :meth:`RunHistory.query` describes.

        Blocks on a read of the history (its file, or its database): call it in a thread from
        async code.
        Raises :class:`HistoryUnavailableError` if the history is off.
        """
        if self._history is None:
            raise HistoryUnavailableError(f"the run history of {str(self.directory)!r} is off")
        return self._history.query(
            task_id=task_id,
            account_id=account_id,
            failed=failed,
            since=since,
            until=until,
            limit=limit,
            before_run=before_run,
        )

    # ------------------------------------------------------------------ adding

    async def add_task(
        self,
        *,
        sys_type: str | None = None,
        task_type: str | None = None,
        interval: float | timedelta | None = None,
        valid_time_range: Sequence[int] | None = None,
        task_end_time: date | datetime | str | None = None,
        task_id: str | None = None,
        run_policy: RunPolicy | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Register a task and return its id once it is saved.

        Every keyword besides the named ones goes into the task's ``kwargs``, which (with
        ``task_id`` and ``task_type``) re-create its manager as
        ``factory(sys_type=sys_type, **kwargs)``. The account is ``account_id`` or the one
        keyword ending in ``_account_id``. ``run_policy`` (a :class:`~tasks.RunPolicy` or a dict
        of its fields) sets jitter, retries, a run timeout and auto-pause; the defaults change
        nothing. Raises :class:`InvalidTaskError` (a ``ValueError``)
        naming the field, and saves nothing, if anything is invalid (:class:`TaskExistsError`
        if the id is taken). Raises :class:`SaveFailedError` if the task was added but could
        not be saved (it stays added and saving is retried).
        """
        keywords = dict(kwargs)
        keywords.update(
            sys_type=sys_type,
            task_type=task_type,
            interval=interval,
            task_end_time=task_end_time,
            task_id=task_id,
            run_policy=run_policy,
        )
        if valid_time_range is not None:
            keywords["valid_time_range"] = valid_time_range
        (task_id,) = await self.add_tasks([keywords])
        return task_id

    async def add_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add many tasks with one save: each validated as :meth:`add_task` does, all or none.

        Each item holds :meth:`add_task`'s keywords. Returns the new ids in order. Raises
        :class:`SaveFailedError` if the tasks were added but could not be saved.
        """
        self._check_open()
        now = self._store.now()
        records = self._intake.new_records(tasks, now)
        for record in records:
            self._check_manager(record)
        added = self._store.apply(AddTasks(records), now, tell=False)
        saved = await self._store.save_async()
        self._wake()
        for record in added.records:
            logger.info(
                "task %s added for account %s (%s, every %ss, hours %d-%d), first run %s",
                record.task_id,
                record.account_id,
                record.task_type,
                record.interval,
                *record.valid_time_range,
                record.next_execution_time,
            )
        self._tell_all(added)
        if not saved:
            self._save_failed(tuple(record.task_id for record in records))
        return [record.task_id for record in records]

    # ------------------------------------------------------------------ changing

    def _saved(self, saved: bool, task_id: str) -> None:
        """Raise :class:`SaveFailedError` naming ``task_id`` if the save of its change failed.

        Called last: a change whose save failed is in effect all the same, so it is scheduled
        and announced like any other before the caller hears of the failure.
        """
        if not saved:
            self._save_failed((task_id,))

    def _save_failed(self, task_ids: tuple[str, ...]) -> None:
        # The change stays applied; a background retry is scheduled when there is a loop.
        self._store.request_retry()
        raise SaveFailedError(
            self.state_file, task_ids, self._store.save_health.last_error or "unknown error"
        )

    def _check_open(self) -> None:
        if self._store.closed:
            raise DispatcherClosedError(
                f"the dispatcher on {str(self.directory)!r} was stopped; create a new one"
            )
        standing = self.standing
        if standing is not None:
            standing.check_change()  # raises NotLeaderError on a standby

    @functools.cached_property
    def standing(self) -> Standing | None:
        """Leader or standby of a shared store (None: the one owner of a file always leads)."""
        return standing_of(self._store._storage, self._runner)

    @property
    def role(self) -> str:
        """``"leader"``, or ``"standby"`` once a shared store's lease is lost."""
        standing = self.standing
        return "leader" if standing is None else standing.role

    def _stand_by(self) -> None:
        """The lease is lost: plan nothing more (runs are refused by the runner's gate)."""
        if self._scheduler.running:
            self._scheduler.pause()
            self._retries.stop()

    def _wake(self) -> None:
        if self._scheduler.running:
            self._scheduler.wakeup()

    def pause_task(self, task_id: str) -> None:
        """Stop running ``task_id`` until resumed; saved when this returns.

        A run in progress finishes; none starts after it. Pausing a paused or completed task
        changes nothing.
        """
        self._check_open()
        _task_id(task_id)

        applied = self._store.apply(PauseTask(task_id), tell=False)
        record = applied.record
        self._withdraw_sent(record)
        saved = self._store.save()
        logger.info("task %s (account %s) is %s", task_id, record.account_id, record.status.value)
        self._tell_all(applied)
        self._saved(saved, task_id)

    def resume_task(self, task_id: str) -> None:
        """Schedule a paused task again; saved when this returns.

        The next run is one interval after the last run's planned time (not its jittered
        start: the grid never moves) or now, whichever is later, moved to the window's next
        opening if outside it. Resuming a task that is not paused
        changes nothing.
        """
        self._check_open()
        _task_id(task_id)

        applied = self._store.apply(ResumeTask(task_id), tell=False)
        record = applied.record
        saved = self._store.save()
        self._wake()
        self._tell_all(applied)
        logger.info(
            "task %s (account %s) is %s, next run %s",
            task_id,
            record.account_id,
            record.status.value,
            record.next_execution_time,
        )
        self._saved(saved, task_id)

    def update_task(
        self,
        task_id: str,
        *,
        interval: float | timedelta | Unset = UNSET,
        valid_time_range: Sequence[int] | Unset = UNSET,
        task_end_time: date | datetime | str | Unset | None = UNSET,
        run_policy: RunPolicy | Mapping[str, Any] | Unset | None = UNSET,
        kwargs: Mapping[str, Any] | Unset = UNSET,
    ) -> TaskRecord:
        """Change ``task_id``'s rules in place; returns its new record, saved when this returns.

        Only the fields given change; each is validated as :meth:`add_task` validates it
        (an :class:`InvalidTaskError` naming the field, and nothing changed, otherwise).
        ``task_end_time=None`` removes the end; ``run_policy`` as a dict changes only the
        policy fields it names (a :class:`~tasks.RunPolicy` or None replaces the policy);
        ``kwargs`` replaces the task keywords (the account must stay the same). The manager
        is created again from the new keywords, and the next run planned again from the new
        rules (from the last run's planned time when there is one); the id, counters, position,
        history and a run in progress are kept; a planned retry is dropped. A paused task
        stays paused; a completed one with a run left under the new rules is pending again.
        """
        self._check_open()
        _task_id(task_id)
        current = self._store.get(task_id)
        now = self._store.now()
        rules = self._intake.edited(
            current,
            now,
            interval=interval,
            valid_time_range=valid_time_range,
            task_end_time=task_end_time,
            run_policy=run_policy,
            kwargs=kwargs,
        )
        self._check_manager(
            rules, renew=(rules.kwargs, rules.sys_type) != (current.kwargs, current.sys_type)
        )
        applied = self._store.apply(EditTask(task_id, rules), now, tell=False)
        record = applied.record
        saved = self._store.save()
        self._wake()
        self._tell_all(applied)
        logger.info(
            "task %s (account %s) updated: every %ss, hours %d-%d, until %s; %s, next run %s",
            task_id,
            record.account_id,
            record.interval,
            *record.valid_time_range,
            record.task_end_time,
            record.status.value,
            record.start_time,
        )
        self._saved(saved, task_id)
        return record.snapshot()

    def remove_task(self, task_id: str) -> None:
        """Delete ``task_id`` for good; saved when this returns. A run in progress finishes."""
        self._check_open()
        _task_id(task_id)
        applied = self._store.apply(RemoveTask(task_id), tell=False)
        record = applied.record
        self._withdraw_sent(record)
        self._backend.forget(task_id)
        saved = self._store.save()
        logger.info("task %s (account %s) removed", task_id, record.account_id)
        self._tell_all(applied)
        self._saved(saved, task_id)

    def _withdraw_sent(self, record: TaskRecord) -> None:
        """A paused or removed task's run that was sent but not started never starts (a
        worker that holds it already lets it finish)."""
        run = record.active_run
        loop = self._loop
        if run is None or not run.queued or loop is None or not self._scheduler.running:
            return
        if record.status is not TaskStatus.PAUSED and self._store.find(record.task_id):
            return  # a settled task that stays: nothing changed for its run
        try:
            running_here = asyncio.get_running_loop() is loop
        except RuntimeError:
            running_here = False
        if running_here:
            self._runner.cancel_sent(run.run_id)
        else:
            loop.call_soon_threadsafe(self._runner.cancel_sent, run.run_id)

    def reorder_task(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based) in its account's priority order.

        Tasks of one account run one at a time in that order. Saved when this returns.
        """
        self._check_open()
        _task_id(task_id)
        if isinstance(position, bool):
            raise TypeError("position: must be an integer, not bool")
        try:
            position = operator.index(position)
        except TypeError:
            raise TypeError(
                f"position: must be an integer, not {type(position).__name__}"
            ) from None
        self._store.reorder(task_id, position)
        saved = self._store.save()
        logger.info("task %s moved to position %d", task_id, position)
        self._saved(saved, task_id)

    def run_now(self, task_id: str) -> TaskRecord:
        """Run ``task_id`` once, as soon as its account's lane is free; the request is saved
        when this returns (a restart before the run starts still runs it once).

        The run starts whatever the task's hours, end or status (a paused or completed task
        too) and is stopped by the task's ``run_timeout``. It does not move the planned runs
        (``next_execution_time`` and ``last_execution_time`` stay), is never retried and does
        not count toward ``pause_after_failures``; the run history marks it
        ``trigger="manual"``. Asking again before it starts changes nothing. On a dispatcher
        not started yet it runs once :meth:`start` is called. Returns the task's record.
        """
        self._check_open()
        _task_id(task_id)
        applied = self._store.apply(RequestRun(task_id), tell=False)
        record = applied.record
        first = applied.before is not None and applied.before.run_requested is None
        saved = self._store.save()
        if first and record.run_requested is not None:
            self._submit_manual(task_id)
        logger.info(
            "task %s (account %s): run now asked for%s",
            task_id,
            record.account_id,
            "" if first else " (already asked for)",
        )
        self._saved(saved, task_id)
        return record.snapshot()

    def _submit_manual(self, task_id: str) -> None:
        """Queue the manual run asked for ``task_id`` (from any thread; a no-op until
        :meth:`start`, which queues every run asked for)."""
        loop = self._loop
        if loop is None or not self.running or loop.is_closed():
            return

        def submit() -> None:
            record = self._store.find(task_id)
            if record is None or record.run_requested is None or not self.running:
                return
            if task_id in self._manual_queued:
                return
            self._manual_queued.add(task_id)
            outcome = self._runner.submit(task_id, record.run_requested, manual=True)
            outcome.add_done_callback(_manual_done)
            outcome.add_done_callback(lambda _: self._manual_queued.discard(task_id))

        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:  # queued at once, so that run_pending() sees it
            submit()
        else:
            loop.call_soon_threadsafe(submit)

    def _take_up_manual(
        self,
        request: RunRequest,
        event: RunEvent,
        before: TaskRecord | None,
        after: TaskRecord | None,
    ) -> None:
        """A manual run that opened is no longer queued; when a run ends, a manual run still
        asked for (asked again while it ran, or it found another run of its task out when its
        lane came) is queued again."""
        if request.trigger == "manual":
            self._manual_queued.discard(request.task_id)
        if event.kind.finished and after is not None and after.run_requested is not None:
            self._submit_manual(after.task_id)

    def pause_account(self, account_id: str) -> list[AccountChange]:
        """Pause every task of ``account_id`` (an account banned or logged out), in one
        commit, saved when this returns; runs in progress finish.

        Returns what happened to each task, in the account's order; a ``TaskPaused`` event
        is sent for each task paused. Raises :class:`AccountNotFoundError` if no task
        belongs to the account, :class:`SaveFailedError` if the change (in effect, and
        announced) could not be saved.
        """
        changes, saved = self._change_account(account_id, PauseTask)
        for applied in changes:
            if any(isinstance(event, TaskPaused) for event in applied.events):
                self._withdraw_sent(applied.record)
            self._tell_all(applied)
        return self._account_report(account_id, "paused", changes, saved)

    def resume_account(self, account_id: str) -> list[AccountChange]:
        """Resume every paused task of ``account_id`` (as :meth:`resume_task` does each), in
        one commit, saved when this returns.

        Returns what happened to each task, in the account's order; a ``TaskResumed`` event
        is sent for each task resumed. Raises :class:`AccountNotFoundError` if no task
        belongs to the account, :class:`SaveFailedError` if the change (in effect, and
        announced) could not be saved.
        """
        changes, saved = self._change_account(account_id, ResumeTask)
        for applied in changes:
            self._tell_all(applied)
        return self._account_report(account_id, "resumed", changes, saved)

    def _change_account(
        self, account_id: str, command: Callable[[str], PauseTask | ResumeTask]
    ) -> tuple[list[Applied], bool]:
        """Apply ``command`` to every task of ``account_id`` under the store's lock, at one
        instant, then save once: one commit. Returns what each command did, and whether the
        commit is on disk."""
        self._check_open()
        _task_id(account_id, "account_id")
        changes: list[Applied] = []
        now = self._store.now()
        with self._store.lock:
            task_ids = self._store.account_tasks().get(account_id)
            if not task_ids:
                raise AccountNotFoundError(account_id)
            for task_id in task_ids:
                changes.append(self._store.apply(command(task_id), now, tell=False))
        saved = self._store.save()
        self._wake()
        return changes, saved

    def _account_report(
        self,
        account_id: str,
        verb: str,
        changes: list[Applied],
        saved: bool,
    ) -> list[AccountChange]:
        report = []
        for applied in changes:
            after = applied.record
            report.append(AccountChange(after.task_id, after.status, after is not applied.before))
        logger.info(
            "account %s: %d of %d task(s) %s",
            account_id,
            sum(change.changed for change in report),
            len(report),
            verb,
        )
        if not saved:
            self._save_failed(tuple(change.task_id for change in report))
        return report

    # ------------------------------------------------------------------ control plane
    # What the control API (scheduler/control/) needs beyond the methods above.

    def next_runs(self, task_id: str, count: int = 5) -> RunPreview:
        """``task_id``'s next ``count`` planned runs (for a paused task: if resumed now)."""
        return preview_runs(self._store.get(task_id), self.timezone, self._store.now(), count)

    def preview_update(
        self,
        task_id: str,
        count: int = 5,
        *,
        interval: float | timedelta | Unset = UNSET,
        valid_time_range: Sequence[int] | Unset = UNSET,
        task_end_time: date | datetime | str | Unset | None = UNSET,
        run_policy: RunPolicy | Mapping[str, Any] | Unset | None = UNSET,
    ) -> RunPreview:
        """The next ``count`` runs ``task_id`` would have after :meth:`update_task` with these
        changes, changing nothing; invalid changes raise :class:`InvalidTaskError` naming the
        field, as :meth:`update_task` would."""
        _task_id(task_id)
        current = self._store.get(task_id)
        now = self._store.now()
        rules = self._intake.edited(
            current,
            now,
            interval=interval,
            valid_time_range=valid_time_range,
            task_end_time=task_end_time,
            run_policy=run_policy,
            kwargs=UNSET,
        )
        edited = lifecycle.edited(current, rules, self._store.schedule(rules), now)
        return preview_runs(edited, self.timezone, now, count)

    def queued_runs(self) -> dict[str, list[str]]:
        """Account id -> ids of tasks whose due run waits for the account's lane (call on the
        event loop the dispatcher runs on)."""
        queued = {account: self._lanes.waiting(account) for account in self.account_tasks}
        return {account: ids for account, ids in queued.items() if ids}

    @property
    def uptime(self) -> float | None:
        """Seconds since :meth:`start` (None if not started or stopped)."""
        if self._started_at is None or not self.running:
            return None
        return time.monotonic() - self._started_at

    # ------------------------------------------------------------------ running

    async def start(self) -> None:
        """Start scheduling on the running event loop (a no-op if already started)."""
        self._check_open()
        if not self._scheduler.running:
            self._loop = asyncio.get_running_loop()
            self._listeners.bind(self._loop)
            await self._backend.open(self._ledger)
            recovered = self._ledger.recover() if self._backend.remote else []
            # Runs still out (on workers) hold their lanes before the first scheduler pass.
            for request in recovered:
                self._runner.resume(request)
            if recovered:
                await self._backend.recover(recovered)
            self._scheduler.start()
            self._started_at = time.monotonic()
            self._retries.start()
            for record in self._store.records():
                if record.run_requested is not None:
                    self._submit_manual(record.task_id)
            planned = self._store.next_run()
            if planned is not None:
                task_id, when = planned
                logger.info(
                    "dispatcher on %s started; next run %s (task %s)", self.directory, when, task_id
                )
            else:
                logger.info("dispatcher on %s started; no run planned", self.directory)
            if self.standing is not None:
                self.standing.bind(self._loop, self._stand_by)

    async def run_pending(self) -> None:
        """Run every task due now and return when all runs in progress have finished.

        Meant for host-application tests that move the clock (e.g. with freezegun); the state
        file reflects the runs when it returns.
        """
        if not self._scheduler.running:
            raise DispatcherNotRunningError(
                "run_pending() needs a started dispatcher: await start()"
            )
        self._scheduler.process_due()
        self._retries.fire_due()
        await self._runner.wait_idle()
        await self._store.save_async()
        if self._history is not None:
            await asyncio.to_thread(self._history.flush)

    async def stop(self, grace_period: float | None = 30.0) -> None:
        """Stop scheduling, let runs in progress finish, save, and release the directory.

        Runs still going after ``grace_period`` seconds (None: wait for them) are cancelled
        and stay runnable. Idempotent.
        """
        if self._store.closed:
            return
        if self._scheduler.running:
            self._scheduler.pause()
            self._retries.stop()
            await self._runner.drain(grace_period)
            await self._backend.close(0)
            self._scheduler.shutdown(wait=False)
            await self._listeners.drain(_LISTENER_GRACE)
        await self._store.drain_saves()
        self._store.touch()  # the final save happens even if nothing changed
        await self._store.save_async()
        if self._history is not None:
            await asyncio.to_thread(self._history.close)
        self._store.close()
        logger.info("dispatcher on %s stopped", self.directory)

    def close(self, *, save: bool = True) -> None:
        """Save and release the directory without an event loop (for a never-started dispatcher).

        ``save=False`` releases it without writing changes that are not saved yet (for a caller
        that reported them as not saved after a :class:`SaveFailedError`).
        """
        if self._store.closed:
            return
        if self._scheduler.running:
            raise DispatcherNotRunningError("the dispatcher is running: use 'await stop()'")
        if save:
            self._store.save()
        if self._history is not None:
            self._history.close()
        self._store.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
