"""``WorkerRoster``: the fleet's live workers by sys_type, and the runs waiting for them.

Workers register under ``td:worker:<name>`` with the sys_types they serve. The roster reads
them every few seconds, tells which sys_types have runs waiting and which workers serve them
(the health report, and why a run expired), and logs a sys_type whose runs wait with no worker
registered (once), and when one is registered again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from scheduler.fleet.openruns import OpenRun
from scheduler.fleet.wire import WORKER_PREFIX, queue_name

__all__ = ["WorkerRoster"]

logger = logging.getLogger("scheduler.backends.celery")  # the backend's log, as it always was

_WORKERS_EVERY = 5.0
"""Seconds between reads of the workers' registrations."""


class WorkerRoster:
    """The workers registered (name -> sys_types) and the runs each sys_type has waiting."""

    def __init__(self, runs: dict[str, OpenRun], start_timeout: float | None) -> None:
        self._runs = runs
        self._start_timeout = start_timeout
        self.workers: dict[str, list[str]] = {}
        self._read_at = 0.0
        self._unserved: set[str] = set()
        """Sys_types with runs waiting and no worker registered (logged once each)."""

    def due(self) -> bool:
        """Whether the registrations are due to be read again."""
        return time.monotonic() - self._read_at >= _WORKERS_EVERY

    def serving(self, sys_type: str) -> list[str]:
        """The workers registered for ``sys_type``, by name."""
        return sorted(name for name, types in self.workers.items() if sys_type in types)

    async def refresh(self, client: aioredis.Redis) -> None:
        """Read the registrations again; log the sys_types left without a worker (or no
        longer)."""
        self._read_at = time.monotonic()
        keys = [key async for key in client.scan_iter(match=WORKER_PREFIX + "*", count=200)]
        workers: dict[str, list[str]] = {}
        if keys:
            for raw in await client.mget(keys):
                if raw is None:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    info = json.loads(raw)
                    workers[str(info["worker"])] = [str(s) for s in info["sys_types"]]
        self.workers = workers
        waiting = self.waiting()
        unserved = {sys_type for sys_type, entry in waiting.items() if not entry["workers"]}
        for sys_type in sorted(unserved - self._unserved):
            logger.warning(
                "%d run(s) of sys_type %r wait in queue %s: no worker for it is registered "
                "(start one: task-dispatcher worker --sys-type %s)%s",
                waiting[sys_type]["runs"],
                sys_type,
                queue_name(sys_type),
                sys_type,
                ""
                if self._start_timeout is None
                else f"; they expire {self._start_timeout:g}s after they were sent",
            )
        for sys_type in sorted(self._unserved - unserved):
            logger.info("sys_type %r: a worker is registered again", sys_type)
        self._unserved = unserved

    def waiting(self) -> dict[str, dict[str, Any]]:
        """Sys_type -> the runs no worker has taken yet and the workers registered for it."""
        waiting: dict[str, dict[str, Any]] = {}
        for run in self._runs.values():
            if run.state == "queued" and not run.verdict:
                sys_type = run.request.sys_type
                entry = waiting.setdefault(sys_type, {"runs": 0, "workers": []})
                entry["runs"] += 1
        for worker, sys_types in self.workers.items():
            for sys_type in sys_types:
                if sys_type in waiting:
                    waiting[sys_type]["workers"].append(worker)
        return waiting
