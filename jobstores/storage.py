"""The stores of a dispatcher directory: the state in ``dispatch_config.json`` (and a journal).

Both implement the :class:`~jobstores.state.StateStore` port, and share
:class:`DirectoryStore`: the directory's lock (ownership), loading (recover, then restore the
records) and reading without owning. Each only does its part, committing: group commit,
retries and save health are the saver's.

:class:`SnapshotStorage` rewrites the whole ``dispatch_config.json`` at each commit with the
atomic protocol of :mod:`jobstores.durable`. :class:`~jobstores.journal.JournalStorage` (the
default) appends each commit's changes to a journal and folds it into that file in the
background; a store asks for the whole state in its next image through
:meth:`~jobstores.state.StateStore.wants_full_image`. Whatever the store, the owner makes
every commit carry the whole state while the store is small (see
:attr:`~jobstores.table.StateImage.requested`), so the file itself is current there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from jobstores.durable import (
    DirectoryLock,
    ensure_private_dir,
    fsync_dir,
    remove_stale_temp_files,
    write_atomic,
)
from jobstores.format import (
    CHUNK,
    CorruptFileError,
    Document,
    encode_document_chunks,
    encode_raw,
    encode_task,
)
from jobstores.loading import BACKUP_FILENAME, STATE_FILENAME, JournalRead, read_state, restore
from jobstores.state import StateStore, StoredState
from jobstores.table import StateImage
from tasks.model import TaskRecord
from tasks.schedule import utc_now
from tasks.zones import choose_timezone, zone_key

__all__ = [
    "STATE_FILENAME",
    "DirectoryStore",
    "EncodedTasks",
    "SnapshotStorage",
    "StateStore",
    "StorageBackend",
]

logger = logging.getLogger(__name__)

StorageBackend = StateStore
"""The former name of :class:`~jobstores.state.StateStore`."""


class DirectoryStore:
    """What the stores of a dispatcher directory share: the directory's lock, loading and
    reading without owning. Subclasses commit, and see what a load read (:meth:`_loaded`)."""

    def __init__(self, directory: Path, *, timezone_key: str | None = None) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILENAME
        """The state file a person reads."""
        self.backup_path = self.directory / BACKUP_FILENAME
        self.timezone_key = timezone_key
        """The zone the file records for its hour windows."""
        self._owner = DirectoryLock(self.directory)

    # ------------------------------------------------------------------ ownership

    @property
    def owned(self) -> bool:
        """Whether this object owns the directory."""
        return self._owner.held

    def acquire(self) -> None:
        """Own the directory (created, private, if missing): its lock is taken at once, or
        :class:`~tasks.errors.DirectoryLockedError` names it."""
        ensure_private_dir(self.directory)
        self._owner.acquire()

    def release(self) -> None:
        """Give the directory's lock up (a no-op when not held)."""
        self._owner.release()

    # ------------------------------------------------------------------ loading

    def load(
        self,
        zone: tzinfo | None,
        *,
        convert: bool = False,
        now: datetime | None = None,
        accept: Callable[[TaskRecord], None] | None = None,
        fraction: Callable[[], float] | None = None,
    ) -> StoredState:
        """Clean up after an interrupted save, read the state (the journal folded in,
        anything unreadable set aside: see :func:`~jobstores.loading.read_state`) and
        restore its records. Call only while owning the directory."""
        if not self.owned:
            raise RuntimeError(f"{str(self.directory)!r} is not owned: acquire() it first")
        remove_stale_temp_files(self.path)
        remove_stale_temp_files(self.backup_path)
        document, from_backup, journal = read_state(self.directory, repair=True, defer_tasks=True)
        self._loaded(document, journal)
        recorded = document.timezone if document is not None else None
        settled = choose_timezone(zone, recorded, self.path, convert=convert)
        self.timezone_key = zone_key(settled)
        if recorded is not None and self.timezone_key != recorded:
            logger.warning(
                "%s: converting the store from %s to %s as asked: hour windows and end dates "
                "are now read in %s",
                self.path,
                recorded,
                settled,
                settled,
            )
        state = StoredState(timezone=settled, recorded_zone=recorded, repaired=from_backup)
        if document is None:
            return state
        for problem in document.problems:
            logger.warning("%s: %s", self.path, problem)
        restored = restore(
            document.tasks,
            settled,
            parsed_json=document.parsed_json,
            now=now or utc_now().astimezone(settled),
            accept=accept,
            fraction=fraction,
            trusted=_trust(document),
            sealed=document.sealed_tasks,
        )
        return _filled(state, document, restored.records, restored.kept)

    def _loaded(self, document: Document | None, journal: JournalRead) -> None:
        """What a load read (owning the directory): the store's own bookkeeping."""

    def read(self, zone: tzinfo | None = None, *, convert: bool = False) -> StoredState:
        """The state as a load would return it, without the lock and without writing a byte
        (nothing is set aside or repaired; records are validated only).

        Raises :class:`~jobstores.format.CorruptFileError` when the file and its backup are
        unreadable, :class:`~tasks.errors.NewerFormatError` for a newer format and the zone
        errors of :func:`~tasks.zones.choose_timezone`.
        """
        existed = self.path.exists()
        document, _, _ = read_state(self.directory, repair=False, defer_tasks=True)
        if document is None and existed:
            raise CorruptFileError(f"{self.path} and its backup are unreadable")
        recorded = document.timezone if document is not None else None
        settled = choose_timezone(zone, recorded, self.path, convert=convert)
        state = StoredState(timezone=settled, recorded_zone=recorded)
        if document is None:
            return state
        restored = restore(
            document.tasks,
            settled,
            parsed_json=document.parsed_json,
            sealed=document.sealed_tasks,
        )
        return _filled(state, document, restored.records, restored.kept)


def _filled(
    state: StoredState,
    document: Document,
    records: list[TaskRecord],
    kept: list[tuple[Any, str | None]],
) -> StoredState:
    state.exists = True
    state.saved_at = document.saved_at
    state.records = records
    state.kept = kept
    state.account_tasks = document.account_tasks
    state.extra = document.extra
    return state


def _trust(document: Document) -> Callable[[Any], bool] | None:
    """Which task objects of ``document`` need no validation: all of a checksummed
    document, and those from journal lines (each has its own checksum)."""
    if document.trusted:
        return lambda raw: True
    if document.trusted_tasks:
        return lambda raw: id(raw) in document.trusted_tasks
    return None


class EncodedTasks:
    """Each task's encoded line, kept from one whole-file write to the next: a record
    unchanged since (the same object: records are immutable) reuses its line."""

    def __init__(self) -> None:
        self._lines: dict[str, tuple[TaskRecord, bytes]] = {}

    def encode(self, records: Sequence[TaskRecord]) -> list[bytes]:
        """The lines of ``records``, in order; forgets the lines of tasks gone since."""
        cache = self._lines
        lines = []
        for record in records:
            cached = cache.get(record.task_id)
            if cached is not None and cached[0] is record:
                lines.append(cached[1])
            else:
                line = encode_task(record.plain())
                cache[record.task_id] = (record, line)
                lines.append(line)
        if len(cache) > len(records) + 1024:
            live = {record.task_id for record in records}
            self._lines = {k: v for k, v in cache.items() if k in live}
        return lines

    def clear(self) -> None:
        """Forget every line (to give the memory back)."""
        self._lines = {}


class SnapshotStorage(DirectoryStore):
    """The whole state in one file, replaced atomically at each commit: a
    :class:`~jobstores.state.StateStore` whose file is current after every commit.

    The replaced file is kept as ``<name>.bak``; each task's line is encoded once per change
    (unchanged records reuse the line written before).
    """

    def __init__(self, directory: Path, *, timezone_key: str | None = None) -> None:
        super().__init__(directory, timezone_key=timezone_key)
        self._encoded = EncodedTasks()
        self._journal_seq = 0
        self._journal: list[Path] = []

    def _loaded(self, document: Document | None, journal: JournalRead) -> None:
        """A journal left by :class:`~jobstores.journal.JournalStorage` is folded in by the
        load, and removed once the first commit has written what it held."""
        self._journal_seq = journal.next_seq - 1
        self._journal = [path for _, path in journal.segments]

    def wants_full_image(self, *, closing: bool = False) -> bool:
        """Always: every commit writes the whole file (``closing``: only while a journal
        loaded from the directory is not folded in yet)."""
        return bool(self._journal) if closing else True

    def fold_due_in(self) -> float | None:
        """Never: the file is current after every commit."""
        return None

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Write ``image`` (always a full one) as the whole state file, atomically and
        durably."""
        lines = [*self._encoded.encode(image.records), *map(encode_raw, image.kept)]
        # Joined a few hundred lines at a time: no single copy of every task is made, so this
        # thread never holds the interpreter (and the event loop) for long.
        data = encode_document_chunks(
            [b",\n".join(lines[at : at + CHUNK]) for at in range(0, len(lines), CHUNK)],
            image.account_tasks,
            saved_at,
            self.timezone_key,
            image.extra,
            self._journal_seq,
            sealed=not image.kept,
        )
        write_atomic(self.path, data, backup=self.backup_path)
        if self._journal:
            # The file holds every journal line now (journal_seq says so, should these
            # removals not reach the disk).
            for path in self._journal:
                with contextlib.suppress(OSError):
                    path.unlink()
            self._journal = []
            with contextlib.suppress(OSError):
                fsync_dir(self.path.parent)

    def close(self) -> None:
        """Leave no temporary file behind (the owner still holds the directory, no save runs)."""
        remove_stale_temp_files(self.path)
        remove_stale_temp_files(self.backup_path)
