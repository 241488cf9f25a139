"""A task manager for fleet tests, loaded by real worker processes (``--factory``).

Each run appends ``{"task_id", "account_id", "worker", "run_id", "scheduled_at", "phase",
"at"}`` lines (phase ``start`` then ``end``, or ``cancelled`` if the worker stopped it) to the
file named by its ``probe_log`` kwarg, sleeps ``seconds`` and fails if ``fail`` is true. The
worker's name comes from ``$TD_TEST_WORKER``; the run id and its planned time from the Celery
task executing it. With ``asynchronous`` the manager is a coroutine (``async def run``), which
a worker can cancel.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any


class ProbeManager:
    """Records its runs in a shared JSON-lines file."""

    def __init__(
        self,
        *,
        sys_type: str,
        task_id: str,
        probe_log: str,
        account_id: str = "",
        seconds: float = 0.0,
        fail: bool = False,
        run_id: str = "?",
        scheduled_at: str = "?",
        **kwargs: Any,
    ) -> None:
        self.sys_type = sys_type
        self.task_id = task_id
        self.account_id = account_id
        self.log = probe_log
        self.seconds = float(seconds)
        self.fail = bool(fail)
        self.run_id = run_id
        self.scheduled_at = scheduled_at

    def _write(self, phase: str) -> None:
        line = {
            "task_id": self.task_id,
            "account_id": self.account_id,
            "sys_type": self.sys_type,
            "worker": os.environ.get("TD_TEST_WORKER", "?"),
            "run_id": self.run_id,
            "scheduled_at": self.scheduled_at,
            "phase": phase,
            "at": time.time(),
        }
        with open(self.log, "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")
            file.flush()

    def run(self) -> None:
        """Sleep, then succeed or fail (a plain def: the worker runs it in a thread)."""
        self._write("start")
        time.sleep(self.seconds)
        self._write("end")
        if self.fail:
            raise RuntimeError(f"probe {self.task_id} failed on purpose")


class AsyncProbeManager(ProbeManager):
    """The same, as a coroutine: cancelling it stops it (the line then says ``cancelled``)."""

    async def run(self) -> None:  # type: ignore[override]
        """Sleep on the loop, then succeed or fail."""
        self._write("start")
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self._write("cancelled")
            raise
        self._write("end")
        if self.fail:
            raise RuntimeError(f"probe {self.task_id} failed on purpose")


def _current_run_id() -> str:
    """The id of the Celery task being executed in this thread (the run id), if any."""
    try:
        from celery import current_task
    except ImportError:
        return "?"
    request = getattr(current_task, "request", None)
    return str(getattr(request, "id", None) or "?")


def _current_scheduled_at() -> str:
    """The planned time of the run being executed in this thread (its message's request)."""
    try:
        from celery import current_task
    except ImportError:
        return "?"
    args = getattr(getattr(current_task, "request", None), "args", None) or [{}]
    try:
        return str(args[0]["request"]["scheduled_at"])
    except (KeyError, TypeError, IndexError):
        return "?"


def factory(**kwargs: Any) -> ProbeManager:
    """The worker's ``--factory fleet_probe:factory``."""
    kwargs.setdefault("run_id", _current_run_id())
    kwargs.setdefault("scheduled_at", _current_scheduled_at())
    if kwargs.pop("asynchronous", False):
        return AsyncProbeManager(**kwargs)
    return ProbeManager(**kwargs)


def read_probe(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines written so far."""
    try:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        return []
