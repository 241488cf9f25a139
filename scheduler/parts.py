"""The dispatcher's parts over one load of its store, and leading again after a lost lease.

:func:`build_parts` builds what the facade (:class:`scheduler.dispatcher.Dispatcher`) wires
over a store it has just acquired and loaded: the job store, the run path, the event relay,
the API's changes, the run history and the lifetime. A store of one owner (the JSON file) is
built once. A store shared by a cluster (PostgreSQL) may be lost to another instance: the
dispatcher then stands by, and :class:`Campaign` tries to take the lease again every third
of it, as ``task-dispatcher run`` does. Taking it is loading the store afresh (another
leader may have changed it) into new parts; once they are built, the old ones are stopped
(runs still going in them are cancelled: the new parts' load found them out and records
them as lost, as any new leader does) and the new ones started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any

from jobstores.jsonfile import JsonJobStore
from jobstores.state import StateStore
from scheduler.backends.local import LocalRunBackend
from scheduler.changes import TaskChanges, prepare_manager
from scheduler.history import RunHistory, open_history
from scheduler.leadership import Standing
from scheduler.ledger import RunObserver, on_reports
from scheduler.lifetime import Lifetime
from scheduler.listeners import Listeners
from scheduler.relay import EventRelay
from scheduler.runpath import RunPath
from tasks.clock import Clock
from tasks.errors import NotLeaderError
from tasks.manager import TaskManagerFactory
from tasks.runs import RunBackend

__all__ = ["Campaign", "Parts", "Settings", "build_parts"]

logger = logging.getLogger("scheduler.dispatcher")  # the dispatcher's log


@dataclass
class Settings:
    """What every build of a dispatcher's parts is made with (its constructor's arguments)."""

    directory: Path
    factory: TaskManagerFactory | None
    max_concurrent_runs: int
    history: bool | RunHistory
    snapshot_below: int
    clock: Clock | None = None
    listeners: Listeners = field(default_factory=Listeners)
    observers: list[RunObserver] = field(default_factory=list)
    """Observers of run events the host added (``observe_runs``): every build tells them."""
    backend: RunBackend | None = None
    """The host's run backend (None: each build makes a local one of its own)."""
    metrics: Any = None
    """The dispatcher's metrics (one object for its whole life), told of every run."""

    def make_backend(self) -> RunBackend:
        """The run backend of a build: the host's, or a new local one (fresh managers)."""
        return self.backend or LocalRunBackend(self.factory, self.clock)

    @property
    def leads_again(self) -> bool:
        """Whether a build after the first may use the run backend: a new local one, or
        the host's that runs here (one serving a fleet serves one leader only)."""
        return self.backend is None or not self.backend.remote


@dataclass
class Parts:
    """The parts over one load of the store."""

    backend: RunBackend
    store: JsonJobStore
    path: RunPath
    relay: EventRelay
    changes: TaskChanges
    history: RunHistory | None
    lifetime: Lifetime


def build_parts(
    settings: Settings,
    storage: StateStore | str | None,
    timezone: tzinfo | None,
    *,
    convert_timezone: bool,
    standing: Callable[[], Standing | None],
) -> Parts:
    """Acquire and load ``storage`` and build the parts over it (raises what
    :class:`~jobstores.jsonfile.JsonJobStore` raises, owning nothing then)."""
    backend = settings.make_backend()
    check_manager = functools.partial(prepare_manager, backend, settings.factory)
    store = JsonJobStore(
        settings.directory,
        timezone=timezone,
        convert_timezone=convert_timezone,
        accept=check_manager,
        snapshot_below=settings.snapshot_below,
        storage=storage,
        clock=settings.clock,
    )
    path = RunPath(store, backend, settings.max_concurrent_runs, store.timezone)
    # Listeners (typed events): the core's events, relayed (those of the API's calls when the
    # call is done, the others from the loop), and save health.
    relay = EventRelay(settings.listeners, store.now)
    relay.observers.append(path.retries.observe)
    store.on_events = relay.relay
    store.saver.on_change = relay.tell_save
    changes = TaskChanges(store, path, relay, backend, check_manager, standing)
    history = open_history(
        settings.directory, settings.history, store.timezone, store._storage, store.now
    )
    if history is not None:
        relay.observers.append(on_reports(history.record))
    if settings.metrics is not None:
        relay.observers.append(on_reports(settings.metrics.observe))
    relay.observers.extend(on_reports(observer) for observer in settings.observers)
    lifetime = Lifetime(
        store=store,
        path=path,
        backend=backend,
        listeners=settings.listeners,
        history=history,
        standing=standing,
    )
    if not backend.remote:
        path.ledger.recover()
    if not store.saver.durable:
        store.save()
    logger.info(
        "dispatcher on %s loaded %d task(s) (%d kept unrestored)",
        settings.directory,
        len(store.table),
        len(store.table.kept_records()),
    )
    return Parts(backend, store, path, relay, changes, history, lifetime)


class Campaign:
    """Stand by after the lease was lost and take it again (see the module docstring).

    ``current()`` is the dispatcher's parts now, ``use(parts)`` wires it to new ones and
    ``standing()`` is its standing (over the lease of the parts it uses). The storage the
    dispatcher lost is not used again: each attempt is made with ``renewed()`` of it (the
    same database and cluster, a lease of its own), as ``run`` opens the store anew.
    """

    def __init__(
        self,
        settings: Settings,
        current: Callable[[], Parts],
        use: Callable[[Parts], None],
        standing: Callable[[], Standing | None],
    ) -> None:
        self._settings = settings
        self._current = current
        self._use = use
        self._standing = standing
        self._task: asyncio.Task[None] | None = None
        self._building: asyncio.Future[Parts] | None = None
        self._adopting = False
        self.wanted: Callable[[], bool] = lambda: True
        """Asked when the lease is lost: whether to campaign."""

    @property
    def active(self) -> bool:
        """Whether it is campaigning now."""
        return self._task is not None and not self._task.done()

    def watch(self, parts: Parts) -> None:
        """Campaign once ``parts`` stand by (their store's lease lost), when the store can
        be led again (it is shared) with the settings' run backend."""
        storage = parts.store._storage
        if hasattr(storage, "renewed") and self._settings.leads_again:
            parts.lifetime.on_stand_by = self.begin

    def begin(self) -> None:
        """Campaign on the running loop (a no-op if it does already)."""
        if not self.active and self.wanted():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        lost: Any = self._current().store._storage  # a shared store's (see watch())
        standing = self._standing()
        where = standing.where if standing is not None else str(lost.path)
        # The host's step-down callback, if any, goes to each new lease.
        callback = standing.host_callback if standing is not None else None
        interval = lost.leadership.lease / 3
        said = None
        while True:
            storage = lost.renewed()
            storage.leadership.on_step_down = callback
            # Shielded: cancelled meanwhile, the build goes on in its thread, and what it
            # took is given up by cancel().
            self._building = asyncio.ensure_future(asyncio.to_thread(self._build, storage))
            try:
                parts = await asyncio.shield(self._building)
            except Exception as exc:  # another leads, the database is out of reach, ...
                self._building = None
                if str(exc) != said:
                    expected = isinstance(exc, NotLeaderError | OSError)
                    logger.log(
                        logging.INFO if expected else logging.ERROR,
                        "%s: standing by: %s",
                        where,
                        exc if expected else f"{type(exc).__name__}: {exc}",
                    )
                    said = str(exc)
                await asyncio.sleep(interval)
                continue
            self._building = None
            self._adopting = True
            try:
                await self._lead_again(parts)
            finally:
                self._adopting = False
            return

    def _build(self, storage: Any) -> Parts:
        old = self._current()
        return build_parts(
            self._settings,
            storage,
            old.store.timezone,
            convert_timezone=False,
            standing=self._standing,
        )

    async def _lead_again(self, parts: Parts) -> None:
        old = self._current()
        if parts.history is old.history:  # the host's history: used on, not closed
            old.lifetime.detach_history()
        await old.lifetime.stop(0)  # runs still going there were found out as lost
        self._use(parts)
        self.watch(parts)
        await parts.lifetime.start()

    async def cancel(self) -> None:
        """Stop campaigning (the dispatcher stops); parts built meanwhile are closed."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if self._adopting:  # the new parts are being started: let them, then stop them
            await task
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        building, self._building = self._building, None
        if building is not None:
            try:
                parts = await building
            except Exception:
                return  # it took nothing
            await asyncio.to_thread(parts.lifetime.close, False)
