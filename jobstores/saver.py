"""The saver: makes the task table's changes durable through a storage backend.

It owns durability bookkeeping: group commit (concurrent saves share one write), background
saves that coalesce, retry with backoff after a failure, the health a host watches, and when
the state file itself must be current: after every commit below ``snapshot_below`` tasks,
and within the storage's lag above it (a commit of the whole state is made when the storage
says one is due, even if nothing changed, while an event loop runs the saves).
Lock discipline (what keeps it free of deadlocks): the table's lock is taken only to capture
what to write, never while writing; the write lock is never taken while holding the table's
lock, because nothing saves synchronously under it (APScheduler's calls only *request* a
save, which runs on the save thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from jobstores.state import NotOwnerError
from jobstores.storage import StorageBackend
from jobstores.table import TaskTable

__all__ = ["SaveHealth", "Saver", "permanent"]

logger = logging.getLogger(__name__)

RETRY_FIRST = 1.0
"""Seconds before the first retry of a failed background save; doubles up to RETRY_LIMIT."""
RETRY_LIMIT = 60.0


@dataclass(frozen=True)
class SaveHealth:
    """How saving is going: what a host should watch."""

    last_saved_at: datetime | None = None
    """When the state was last written durably (None: not yet by this process)."""
    last_error: str | None = None
    """The error of the latest save, if it failed; None once a save succeeds."""
    last_error_at: datetime | None = None
    failed_saves: int = 0
    """Failed saves since the last successful one."""
    unsaved_task_ids: tuple[str, ...] = ()
    """Tasks whose latest change is not on disk yet."""
    permanent: bool = False
    """Whether the latest save failed for the data itself (the storage refuses it, see
    :func:`permanent`): no retry could mend that, so none is made; the next change (or save
    asked for) tries again."""

    @property
    def ok(self) -> bool:
        """Whether the latest save succeeded (or none has failed)."""
        return self.last_error is None


def permanent(exc: BaseException) -> bool:
    """Whether a failed commit is one no retry can mend: the data cannot be encoded
    (``TypeError``, ``ValueError``) or the storage refuses it (an ``OSError`` whose
    ``transient`` is False, such as a database's data error). A failing disk, a lock or a
    database out of reach is transient."""
    if isinstance(exc, TypeError | ValueError):
        return True
    return getattr(exc, "transient", True) is False


class Saver:
    """Writes the table through ``storage``; ``clock()`` gives the instant stamped on saves.

    Below ``snapshot_below`` tasks every commit writes the whole state file (see
    :attr:`~jobstores.table.StateImage.requested`).
    """

    def __init__(
        self,
        table: TaskTable,
        storage: StorageBackend,
        clock: Callable[[], datetime],
        *,
        snapshot_below: int = 0,
    ) -> None:
        self._table = table
        self._storage = storage
        self._clock = clock
        self._snapshot_below = snapshot_below
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()  # a leaf lock: guards the fields below only
        self._durable_version = 0
        self._health = SaveHealth()
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.Future[bool] | None = None
        self._background: asyncio.Task[None] | None = None
        self._wanted = False
        self._retry: asyncio.TimerHandle | None = None
        self._fold: asyncio.TimerHandle | None = None
        self._closed = False
        self.on_change: Callable[[str | None], None] | None = None
        """Told when saving starts failing (the error) and when it works again (None); called
        on the saving thread, holding no lock."""

    # ------------------------------------------------------------------ state

    @property
    def health(self) -> SaveHealth:
        """The state of saving, for the host to watch."""
        with self._state_lock:
            health = self._health
        unsaved = self._table.unsaved() if self._durable_version < self._table.version else ()
        return SaveHealth(
            last_saved_at=health.last_saved_at,
            last_error=health.last_error,
            last_error_at=health.last_error_at,
            failed_saves=health.failed_saves,
            unsaved_task_ids=unsaved,
            permanent=health.permanent,
        )

    @property
    def durable(self) -> bool:
        """Whether every change made so far is on disk."""
        return self._durable_version >= self._table.version

    # ------------------------------------------------------------------ saving

    def save(self, *, fold: bool = False) -> bool:
        """Write every change made so far; durable when it returns True.

        Never call it while holding the table's lock. A failed write is logged once with the
        task ids affected and recorded in :attr:`health`; the changes stay in the table for
        the next save. ``fold``: commit the whole state if the storage wants it, even with
        no change to write.
        """
        target = self._table.version
        with self._write_lock:
            full = self._storage.wants_full_image()
            if self._durable_version >= target and not (fold and full):
                with self._state_lock:
                    return self._health.ok
            image = self._table.capture(full=full, current_below=self._snapshot_below)
            now = self._clock()
            try:
                self._storage.commit(image, now)
            except (OSError, TypeError, ValueError) as exc:
                refused = permanent(exc)
                with self._state_lock:
                    first = self._health.last_error is None
                    self._health = SaveHealth(
                        last_saved_at=self._health.last_saved_at,
                        last_error=f"{type(exc).__name__}: {exc}",
                        last_error_at=now,
                        failed_saves=self._health.failed_saves + 1,
                        permanent=refused,
                    )
                # A store another instance took over refuses every commit: this instance
                # stands by (its store logged that once), which is no failing disk.
                logger.log(
                    logging.WARNING if isinstance(exc, NotOwnerError) else logging.ERROR,
                    "saving %s failed (%s: %s); changes to task(s) %s are kept in memory and "
                    + (
                        "are not retried: the store refuses the data (change or remove the "
                        "task to save again)"
                        if refused
                        else "will be written by the next successful save"
                    ),
                    self._storage.path,
                    type(exc).__name__,
                    exc,
                    ", ".join(sorted(image.changed)) or "-",
                    extra={"unsaved_task_ids": tuple(sorted(image.changed))},
                )
                if first:
                    self._changed(f"{type(exc).__name__}: {exc}")
                return False
            # Under the write lock: the next capture must find this one's changes durable.
            self._table.saved(image.version)
            with self._state_lock:
                self._durable_version = image.version
                recovered = self._health.last_error is not None
                self._health = SaveHealth(last_saved_at=now)
        if recovered:
            logger.warning(
                "saving %s works again; every pending change is written", self._storage.path
            )
            self._changed(None)
        self._plan_fold()
        return True

    def _plan_fold(self) -> None:
        """Have :meth:`_arm_fold` run on the event loop the saves run on, if any."""
        loop = self._loop
        if loop is not None and not self._closed and loop.is_running() and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._arm_fold)

    def _arm_fold(self) -> None:
        """On the loop: commit the whole state when the storage says it is due, so that the
        file follows the changes within a bounded time even if none follows them."""
        if self._closed or self._fold is not None or self._loop is None:
            return
        delay = self._storage.fold_due_in()
        if delay is None:
            return
        loop = self._loop

        def fold() -> None:
            self._fold = None
            if self._closed:
                return
            done = loop.run_in_executor(self._executor(), functools.partial(self.save, fold=True))
            done.add_done_callback(folded)

        def folded(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.exception() is None and done.result():
                self._arm_fold()  # written, or not due after all (the clock is read again)
            else:
                self._schedule_retry(loop)  # a successful retry arms the timer again

        # A little late rather than early: the storage reads its own clock when asked.
        self._fold = loop.call_later(delay + 0.01, fold)

    def _changed(self, error: str | None) -> None:
        if self.on_change is not None:
            try:
                self.on_change(error)
            except Exception:
                logger.exception("a save health observer failed")

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # One thread: saves run in order, off the event loop.
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dispatch-save")
        return self._pool

    async def save_async(self) -> bool:
        """Write every change made so far, off the event loop; durable when it returns True."""
        target = self._table.version
        loop = asyncio.get_running_loop()
        self._loop = loop
        while self._durable_version < target:
            pending = self._pending
            if pending is None or pending.done() or pending.get_loop() is not loop:
                pending = self._pending = loop.run_in_executor(self._executor(), self.save)
            if not await asyncio.shield(pending):
                self._schedule_retry(loop)
                return False
        return True

    def request(self) -> None:
        """Save soon without waiting and without writing here (safe under the table's lock).

        Requests coalesce: however many arrive while a save is being written, one more save
        follows it, covering them all. On the event loop's thread the save runs as a
        background task; from any other thread it is handed to the save thread.
        """
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            target = self._loop
            if target is not None and not target.is_closed() and target.is_running():
                target.call_soon_threadsafe(self.request)
            else:
                self._executor().submit(self.save)
            return
        self._loop = loop
        self._wanted = True
        if self._background is None or self._background.done():
            self._background = loop.create_task(self._save_in_background())

    async def _save_in_background(self) -> None:
        while self._wanted and not self._closed:
            self._wanted = False
            if not await self.save_async():
                return

    async def drain(self) -> None:
        """Wait for the background saves requested so far."""
        while self._background is not None and not self._background.done():
            await self._background

    def request_retry(self) -> None:
        """After a failed :meth:`save`: retry later, in the background, when on a running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._schedule_retry(loop)

    def _schedule_retry(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retry is not None or self._closed:
            return
        with self._state_lock:
            failures = self._health.failed_saves
            if self._health.permanent:
                return  # no retry can mend it: the next change tries again
        delay = min(RETRY_LIMIT, RETRY_FIRST * 2.0 ** min(failures - 1, 6))

        def retry() -> None:
            self._retry = None
            if not self._closed:
                self.request()

        self._retry = loop.call_later(delay, retry)

    def close(self) -> None:
        """Stop retrying and wait for the save thread to finish its queue."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._fold is not None:
            self._fold.cancel()
            self._fold = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
