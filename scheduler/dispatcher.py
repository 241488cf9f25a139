"""``Dispatcher``: the facade that wires a directory's tasks, their runs and their observers
(``scheduler.serve.TaskDispatcher`` adds the control plane that serves it).

The facade builds the parts and delegates to them: :class:`~scheduler.changes.TaskChanges`
(the API's changes, with :class:`~scheduler.saving.SaveFailures`),
:class:`~scheduler.lifetime.Lifetime` (start, run_pending, stop, close),
:class:`~scheduler.runpath.RunPath` (engine, runner, lanes, ledger, retry timer and the
handoff of the runs the API asks for) and :class:`~scheduler.relay.EventRelay` (events to
observers and listeners), over the store and the run backend.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from jobstores.jsonfile import SNAPSHOT_BELOW
from jobstores.saver import SaveHealth
from jobstores.state import StateStore
from scheduler.changes import AccountChange, checked_id
from scheduler.engine import DispatchScheduler
from scheduler.history import RunEntry, RunHistory
from scheduler.intake import UNSET, Unset
from scheduler.leadership import Standing, standing_of
from scheduler.ledger import RunObserver, on_reports
from scheduler.listeners import EventFilter, Listener, Listeners, WebhookListener
from scheduler.parts import Campaign, Parts, Settings, build_parts
from tasks.clock import Clock
from tasks.errors import HistoryUnavailableError
from tasks.manager import TaskManagerFactory
from tasks.model import TaskRecord
from tasks.policy import RunPolicy
from tasks.runs import RunBackend
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


def default_directory() -> Path:
    """``$TASK_DISPATCHER_DIR``, else ``./dispatcher``."""
    return Path(os.environ.get(DIR_ENV_VAR) or DEFAULT_DISPATCHER_DIR)


def _make_metrics(dispatcher: Dispatcher) -> DispatcherMetrics | None:
    """The Prometheus metrics of ``dispatcher``'s store and lanes, read from whichever parts
    it has when asked (None without ``prometheus_client``)."""
    try:
        from scheduler.metrics import DispatcherMetrics, MetricsSource
    except ImportError:  # prometheus_client comes with the optional 'control' extra
        return None

    def tasks_by_status() -> dict[str, int]:
        return dict(Counter(record.status.value for record in dispatcher._store.table.records()))

    return DispatcherMetrics(
        MetricsSource(
            tasks_by_status,
            lambda: dispatcher._path.lanes.waiting_counts(),
            lambda: dispatcher._store.save_health,
        )
    )


class Dispatcher:
    """The dispatcher of one directory's tasks, without the control plane that serves it.

    It wires the job store, the APScheduler engine, the account lanes, the runner and the run
    backend, and the observers (listeners, run history, metrics, the retry timer); its
    methods are the API hosts use, each delegating to the part whose job it is. Hosts use
    :class:`scheduler.TaskDispatcher` (of ``scheduler.serve``), which adds serving the control
    API and the dashboard, and whose documentation describes the parameters and behaviour.
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
        clock: Clock | None = None,
    ) -> None:
        directory = Path(dispatcher_dir) if dispatcher_dir is not None else default_directory()
        self._listeners = Listeners()
        self._settings = Settings(
            directory, task_manager_factory, max_concurrent_runs, history, snapshot_below
        )
        self._settings.clock, self._settings.listeners = clock, self._listeners
        self._settings.backend = run_backend
        self._use(
            build_parts(
                self._settings,
                store,
                None if timezone is None else resolve_timezone(timezone),
                convert_timezone=convert_timezone,
                standing=lambda: self.standing,
            )
        )
        self._settings.metrics = self._metrics = _make_metrics(self)
        if self._metrics is not None:
            self._relay.observers.append(on_reports(self._metrics.observe))
        self.lead_again = True
        """A shared store's lease lost: whether to campaign to lead again (see
        :class:`~scheduler.parts.Campaign`); ``run`` makes a new dispatcher instead."""
        self._campaign = Campaign(
            self._settings, lambda: self._parts, self._use, lambda: self.standing
        )
        self._campaign.wanted = lambda: self.lead_again
        self._campaign.watch(self._parts)

    def _use(self, parts: Parts) -> None:
        """Wire the facade to ``parts`` (built over the store just loaded)."""
        self._parts, self._backend, self._store = parts, parts.backend, parts.store
        self._path = parts.path
        self._ledger = parts.path.ledger  # (tests reach it here)
        self._relay, self._changes, self._history = parts.relay, parts.changes, parts.history
        self._lifetime, self.timezone = parts.lifetime, parts.store.timezone
        self.__dict__.pop("standing", None)  # over the new store's lease

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
        return self._lifetime.running

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
        return self._path.scheduler

    @property
    def run_backend(self) -> RunBackend:
        """Where runs execute."""
        return self._backend

    def observe_runs(self, observer: RunObserver) -> None:
        """Call ``observer(request, event)`` for every run event applied (from the loop)."""
        self._settings.observers.append(observer)
        self._relay.observers.append(on_reports(observer))

    @property
    def order_version(self) -> int:
        """A number that changes whenever an account's task order may have changed (a task
        added, removed or moved); it starts again from 0 in each process."""
        return self._store.table.order_version

    @property
    def account_tasks(self) -> dict[str, list[str]]:
        """Account id -> its task ids in priority order (a copy)."""
        return self._store.table.account_tasks()

    @property
    def history(self) -> RunHistory | None:
        """The run history (None if off or its file could not be opened)."""
        return self._history

    @property
    def metrics(self) -> DispatcherMetrics | None:
        """The Prometheus metrics (None without the ``prometheus_client`` package)."""
        return self._metrics

    @functools.cached_property
    def standing(self) -> Standing | None:
        """Leader or standby of a shared store (None: the one owner of a file always leads)."""
        return standing_of(self._store._storage, self._path.runner)

    @property
    def role(self) -> str:
        """``"leader"``, or ``"standby"`` once a shared store's lease is lost."""
        standing = self.standing
        return "leader" if standing is None else standing.role

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

    # ------------------------------------------------------------------ queries

    def get_task(self, task_id: str) -> TaskRecord:
        """A snapshot of ``task_id``'s record; raises :class:`TaskNotFoundError`."""
        return self._store.table.get(checked_id(task_id)).snapshot()

    def list_tasks(self) -> list[TaskRecord]:
        """Snapshots of every task, in the order they were added."""
        return [record.snapshot() for record in self._store.table.records()]

    def peek_tasks(self) -> list[TaskRecord]:
        """Every task's current record, in the order they were added, without a copy: for
        readers that only read and look often (the dashboard's live feed).

        Records are immutable and a change replaces a task's record, so a record seen here
        never changes; only its ``kwargs`` dict could be changed in place, and must not be
        (:meth:`list_tasks` gives copies, at about 10 us a task).
        """
        return self._store.table.records()

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
        return await self._changes.add(tasks)

    # ------------------------------------------------------------------ changing

    def pause_task(self, task_id: str) -> None:
        """Stop running ``task_id`` until resumed; saved when this returns.

        A run in progress finishes; none starts after it. Pausing a paused or completed task
        changes nothing.
        """
        self._changes.pause(task_id)

    def resume_task(self, task_id: str) -> None:
        """Schedule a paused task again; saved when this returns.

        The next run is one interval after the last run's planned time (not its jittered
        start: the grid never moves) or now, whichever is later, moved to the window's next
        opening if outside it. Resuming a task that is not paused
        changes nothing.
        """
        self._changes.resume(task_id)

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
        return self._changes.update(
            task_id,
            interval=interval,
            valid_time_range=valid_time_range,
            task_end_time=task_end_time,
            run_policy=run_policy,
            kwargs=kwargs,
        )

    def remove_task(self, task_id: str) -> None:
        """Delete ``task_id`` for good; saved when this returns. A run in progress finishes."""
        self._changes.remove(task_id)

    def reorder_task(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based) in its account's priority order.

        Tasks of one account run one at a time in that order. Saved when this returns.
        """
        self._changes.reorder(task_id, position)

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
        return self._changes.request_run(task_id)

    def pause_account(self, account_id: str) -> list[AccountChange]:
        """Pause every task of ``account_id`` (an account banned or logged out), in one
        commit, saved when this returns; runs in progress finish.

        Returns what happened to each task, in the account's order; a ``TaskPaused`` event
        is sent for each task paused. Raises :class:`AccountNotFoundError` if no task
        belongs to the account, :class:`SaveFailedError` if the change (in effect, and
        announced) could not be saved.
        """
        return self._changes.pause_account(account_id)

    def resume_account(self, account_id: str) -> list[AccountChange]:
        """Resume every paused task of ``account_id`` (as :meth:`resume_task` does each), in
        one commit, saved when this returns.

        Returns what happened to each task, in the account's order; a ``TaskResumed`` event
        is sent for each task resumed. Raises :class:`AccountNotFoundError` if no task
        belongs to the account, :class:`SaveFailedError` if the change (in effect, and
        announced) could not be saved.
        """
        return self._changes.resume_account(account_id)

    # ------------------------------------------------------------------ control plane
    # What the control API (scheduler/control/) needs beyond the methods above.

    def next_runs(self, task_id: str, count: int = 5) -> RunPreview:
        """``task_id``'s next ``count`` planned runs (for a paused task: if resumed now)."""
        return preview_runs(self._store.table.get(task_id), self.timezone, self._store.now(), count)

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
        """The next ``count`` runs ``task_id`` would have with these changes, changing nothing;
        invalid ones raise :class:`InvalidTaskError` naming the field, as :meth:`update_task`."""
        return self._changes.preview_edit(
            task_id,
            count,
            self.timezone,
            interval=interval,
            valid_time_range=valid_time_range,
            task_end_time=task_end_time,
            run_policy=run_policy,
        )

    def queued_runs(self) -> dict[str, list[str]]:
        """Account id -> ids of tasks whose due run awaits its lane (on the dispatcher's loop)."""
        return self._path.queued_runs(self.account_tasks)

    @property
    def uptime(self) -> float | None:
        """Seconds since :meth:`start` (None if not started or stopped)."""
        return self._lifetime.uptime

    # ------------------------------------------------------------------ running

    async def start(self) -> None:
        """Start scheduling on the running event loop (a no-op if already started)."""
        self._changes.check_open()
        await self._lifetime.start()

    async def run_pending(self) -> None:
        """Run every task due now and return when all runs in progress have finished.

        Meant for host-application tests that move the clock (a ``clock`` they advance, or
        freezegun); "now" is the clock's reading, and the state file reflects the runs on return.
        """
        await self._lifetime.run_pending()

    async def stop(self, grace_period: float | None = 30.0) -> None:
        """Stop scheduling, let runs in progress finish, save, and release the directory.

        Runs still going after ``grace_period`` seconds (None: wait for them) are cancelled
        and stay runnable. Idempotent.
        """
        await self._campaign.cancel()
        await self._lifetime.stop(grace_period)

    def close(self, *, save: bool = True) -> None:
        """Save and release the directory without an event loop (for a never-started dispatcher).

        ``save=False`` releases it without writing changes that are not saved yet (for a caller
        that reported them as not saved after a :class:`SaveFailedError`).
        """
        self._lifetime.close(save)

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
