"""Browser-test plumbing: a real ``run --listen`` process and the system's Chromium.

The browser tests need Debian's ``chromium`` at :data:`CHROMIUM` and the ``playwright``
package (the ``test`` extra). Without them the tests skip on a developer's machine and fail
when ``CI`` is set, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
"""Screenshots and figures the browser tests leave behind (gitignored)."""

DOC_PICTURES = {
    "overview": ROOT / "docs" / "dashboard.png",
    "timeline": ROOT / "docs" / "images" / "timeline.png",
    "task": ROOT / "docs" / "images" / "task.png",
}
"""The dashboard's pictures in the documentation (and the README), by page: the browser
tests take them afresh each time they run, so the pages show the dashboard as it is."""

ZONE = "Asia/Shanghai"
"""The dispatcher's zone in the browser tests."""

PAGE_LIMIT_VARS = ("TASK_DISPATCHER_OVERVIEW_LIMIT", "TASK_DISPATCHER_LANE_LIMIT")
"""How much one dashboard page shows: set for a test (through ``environ``), else defaults."""

_URL = re.compile(r"dashboard on (http://\S+?)/?\s*$")
_LOGIN = re.compile(r"log in to the dashboard .*: (http://\S+)\s*$")


def require_browser() -> None:
    """Skip (fail under CI) unless Playwright and the system Chromium are both there."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``task-dispatcher`` command on ``directory``; bounded."""
    return subprocess.run(
        [sys.executable, "-m", "scheduler", "--dir", str(directory), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Served:
    """``task-dispatcher run --listen 127.0.0.1:0`` in a subprocess; its log read on a thread.

    Without ``token`` the process draws one and prints a login URL (:attr:`login_url`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        token: str | None = None,
        extra: Iterable[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("TASK_DISPATCHER_TOKEN", *PAGE_LIMIT_VARS):
            env.pop(name, None)
        if token is not None:
            env["TASK_DISPATCHER_TOKEN"] = token
        env.update(environ or {})
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scheduler",
                "--dir",
                str(directory),
                # The zone seed() adds tasks in (run reads hour windows in the local zone).
                "--timezone",
                ZONE,
                "run",
                "--no-live",
                "--grace",
                "5",
                "--listen",
                "127.0.0.1:0",
                *extra,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.url = ""
        self.wait_for(lambda line: _URL.search(line) is not None, timeout=60)
        match = next(m for m in map(_URL.search, self.seen) if m)
        self.url = match.group(1)
        self.login_url: str | None = None
        """The URL `run` printed that logs a browser in (None when the token was given)."""
        if token is None:
            line = self.wait_for(lambda line: _LOGIN.search(line) is not None)
            login = _LOGIN.search(line)
            assert login is not None
            self.login_url = login.group(1)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        """The first log line (seen or to come) matching ``predicate``; bounded."""
        for line in self.seen:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.process.poll() is not None and self.lines.empty()):
                raise AssertionError("not in the log in time:\n" + "".join(self.seen))
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and check it did not crash."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        assert "Traceback" not in "".join(self.seen), "".join(self.seen)


def seed(
    directory: Path, tasks: Iterable[Mapping[str, Any]], *, paused: Iterable[str] = ()
) -> None:
    """Write tasks to ``directory``'s state file through the library (no dispatcher running),
    pausing those in ``paused``."""
    import asyncio

    from scheduler import TaskDispatcher

    async def add() -> None:
        dispatcher = TaskDispatcher(directory, timezone=ZONE)
        try:
            await dispatcher.add_tasks(tasks)
            for task_id in paused:
                dispatcher.pause_task(task_id)
        finally:
            dispatcher.close()

    # Playwright's synchronous API runs an event loop on this thread: add from another one.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(add())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "seeding the store took over two minutes"
    if errors:
        raise errors[0]
