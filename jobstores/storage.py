"""Storage backends: how the task table's state reaches the disk and comes back.

A backend has two duties: :meth:`~StorageBackend.load` (find the last durable state,
recovering from damage) and :meth:`~StorageBackend.commit` (make one captured state durable,
or raise ``OSError`` leaving the previous durable state intact). Group commit, retries and
save health are the saver's; a backend only does its part.

:class:`SnapshotStorage`, the first backend, rewrites the whole ``dispatch_config.json`` at
each commit with the atomic protocol of :mod:`jobstores.durable`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Protocol

from jobstores.durable import remove_stale_temp_files, write_atomic
from jobstores.format import Document, encode_document, encode_raw, encode_task
from jobstores.loading import read_document
from jobstores.table import StateImage
from tasks.model import TaskRecord

__all__ = ["STATE_FILENAME", "SnapshotStorage", "StorageBackend"]

STATE_FILENAME = "dispatch_config.json"
"""The state file in a dispatcher directory: the seed's format, read and repaired by people."""


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


class SnapshotStorage:
    """The whole state in one file, replaced atomically at each commit.

    The replaced file is kept as ``<name>.bak``; each task's line is encoded once per change
    (unchanged records reuse the line written before).
    """

    def __init__(self, directory: Path, *, timezone_key: str | None = None) -> None:
        self.path = directory / STATE_FILENAME
        self.backup_path = directory / f"{STATE_FILENAME}.bak"
        self.timezone_key = timezone_key
        """The zone the file records for its hour windows."""
        self._lines: dict[str, tuple[TaskRecord, bytes]] = {}

    def load(self) -> tuple[Document | None, bool]:
        """Clean up after an interrupted save, then read the state (see ``read_document``).

        Call only while owning the directory.
        """
        remove_stale_temp_files(self.path)
        remove_stale_temp_files(self.backup_path)
        return read_document(self.path, self.backup_path, repair=True)

    def _encoded(self, records: list[TaskRecord] | tuple[TaskRecord, ...]) -> list[bytes]:
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

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Write ``image`` as the whole state file, atomically and durably."""
        data = encode_document(
            [*self._encoded(list(image.records)), *map(encode_raw, image.kept)],
            image.account_tasks,
            saved_at,
            self.timezone_key,
            image.extra,
        )
        write_atomic(self.path, data, backup=self.backup_path)
