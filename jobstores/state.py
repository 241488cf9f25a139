"""The ``StateStore`` port: where a dispatcher's tasks are kept, in the words of tasks.

The owner of the task table (:class:`~jobstores.jsonfile.JsonJobStore`) speaks to its store
through this protocol only, so a store is chosen, not built in: the journal
(:class:`~jobstores.journal.JournalStorage`, the default) and the whole-file snapshot
(:class:`~jobstores.storage.SnapshotStorage`) implement it today; one contract suite
(``tests/jobstores/test_state_store_contract.py``) runs over every implementation, and a
new store joins it as one more parameter.

What an implementation must do (the specification a database store follows too):

Ownership
    :meth:`~StateStore.acquire` makes this object the one owner of the state, at once or
    not at all: while it owns it, no other store object (in this or another process, on
    this or another machine) can acquire the same state, and the ownership ends by itself
    if the owner's process dies (an OS file lock; a database's advisory lock or lease).
    Another owner makes it raise a :class:`~tasks.errors.DispatcherError` whose message
    names the state (its directory or database) and says it is in use; the JSON stores
    raise :class:`~tasks.errors.DirectoryLockedError`. Acquiring what this object already
    owns is allowed. :meth:`~StateStore.release` gives it up (a no-op when not owned).

Loading (the owner)
    :meth:`~StateStore.load` is called once, owning the state, before any commit. It
    recovers from whatever an interrupted commit left (it may write to do so, and sets
    unreadable data aside, never drops it), settles the zone (the zone asked for, else the
    one the state records, else the local one; :func:`tasks.zones.choose_timezone`) and
    returns a :class:`StoredState`: every record that could be restored (validated and
    made consistent for scheduling at ``now`` by :func:`jobstores.loading.restore`, which
    also applies ``accept`` and draws jitter with ``fraction``), each account's recorded
    order, every unrestorable record verbatim with its task id, the top-level keys the
    store does not interpret, the recorded zone. Nothing of the store's own layout (files,
    rows, ids of raw objects) leaves it.

Reading (anyone)
    :meth:`~StateStore.read` returns what a load would, without owning the state and
    without writing anything, creating task managers or making records consistent: for
    ``list``, ``show`` and :func:`~jobstores.snapshot.read_snapshot` on a stopped (or
    running) dispatcher. It sees a complete state as of some instant at or after the last
    acknowledged commit before the call (a snapshot replaced atomically, journal lines
    counted only once whole; a database reads in one transaction).

Committing (the owner)
    :meth:`~StateStore.commit` makes one :class:`~jobstores.table.StateImage` durable, all
    of it or none: when it returns, every change the image carries survives a crash of
    the process or the machine; when it raises :class:`OSError` (a database store turns
    its connection and transaction errors into ``OSError``), the durable state is what it
    was before the call, and the same changes are offered again at the next commit. Every
    image carries the changes since the last durable commit: ``changes`` (the latest record
    of each changed id, None for a removal, in the order the ids first changed), then
    ``orders`` (an account's whole order) and ``moves`` (a task placed before another);
    a store that writes changes only (the journal, a database row per task) applies them
    in that order. A full image (:attr:`~jobstores.table.StateImage.full`, asked for by
    :meth:`~StateStore.wants_full_image`, or given whenever the owner wants the whole state
    written) also carries the whole state: after it, the durable state is exactly that
    state, kept records and ``extra`` included. Kept records and ``extra`` come back from
    every later load as they were. Commits come from one thread at a time, never
    concurrently with :meth:`~StateStore.load`; ``saved_at`` is the instant to record.
    A store shared by several instances refuses the commit of one that no longer owns the
    state (another took over) with :class:`NotOwnerError`: nothing changed, and no commit
    of this object succeeds again (the owner is told to stand by; the saver logs it as a
    warning, not as a failing disk).
    A store with no file for people to read (a database) answers
    :meth:`~StateStore.wants_full_image` False and :meth:`~StateStore.fold_due_in` None.

Closing
    :meth:`~StateStore.close` ends the commits (waiting for any background work the store
    started); :meth:`~StateStore.release` follows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jobstores.table import StateImage
from tasks.model import TaskRecord

__all__ = ["NotOwnerError", "StateStore", "StoredState"]


class NotOwnerError(OSError):
    """A commit refused because this store object no longer owns the state (another
    instance took it over): nothing durable changed, and nothing will while it does not own
    it. An ``OSError``, as every refused commit is."""


@dataclass
class StoredState:
    """What a store holds, as its owner (or a reader) gets it back."""

    timezone: tzinfo
    """The zone hour windows and end dates are read in, as settled by the load."""
    recorded_zone: str | None = None
    """The IANA key of the zone the state records (None: none recorded, or no state yet)."""
    exists: bool = False
    """Whether there was any state (False: a new store)."""
    saved_at: str | None = None
    """When the state was last saved, as recorded (ISO-8601), if known."""
    records: list[TaskRecord] = field(default_factory=list)
    """Every restored record, in stored order."""
    account_tasks: dict[str, list[str]] = field(default_factory=dict)
    """Each account's task ids in priority order, as recorded: it may name ids that are not
    among ``records`` (unrestorable ones) and miss some (the owner puts those last)."""
    kept: list[tuple[Any, str | None]] = field(default_factory=list)
    """Every record that could not be restored, verbatim as stored (a JSON value), with its
    task id when it has a string one: written back unchanged by later commits."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys of the stored state this code does not interpret, kept as they were."""
    repaired: bool = False
    """The load had to fall back on older data (a backup): the owner commits the whole
    state at once, so that what it restored is what is durable."""


@runtime_checkable
class StateStore(Protocol):
    """Where a dispatcher's task state is kept (see the module docstring for the contract)."""

    path: Path
    """Where the state is, as messages and ``TaskDispatcher.state_file`` name it (the JSON
    stores: ``dispatch_config.json``)."""
    timezone_key: str | None
    """The IANA key of the zone the state records for its hour windows (set by
    :meth:`load`; None for a zone without one)."""

    def acquire(self) -> None:
        """Become the one owner of the state, at once, or raise a
        :class:`~tasks.errors.DispatcherError` naming the state and saying it is in use."""
        ...

    def release(self) -> None:
        """Give ownership up (a no-op when not owned)."""
        ...

    def load(
        self,
        zone: tzinfo | None,
        *,
        convert: bool = False,
        now: datetime | None = None,
        accept: Callable[[TaskRecord], None] | None = None,
        fraction: Callable[[], float] | None = None,
    ) -> StoredState:
        """Owning the state: recover, then return it with every record restored.

        ``zone``/``convert`` as :func:`tasks.zones.choose_timezone` (raises its errors);
        ``now`` the instant records are made consistent at (None: the current one, in the
        settled zone); ``accept(record)`` may refuse a record (it is kept unrestored);
        ``fraction()`` draws the jitter of next runs planned here.
        """
        ...

    def read(self, zone: tzinfo | None = None, *, convert: bool = False) -> StoredState:
        """The state as a load would return it, without owning it nor writing anything
        (records are validated, not made consistent; no manager is created)."""
        ...

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Make ``image`` durable, all of it or none; raise :class:`OSError` leaving the
        previous durable state intact."""
        ...

    def wants_full_image(self, *, closing: bool = False) -> bool:
        """Whether the next commit should carry the whole state (:attr:`StateImage.full`).

        ``closing``: whether one more commit of the whole state is worth making before the
        owner closes, or right after it loads a small store (the JSON file lacks changes
        that are durable elsewhere, in journal lines); a store without such a file answers
        False.
        """
        ...

    def fold_due_in(self) -> float | None:
        """Seconds until a commit of the whole state is due although nothing changes (the
        journal's file has lagged long enough); None when none is."""
        ...

    def close(self) -> None:
        """No commit follows: finish background work (ownership is still held)."""
        ...
