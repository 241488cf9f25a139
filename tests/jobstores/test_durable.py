"""The save protocol: atomic replace, backup, quarantine, and faults injected at each step."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import SHANGHAI, T0, Recorder, read_state, record, store_options

from jobstores import JsonJobStore
from jobstores.durable import DirectoryLock, set_aside, write_atomic
from scheduler.errors import DirectoryLockedError


def test_write_atomic_replaces_and_keeps_a_backup(tmp_path: Path) -> None:
    target, backup = tmp_path / "state.json", tmp_path / "state.json.bak"
    write_atomic(target, b"one", backup=backup)
    assert target.read_bytes() == b"one"
    assert not backup.exists()
    write_atomic(target, b"two", backup=backup)
    assert target.read_bytes() == b"two"
    assert backup.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.bak"]


def _fail_once(name: str, error: int) -> Callable[..., Any]:
    real = getattr(os, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if not failing.done:  # type: ignore[attr-defined]
            failing.done = True  # type: ignore[attr-defined]
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    failing.done = False  # type: ignore[attr-defined]
    return failing


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("write", errno.ENOSPC),
        ("write", errno.EIO),
        ("fsync", errno.EIO),
        ("link", errno.EPERM),
        ("replace", errno.EACCES),
    ],
)
def test_a_fault_at_any_step_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, error: int
) -> None:
    target, backup = tmp_path / "state.json", tmp_path / "state.json.bak"
    write_atomic(target, b"old", backup=backup)
    write_atomic(target, b"current", backup=backup)
    monkeypatch.setattr(os, name, _fail_once(name, error))
    with pytest.raises(OSError, match=os.strerror(error)):
        write_atomic(target, b"new", backup=backup)
    assert target.read_bytes() == b"current"
    assert backup.read_bytes() in (b"old", b"current")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.bak"]


def test_set_aside_never_overwrites(tmp_path: Path) -> None:
    first = tmp_path / "f.json"
    first.write_bytes(b"1")
    one = set_aside(first, "test")
    first.write_bytes(b"2")
    two = set_aside(first, "test")
    assert one != two
    assert {one.read_bytes(), two.read_bytes()} == {b"1", b"2"}


def test_directory_lock(tmp_path: Path) -> None:
    first, second = DirectoryLock(tmp_path), DirectoryLock(tmp_path)
    first.acquire()
    assert second.is_taken()
    with pytest.raises(DirectoryLockedError):
        second.acquire()
    first.release()
    assert not second.is_taken()
    second.acquire()
    second.release()


@pytest.fixture
def store(tmp_path: Path, recorder: Recorder) -> JsonJobStore:
    return JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0)


@pytest.mark.parametrize(
    ("backend", "name", "error"),
    [
        ("snapshot", "write", errno.ENOSPC),
        ("snapshot", "fsync", errno.EIO),
        ("snapshot", "replace", errno.EACCES),
        ("journal", "write", errno.ENOSPC),
        ("journal", "fdatasync", errno.EIO),
        ("journal-small", "fsync", errno.EIO),
    ],
)
def test_a_failed_save_is_logged_reported_and_carried_by_the_next(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    backend: str,
    name: str,
    error: int,
) -> None:
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=T0, **store_options(backend, tmp_path))
    store.add_tasks([record("a")])
    assert store.save()
    before = (tmp_path / "dispatch_config.json").read_bytes()
    monkeypatch.setattr(os, name, _fail_once(name, error))
    store.add_tasks([record("b")])
    with caplog.at_level(logging.ERROR):
        assert not store.save()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "b" in failures[0].getMessage()
    assert (tmp_path / "dispatch_config.json").read_bytes() == before
    health = store.save_health
    assert not health.ok
    assert os.strerror(error) in (health.last_error or "")
    assert health.failed_saves == 1
    assert health.unsaved_task_ids == ("b",)

    store.update_task("a", lambda r: r.replace(run_count=5))
    assert store.save()
    saved = {t["task_id"]: t for t in read_state(tmp_path)["tasks"]}
    assert set(saved) == {"a", "b"}
    assert saved["a"]["run_count"] == 5
    assert store.save_health.ok
    assert store.save_health.last_saved_at is not None
    store.close()


def test_a_read_only_directory_fails_saves_until_writable(
    store: JsonJobStore, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        # root ignores directory permissions; simulate with a failing open.
        real_open = os.open

        def deny(path: Any, flags: int, *args: Any) -> int:
            if str(path).endswith(".tmp"):
                raise PermissionError(errno.EACCES, "Read-only directory")
            return real_open(path, flags, *args)

        patch = pytest.MonkeyPatch()
        patch.setattr(os, "open", deny)
    else:
        tmp_path.chmod(0o500)
    store.add_tasks([record("a")])
    assert not store.save()
    if os.geteuid() == 0:
        patch.undo()
    else:
        tmp_path.chmod(0o700)
    assert store.save()
    assert [t["task_id"] for t in read_state(tmp_path)["tasks"]] == ["a"]
    store.close()
