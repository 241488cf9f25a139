"""Storage backends: how the task table's state reaches the disk and comes back.

A backend has two duties: :meth:`~StorageBackend.load` (find the last durable state,
recovering from damage) and :meth:`~StorageBackend.commit` (make one captured state durable,
or raise ``OSError`` leaving the previous durable state intact). Group commit, retries and
save health are the saver's; a backend only does its part.

:class:`SnapshotStorage`, the first backend, rewrites the whole ``dispatch_config.json`` at
each commit with the atomic protocol of :mod:`jobstores.durable`. The second,
:class:`~jobstores.journal.JournalStorage` (the default), appends each commit's changes to a
journal and folds it into that file in the background; a backend asks for the whole state
in its next image through :meth:`StorageBackend.wants_full_image`. Whatever the backend, the
owner makes every commit carry the whole state while the store is small (see
:attr:`~jobstores.table.StateImage.requested`), so the file itself is current there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

from jobstores.durable import fsync_dir, remove_stale_temp_files, write_atomic
from jobstores.format import (
    CHUNK,
    Document,
    encode_document_chunks,
    encode_raw,
    encode_task,
)
from jobstores.loading import BACKUP_FILENAME, STATE_FILENAME, read_state
from jobstores.table import StateImage
from tasks.model import TaskRecord

__all__ = ["STATE_FILENAME", "EncodedTasks", "SnapshotStorage", "StorageBackend"]


class StorageBackend(Protocol):
    """Where a dispatcher directory's state is kept."""

    path: Path
    """The state file a person reads."""
    timezone_key: str | None
    """The IANA key of the zone the state records for its hour windows."""

    def load(self) -> tuple[Document | None, bool]:
        """The last durable state (None: none yet), and whether it came from a backup."""
        ...

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Make ``image`` durable; raise ``OSError`` (nothing durable changed) on failure."""
        ...

    def wants_full_image(self, *, closing: bool = False) -> bool:
        """Whether the next commit should carry the whole state (:attr:`StateImage.full`).

        ``closing``: whether the state file lacks changes that are durable elsewhere (a
        journal's lines), so that one more commit of the whole state is worth making before
        the owner closes (a journal folds itself into the snapshot then) or after it loads a
        small store (whose file is to be current).
        """
        ...

    def fold_due_in(self) -> float | None:
        """Seconds until a commit of the whole state is due although nothing changes (the
        file a person reads has been behind long enough); None when none is."""
        ...

    def close(self) -> None:
        """The owner is done: no commit follows (the directory is still owned)."""
        ...


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


class SnapshotStorage:
    """The whole state in one file, replaced atomically at each commit.

    The replaced file is kept as ``<name>.bak``; each task's line is encoded once per change
    (unchanged records reuse the line written before).
    """

    def __init__(self, directory: Path, *, timezone_key: str | None = None) -> None:
        self.path = directory / STATE_FILENAME
        self.backup_path = directory / BACKUP_FILENAME
        self.timezone_key = timezone_key
        """The zone the file records for its hour windows."""
        self._encoded = EncodedTasks()
        self._journal_seq = 0
        self._journal: list[Path] = []

    def load(self) -> tuple[Document | None, bool]:
        """Clean up after an interrupted save, then read the state (see ``read_state``).

        A journal left by :class:`~jobstores.journal.JournalStorage` is folded in, and
        removed once the first commit has written what it held. Call only while owning the
        directory.
        """
        remove_stale_temp_files(self.path)
        remove_stale_temp_files(self.backup_path)
        document, from_backup, journal = read_state(self.path.parent, repair=True)
        self._journal_seq = journal.next_seq - 1
        self._journal = [path for _, path in journal.segments]
        return document, from_backup

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
