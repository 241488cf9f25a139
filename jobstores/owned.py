"""``OwnedStore``: a stopped dispatcher's store, owned for a change and nothing else.

What a one-shot command (the CLI's ``pause``, ``add``, ``update``, ...) needs to change tasks
while no dispatcher runs: the :class:`~jobstores.state.StateStore` is acquired (the directory's
lock: a dispatcher that owns it makes this refuse), loaded, and its records put in a
:class:`~jobstores.core.TaskCore`; every change is one of the core's commands, made durable by
the :class:`~jobstores.saver.Saver` through the same port before the command answers. Nothing
else is built: no task manager is created (no factory is called; a task whose type this
process does not know is changed like any other), no scheduler, job or run backend exists, and
runs left out by a dispatcher that stopped are left as they are, for that dispatcher's next
start to take back.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Self

from jobstores.commands import Command
from jobstores.core import Applied, TaskCore
from jobstores.jsonfile import SNAPSHOT_BELOW
from jobstores.saver import SaveHealth, Saver
from jobstores.state import StateStore
from jobstores.table import TaskTable
from tasks.model import TaskRecord
from tasks.schedule import Schedule, utc_now

__all__ = ["OwnedStore"]


class OwnedStore:
    """``store`` owned until :meth:`close`: loaded without creating a task manager,
    changed through its core, committed through it.

    ``zone``/``convert`` settle the zone as a dispatcher's load does
    (:func:`tasks.zones.choose_timezone`: the zone the state records unless converted);
    ``fraction`` draws the jitter of runs planned here (``random.random`` by default);
    ``snapshot_below`` as :class:`~jobstores.jsonfile.JsonJobStore`'s. Raises what
    :meth:`StateStore.acquire` and :meth:`StateStore.load` raise (another owner:
    :class:`~tasks.errors.DirectoryLockedError`), owning nothing then.
    """

    def __init__(
        self,
        store: StateStore,
        zone: tzinfo | None,
        *,
        convert: bool = False,
        fraction: Callable[[], float] | None = None,
        snapshot_below: int = SNAPSHOT_BELOW,
    ) -> None:
        fraction = fraction or random.random  # looked up now: a test may have replaced it
        self.store = store
        self.snapshot_below = snapshot_below
        self.table = TaskTable(f"store of {str(store.path)!r}")
        self.core = TaskCore(self.table, self.schedule, fraction)
        self._saver = Saver(self.table, store, self.now, snapshot_below=snapshot_below)
        self._closed = False
        self.timezone: tzinfo = UTC
        """The zone of the hour windows, as the load settled it."""
        store.acquire()
        try:
            # No ``accept``: records are restored without creating their managers.
            state = store.load(zone, convert=convert, fraction=fraction)
            self.timezone = state.timezone
            self.table.load(state.records, state.kept, state.account_tasks)
            self.table.extra.update(state.extra)
            small = len(state.records) + len(state.kept) < snapshot_below
            if state.repaired or state.kept or (small and store.wants_full_image(closing=True)):
                # As a dispatcher's load does: what was restored (or set aside) is made
                # durable whole, so that the file is whole after the command too.
                self.table.touch()
                self._saver.save()
        except BaseException:
            store.release()
            raise

    @property
    def path(self) -> Path:
        """The state as messages name it (``dispatch_config.json``)."""
        return self.store.path

    def now(self) -> datetime:
        """The current instant in the store's zone (how records carry time)."""
        return utc_now().astimezone(self.timezone)

    def schedule(self, record: TaskRecord) -> Schedule:
        """When ``record`` may run, in the store's zone."""
        return Schedule.of(record, self.timezone)

    def apply(self, command: Command, now: datetime | None = None) -> Applied:
        """Apply ``command`` to the core at ``now`` (the clock's reading by default); what it
        changed, not saved yet (see :meth:`save`)."""
        return self.core.apply(command, self.now() if now is None else now)

    def save(self) -> bool:
        """Make every change so far durable through the store; True once it is (False: the
        commit failed, see :attr:`save_health`, and the changes are not durable)."""
        return self._saver.save()

    @property
    def save_health(self) -> SaveHealth:
        """How saving went (the last error of a failed :meth:`save`)."""
        return self._saver.health

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop changing, fold a journal into the file as a dispatcher closing does (only
        when every change is durable: a failed commit is not written again here), and give
        the store up."""
        if self._closed:
            return
        self._closed = True
        self.table.close()
        try:
            if self._saver.durable and self.store.wants_full_image(closing=True):
                self.table.touch()
                self._saver.save()
            self._saver.close()
            self.store.close()
        finally:
            self.store.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
