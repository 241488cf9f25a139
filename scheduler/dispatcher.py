"""``Dispatcher``: the facade that wires a directory's tasks, their runs and their observers
(``scheduler.serve.TaskDispatcher`` adds the control plane that serves it).

The facade builds the parts and delegates to them (its reads and changes are the two halves
in ``scheduler.facade``): :class:`~scheduler.changes.TaskChanges`
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
from datetime import tzinfo
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from jobstores.jsonfile import SNAPSHOT_BELOW
from jobstores.saver import SaveHealth
from jobstores.state import StateStore
from scheduler.changes import AccountChange
from scheduler.engine import DispatchScheduler
from scheduler.facade import TaskCommands, TaskQueries
from scheduler.history import RunHistory
from scheduler.leadership import Standing, standing_of
from scheduler.ledger import RunObserver, on_reports
from scheduler.listeners import EventFilter, Listener, Listeners, WebhookListener
from scheduler.parts import Campaign, Parts, Settings, build_parts
from tasks.clock import Clock
from tasks.manager import TaskManagerFactory
from tasks.runs import RunBackend
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


class Dispatcher(TaskCommands, TaskQueries):
    """The dispatcher of one directory's tasks, without the control plane that serves it.

    It wires the job store, the APScheduler engine, the account lanes, the runner and the run
    backend, and the observers (listeners, run history, metrics, the retry timer), and holds
    the lifecycle and the listeners. The API's reads come from
    :class:`~scheduler.facade.TaskQueries` and its changes from
    :class:`~scheduler.facade.TaskCommands`, each delegating to the part whose job it is. Hosts use
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
