"""How state reaches the disk: atomic replace, backup generation, quarantine, directory lock.

A save writes a temporary file in the same directory (owner-only), flushes and fsyncs it,
keeps the file it is about to replace as the backup generation (a hard link, so the backup
costs no second write), ``os.replace``-s it over the state file and fsyncs the directory. A
crash at any instant leaves the old or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import filelock

from tasks.errors import DirectoryLockedError

__all__ = [
    "DirectoryLock",
    "ensure_private_dir",
    "fsync_dir",
    "remove_stale_temp_files",
    "set_aside",
    "temp_prefix",
    "write_atomic",
]

logger = logging.getLogger(__name__)

_FILE_MODE = 0o600
_DIR_MODE = 0o700


def temp_prefix(path: Path) -> str:
    """The name prefix of ``path``'s temporary files (hidden, so tools skip them)."""
    return f".{path.name}."


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (owner-only) if it does not exist; an existing one is left as is."""
    if not directory.is_dir():
        directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Sequence[bytes], *, backup: Path | None = None) -> None:
    """Replace ``path`` with ``data`` (bytes, or parts written in order) durably; keep the
    replaced file as ``backup``.

    Raises ``OSError`` on failure, in which case ``path`` (and ``backup``) are unchanged
    and no temporary file is left behind.
    """
    directory = path.parent
    temp: Path | None = directory / f"{temp_prefix(path)}{os.getpid()}.tmp"
    backup_temp: Path | None = None
    try:
        assert temp is not None
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            for part in [data] if isinstance(data, bytes) else data:
                view = memoryview(part)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if backup is not None and path.exists():
            backup_temp = directory / f"{temp_prefix(backup)}{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                backup_temp.unlink()
            os.link(path, backup_temp)
            os.replace(backup_temp, backup)
            backup_temp = None
        os.replace(temp, path)
        temp = None
        fsync_dir(directory)
    finally:
        for leftover in (temp, backup_temp):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    leftover.unlink()


def set_aside(path: Path, reason: str) -> Path:
    """Rename an unusable file to ``<name>.corrupt-<UTC timestamp>`` so no save overwrites it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    os.replace(path, target)
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
    logger.error("set %s aside as %s: %s", path, target.name, reason)
    return target


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Delete temporary files that an interrupted save of ``path`` left behind.

    Only safe while holding the directory lock: then no save is in progress.
    """
    removed = []
    for candidate in path.parent.glob(f"{temp_prefix(path)}*.tmp"):
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


class DirectoryLock:
    """An OS-level lock that makes one process (one dispatcher) the owner of a directory.

    Taken without waiting; the OS releases it if the owner dies.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = filelock.FileLock(
            directory / ".dispatcher.lock", timeout=0, mode=_FILE_MODE, thread_local=False
        )

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return bool(self._lock.is_locked)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DirectoryLockedError` at once."""
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            raise DirectoryLockedError(self.directory) from None

    def release(self) -> None:
        """Give the lock up (a no-op if not held)."""
        if self._lock.is_locked:
            self._lock.release(force=True)

    def is_taken(self) -> bool:
        """Whether some owner holds the lock now (probes without keeping it)."""
        if self.held:
            return True
        try:
            self._lock.acquire(blocking=False)
        except filelock.Timeout:
            return True
        self._lock.release(force=True)
        return False
