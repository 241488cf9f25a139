"""``JournalStorage``: each commit appends its changes to a journal; the snapshot follows later.

A commit writes one line per change (the task's whole record, its removal, a reordered
task's new place, or an account's whole order when many of its tasks were reordered) with a
sequence number and a CRC-32, the last line marked as ending the commit,
then one ``fdatasync``: a change costs what it writes, not what the store holds. The saver
groups concurrent changes into one commit, so they share the sync. Lines are encoded and
written a few hundred at a time on the save thread, so even a commit of every task never
holds the interpreter (and the event loop) for long, nor keeps a copy of what it wrote.

``dispatch_config.json`` stays the seed's format and what a person reads and repairs. While
the store is small the owner asks for the whole state at every commit
(:attr:`~jobstores.table.StateImage.requested`): the snapshot is written then and there, in
place of journal lines, so the file itself holds every acknowledged change. Above that, when
the journal outgrows the snapshot or its oldest line is :data:`MAX_AGE` old (the saver asks
at that age even if nothing changes, see :meth:`JournalStorage.fold_due_in`), the saver
hands over the whole state and a background thread writes it with the atomic protocol of
:mod:`jobstores.durable`, recording the last journal line it holds (``journal_seq``); only
then are the journal segments it covers deleted. A crash at any instant leaves the old or
the new snapshot and every segment not yet covered: loading skips the lines the snapshot
holds, so nothing is lost and nothing applied twice (see :func:`jobstores.loading.read_state`).

Segments: ``dispatch_config.journal-<first line number>``. Each compaction starts a new one,
so the thread writing the snapshot never shares a file with the appends.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from jobstores.durable import fsync_dir, remove_stale_temp_files
from jobstores.format import (
    CHUNK,
    Document,
    encode_journal_line,
)
from jobstores.loading import JOURNAL_PREFIX, JournalRead
from jobstores.pacing import PAUSE, pause
from jobstores.snapshot_write import SnapshotWriter
from jobstores.storage import DirectoryStore
from jobstores.table import StateImage

__all__ = ["MAX_AGE", "MIN_BYTES", "PAUSE", "JournalStorage"]

logger = logging.getLogger(__name__)

MIN_BYTES = 1 << 20
"""Fold the journal into the snapshot once it holds this many bytes, or the snapshot's
size if larger (so the writes a compaction costs stay proportional to the changes)."""
MAX_AGE = 600.0
"""... or once its oldest line not in the snapshot is this many seconds old: the most the file
a person reads lags behind the journal (plus the time to write it)."""
COMPACTION_POLL = 1.0
"""While a compaction is being written, the saver asks again this often whether another is due."""

_FILE_MODE = 0o600


def _sync(fd: int) -> None:
    # Data and the file's size, not its times: what an appended line needs to be read back.
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


class JournalStorage(DirectoryStore):
    """The state as ``dispatch_config.json`` plus a journal of the changes made since: the
    default :class:`~jobstores.state.StateStore`.

    ``max_bytes`` / ``max_age`` override :data:`MIN_BYTES` / :data:`MAX_AGE`; ``clock`` is a
    monotonic clock in seconds (for the age threshold).
    """

    def __init__(
        self,
        directory: Path,
        *,
        timezone_key: str | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(directory, timezone_key=timezone_key)
        self._max_bytes = max_bytes
        self._max_age = MAX_AGE if max_age is None else max_age
        self._clock = clock
        self._lock = threading.Lock()  # a leaf lock: guards the fields below
        self._segments: list[tuple[int, Path]] = []
        self._fd: int | None = None
        self._size = 0
        self._next_seq = 1
        self._folded_seq = 0
        """The last line the snapshot on disk holds."""
        self._covered_seq = 0
        """The last line the snapshot on disk, or one queued or being written, holds."""
        self._unfolded_bytes = 0
        self._unfolded_since: float | None = None
        self._snapshot_bytes = 0
        self._no_snapshot = True
        self._broken = False
        """An append failed and could not be undone: the next commit writes a snapshot."""
        self._retry_at: float | None = None
        self._queued: tuple[StateImage, datetime, int] | None = None
        self._compactor: threading.Thread | None = None
        self._writer = SnapshotWriter(self.path, self.backup_path)
        self.compactions = 0
        """Snapshots written (for tests and the curious)."""
        self.last_compaction_error: str | None = None

    # ------------------------------------------------------------------ loading

    def _loaded(self, document: Document | None, journal: JournalRead) -> None:
        """Take up the journal a load read: its segments, where its lines go on."""
        with self._lock:
            self._segments = list(journal.segments)
            self._next_seq = journal.next_seq
            self._folded_seq = document.journal_seq if document is not None else 0
            self._unfolded_bytes = journal.bytes
            self._unfolded_since = self._clock() if journal.lines else None
            try:
                self._snapshot_bytes = self.path.stat().st_size
                self._no_snapshot = False
            except FileNotFoundError:
                self._no_snapshot = True

    # ------------------------------------------------------------------ committing

    def wants_full_image(self, *, closing: bool = False) -> bool:
        """Whether the next commit should carry the whole state: a snapshot is due."""
        with self._lock:
            if closing:
                return self._next_seq - 1 > max(self._folded_seq, self._covered_seq)
            if self._broken:
                return True
            if self._compactor is not None:
                return False
            if self._retry_at is not None:
                return self._clock() >= self._retry_at
            if self._no_snapshot:
                return True
            limit = self._max_bytes or max(MIN_BYTES, self._snapshot_bytes)
            if self._unfolded_since is None:
                return False
            if self._unfolded_bytes >= limit:
                return True
            since = self._unfolded_since
            return since is not None and self._clock() - since >= self._max_age

    def fold_due_in(self) -> float | None:
        """Seconds until the journal's oldest line not in the snapshot is :data:`MAX_AGE`
        old (or a failed compaction may be tried again); None when the snapshot holds every
        line."""
        with self._lock:
            due = self._retry_at
            if due is None and self._unfolded_since is not None:
                due = self._unfolded_since + self._max_age
            wait = None if due is None else max(0.0, due - self._clock())
            if self._compactor is not None:
                # Ask again once it is done: it may fail, and lines appended meanwhile wait.
                return COMPACTION_POLL if wait is None else max(wait, COMPACTION_POLL)
            return wait

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Append ``image``'s changes to the journal durably; with a full image, have the
        snapshot written in the background (at once when there is none yet, or after an
        append failed)."""
        if self._broken or (image.full and (self._no_snapshot or image.requested)):
            # The snapshot is written here and now, in place of journal lines, when the owner
            # asks for it (at every commit of a small store, at stop, after a load that
            # repaired something), in a new directory (so the file a person looks for is
            # there from the first change) and after an append that could not be undone.
            if not image.full:
                raise OSError("the journal needs a snapshot first; the next commit writes one")
            self._wait_compaction()
            with self._lock:
                seq = self._next_seq - 1
            self._write_snapshot(image, saved_at, seq, now=True)
            with self._lock:
                self._broken = False
                self._folded_seq = seq
                self._unfolded_bytes = 0
                self._unfolded_since = None
                self._retry_at = None
                self._close_segment()
            self._drop_segments(seq)
            return
        count = len(image.changes) + len(image.orders) + len(image.moves)
        with self._lock:
            if count:
                self._append(self._lines(image, self._next_seq, count), count)
            if image.full:
                self._queue(image, saved_at, self._next_seq - 1)

    def _lines(self, image: StateImage, seq: int, count: int) -> Iterator[bytes]:
        """The ``count`` lines of ``image``'s changes, from line number ``seq``, encoded one
        at a time: only bytes outlive a line (no task object survives to tax the collector)."""
        changes: Iterator[tuple[str, Any]] = (
            ("remove", task_id) if record is None else ("put", record.plain())
            for task_id, record in image.changes
        )
        orders = (
            ("order", {"account": account, "tasks": ids}) for account, ids in image.orders.items()
        )
        moves = (
            ("move", {"account": account, "task": task_id, "before": following})
            for account, task_id, following in image.moves
        )
        last = seq + count - 1
        for number, (kind, value) in enumerate(itertools.chain(changes, orders, moves), seq):
            yield encode_journal_line(number, kind, value, commit=number == last)

    def _open_segment(self) -> int:
        if self._fd is None:
            number = self._next_seq
            path = self.directory / f"{JOURNAL_PREFIX}{number:012d}"
            # A segment of this number can only hold lines that were never acknowledged.
            self._fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, _FILE_MODE
            )
            self._size = 0
            try:
                fsync_dir(self.directory)
            except OSError:
                self._close_segment()
                raise
            self._segments = [s for s in self._segments if s[0] != number]
            self._segments.append((number, path))
        return self._fd

    def _close_segment(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _append(self, lines: Iterator[bytes], count: int) -> None:
        """Write ``count`` lines and sync them, a chunk at a time (no single copy of a large
        commit is made, so this thread never holds the interpreter for long)."""
        fd = self._open_segment()
        start = self._size
        written = 0
        try:
            while chunk := b"".join(itertools.islice(lines, CHUNK)):
                if written:
                    pause()  # a large commit: let the event loop have its turn
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
            _sync(fd)
        except BaseException:
            # Leave no partial commit behind: a later line written after it would look
            # like damage in the middle of the journal.
            try:
                os.ftruncate(fd, start)
                _sync(fd)
            except OSError:
                self._broken = True
                self._next_seq += count  # never reuse what may be on disk
                self._close_segment()
            raise
        self._size += written
        self._next_seq += count
        self._unfolded_bytes += written
        if self._unfolded_since is None:
            self._unfolded_since = self._clock()

    # ------------------------------------------------------------------ compaction

    def _queue(self, image: StateImage, saved_at: datetime, seq: int) -> None:
        """Have the snapshot of ``image`` (which holds every line up to ``seq``) written."""
        self._writer.forget_lines()  # the store is large: commits append lines again
        if self._size:
            self._close_segment()  # the appends go on in a new segment
        self._queued = (image, saved_at, seq)
        self._covered_seq = max(self._covered_seq, seq)
        self._unfolded_bytes = 0
        self._unfolded_since = None
        self._retry_at = None
        if self._compactor is None:
            self._compactor = threading.Thread(
                target=self._compact, name="dispatch-compact", daemon=True
            )
            self._compactor.start()

    def _compact(self) -> None:
        while True:
            with self._lock:
                job, self._queued = self._queued, None
                if job is None:
                    self._compactor = None
                    return
            image, saved_at, seq = job
            try:
                self._write_snapshot(image, saved_at, seq)
            except (OSError, TypeError, ValueError) as exc:
                self.last_compaction_error = f"{type(exc).__name__}: {exc}"
                logger.error(
                    "writing %s from the journal failed (%s); the journal keeps every change "
                    "and the snapshot is tried again later",
                    self.path,
                    self.last_compaction_error,
                )
                with self._lock:
                    self._retry_at = self._clock() + 5.0
                    self._covered_seq = self._folded_seq
                continue
            with self._lock:
                self._folded_seq = max(self._folded_seq, seq)
                self.last_compaction_error = None
            self._drop_segments(seq)

    def _write_snapshot(
        self, image: StateImage, saved_at: datetime, seq: int, *, now: bool = False
    ) -> None:
        """Write the snapshot of ``image``; ``now``: at a commit, on the saving thread (the
        lines of unchanged tasks are reused from the last such snapshot)."""
        size = self._writer.write(image, saved_at, seq, self.timezone_key, now=now)
        with self._lock:
            self._snapshot_bytes = size
            self._no_snapshot = False
            self.compactions += 1

    def _drop_segments(self, seq: int) -> None:
        """Delete the segments every line of which the snapshot holds (lines up to ``seq``)."""
        with self._lock:
            active = self._next_seq if self._fd is None else self._segments[-1][0]
            covered = [s for s in self._segments if s[0] <= seq and s[0] != active]
            self._segments = [s for s in self._segments if s not in covered]
        for _, path in covered:
            with contextlib.suppress(OSError):
                path.unlink()
        if covered:
            with contextlib.suppress(OSError):
                fsync_dir(self.directory)

    def _wait_compaction(self) -> None:
        compactor = self._compactor
        if compactor is not None:
            compactor.join()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Wait for the snapshot being written, then leave no temporary file behind."""
        self._wait_compaction()
        with self._lock:
            self._close_segment()
        remove_stale_temp_files(self.path)
        remove_stale_temp_files(self.backup_path)
