"""Test helpers: a recording task manager factory, file readers, time shorthands."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from jobstores import loading
from jobstores.journal import JournalStorage
from jobstores.jsonfile import SNAPSHOT_BELOW
from jobstores.storage import SnapshotStorage, StorageBackend
from tasks import TaskRecord

SHANGHAI = ZoneInfo("Asia/Shanghai")
T0 = datetime(2026, 1, 8, 8, 0, tzinfo=SHANGHAI)


@dataclass
class Run:
    """One call of a recording manager's run()."""

    task_id: str
    at: datetime
    thread: int


@dataclass
class Recorder:
    """A task manager factory that records managers created and runs made.

    ``fail`` holds task ids whose runs raise; ``gates`` holds task ids whose runs wait on an
    asyncio.Event until the test sets it.
    """

    created: list[dict[str, Any]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    started: dict[str, asyncio.Event] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    max_active: dict[str, int] = field(default_factory=dict)
    max_total: int = 0

    def __call__(self, **kwargs: Any) -> RecordingManager:
        self.created.append(kwargs)
        return RecordingManager(self, kwargs)

    def run_ids(self) -> list[str]:
        return [run.task_id for run in self.runs]

    def count(self, task_id: str) -> int:
        return sum(run.task_id == task_id for run in self.runs)


class RecordingManager:
    """An async manager that reports to its Recorder."""

    def __init__(self, recorder: Recorder, kwargs: dict[str, Any]) -> None:
        self.recorder = recorder
        self.kwargs = kwargs
        self.task_id: str = kwargs["task_id"]
        self.account: str = kwargs.get("account_id") or kwargs.get("xhs_account_id") or "?"

    async def run(self) -> None:
        rec = self.recorder
        rec.runs.append(Run(self.task_id, datetime.now(SHANGHAI), threading.get_ident()))
        rec.active[self.account] = rec.active.get(self.account, 0) + 1
        rec.max_active[self.account] = max(
            rec.max_active.get(self.account, 0), rec.active[self.account]
        )
        rec.max_total = max(rec.max_total, sum(rec.active.values()))
        try:
            if self.task_id in rec.started:
                rec.started[self.task_id].set()
            if self.task_id in rec.gates:
                await rec.gates[self.task_id].wait()
            if self.task_id in rec.fail:
                raise ValueError(f"boom in {self.task_id}")
        finally:
            rec.active[self.account] -= 1


def read_state(directory: Path) -> dict[str, Any]:
    """The state of ``directory`` as a reader sees it (dispatch_config.json with the journal
    folded in), in the file's shape."""
    path = directory / "dispatch_config.json"
    data: dict[str, Any] = orjson.loads(path.read_bytes()) if path.exists() else {}
    document, _, _ = loading.read_state(directory, repair=False)
    if document is None:
        raise FileNotFoundError(path)
    data["tasks"] = document.tasks
    data["account_tasks"] = document.account_tasks
    return data


def read_file(directory: Path) -> dict[str, Any]:
    """The parsed dispatch_config.json of ``directory`` alone (no journal)."""
    data: dict[str, Any] = orjson.loads((directory / "dispatch_config.json").read_bytes())
    return data


def task_in_file(directory: Path, task_id: str) -> dict[str, Any]:
    """The saved record of ``task_id``."""
    for task in read_state(directory)["tasks"]:
        if task["task_id"] == task_id:
            return dict(task)
    raise AssertionError(f"{task_id} not in the file")


def at(*args: int, zone: ZoneInfo = SHANGHAI) -> datetime:
    """An aware datetime in ``zone`` (Asia/Shanghai by default)."""
    return datetime(*args, tzinfo=zone)  # type: ignore[misc, arg-type]


def record(
    task_id: str, *, account: str = "acc", at: datetime | None = T0, **changes: Any
) -> TaskRecord:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "account_id": account,
        "task_type": "xhs_type",
        "sys_type": "mac_intel",
        "interval": 3600,
        "valid_time_range": (8, 22),
        "next_execution_time": at,
        "created_at": T0,
        "updated_at": T0,
        "kwargs": {"task_id": task_id, "task_type": "xhs_type", "account_id": account},
    }
    fields.update(changes)
    return TaskRecord(**fields)


def has_compact_fields(made: TaskRecord) -> bool:
    """Whether ``made`` keeps its fields in a dict sharing its class's table of keys (CPython:
    a third of the size of a plain dict of the same fields)."""
    return sys.getsizeof(made.__dict__) * 2 < sys.getsizeof(dict(made.__dict__))


recording_factory = Recorder()
"""A module-level recorder, importable as ``--factory helpers:recording_factory``."""


def seed_task(task_id: str = "task_id_1", **changes: Any) -> dict[str, Any]:
    """A task as the seed's own application saves it (naive datetimes)."""
    task: dict[str, Any] = {
        "task_id": task_id,
        "account_id": "account_1",
        "account_name": "账号1",
        "task_type": "xhs_type",
        "status": "pending",
        "interval": 3600,
        "valid_time_range": [8, 22],
        "task_end_time": "2026-02-08",
        "last_execution_time": "2026-01-08T10:30:00",
        "next_execution_time": "2026-01-08T11:30:00",
        "created_at": "2026-01-08T00:00:00",
        "updated_at": "2026-01-08T10:30:00",
        "kwargs": {
            "task_type": "xhs_type",
            "xhs_account_id": "account_1",
            "xhs_account_name": "账号1",
            "user_query": "开始运营",
            "task_id": task_id,
        },
        "sys_type": "mac_intel",
    }
    task.update(changes)
    return task


def seed_file(tasks: list[Any], account_tasks: Any = None, version: Any = "1.0") -> bytes:
    """A dispatch_config.json as the seed's application writes it."""
    document = {
        "version": version,
        "saved_at": "2026-01-08T00:36:37.121980",
        "tasks": tasks,
        "account_tasks": account_tasks
        if account_tasks is not None
        else {"account_1": [t["task_id"] for t in tasks if isinstance(t, dict)]},
    }
    return json.dumps(document, ensure_ascii=False, indent=2).encode()


# ---------------------------------------------------------------------- processes

ROOT = Path(__file__).resolve().parents[1]
"""The repository (the working directory of the processes tests start)."""


def command(directory: Path, *args: str) -> list[str]:
    """``task-dispatcher --dir DIRECTORY ARGS...`` as a process argument list."""
    return [sys.executable, "-m", "scheduler", "--dir", str(directory), *args]


def cli(
    directory: Path,
    *args: str,
    env: dict[str, str] | None = None,
    file_size_limit: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one command to its end (bounded) and capture its output; with ``file_size_limit``
    the process cannot write more than that many bytes to a file (writes fail with EFBIG)."""

    def limit() -> None:
        if file_size_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        command(directory, *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=None if env is None else {**os.environ, **env},
        preexec_fn=limit,  # the child only sets a resource limit
    )


def add_shell_task(directory: Path, task_id: str, interval: str, command: str) -> None:
    """Add a shell task for account ``me`` through the command line."""
    added = cli(
        directory,
        "add",
        "--type",
        "shell",
        "--account",
        "me",
        "--interval",
        interval,
        "--id",
        task_id,
        "--kw",
        command,
    )
    assert added.returncode == 0, added.stderr


class Running:
    """A `run` process whose log lines are read on a thread; waits are bounded."""

    def __init__(self, directory: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            command(directory, "run", "--no-live", "--grace", "10", *args),
            cwd=ROOT,
            env=None if env is None else {**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # what `run` prints (a login URL) among its log lines
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out; log so far:\n" + "".join(self.seen))
            try:
                self.seen.append(self.lines.get(timeout=remaining))
            except queue.Empty:
                continue

    def caught_up(self) -> int:
        """Take every line read so far into :attr:`seen`; the count of lines seen then."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return len(self.seen)

    def wait_for_line(self, text: str, timeout: float = 30) -> str:
        """The first log line containing ``text`` (waiting for it, bounded)."""
        self.wait_for(lambda lines: any(text in line for line in lines), timeout)
        return next(line for line in self.seen if text in line)

    def finished_runs(self, lines: list[str]) -> int:
        return sum(" finished in " in line for line in lines)


BACKENDS = ("journal", "journal-small", "snapshot")
"""The storages every contract test runs over: the journal taking every change (the store
above its snapshot threshold), the journal of a store below it (every commit writes the
file), and the whole-file backend."""


def storage(kind: str, directory: Path) -> StorageBackend:
    """A fresh storage backend of ``kind`` on ``directory``."""
    return SnapshotStorage(directory) if kind == "snapshot" else JournalStorage(directory)


def store_options(kind: str, directory: Path) -> dict[str, Any]:
    """JsonJobStore's storage options for ``kind`` (see :data:`BACKENDS`)."""
    return {
        "storage": storage(kind, directory),
        "snapshot_below": 0 if kind == "journal" else SNAPSHOT_BELOW,
    }


async def add(dispatcher: Any, account: str = "account_1", **options: Any) -> str:
    """Add a seed-style task (``xhs_type`` on ``mac_intel``) for ``account``: hourly, 8-22."""
    options.setdefault("interval", 3600)
    options.setdefault("valid_time_range", [8, 22])
    task_id: str = await dispatcher.add_task(
        sys_type="mac_intel", task_type="xhs_type", xhs_account_id=account, **options
    )
    return task_id


def served(process: Running) -> str:
    """Wait until `run` serves its socket and TCP; the TCP URL."""
    process.wait_for_line("control API on unix socket")
    line = process.wait_for_line("control API on http://")
    match = re.search(r"http://[\d.]+:\d+", line)
    assert match is not None, line
    process.wait_for_line("running ")
    return match.group(0)
