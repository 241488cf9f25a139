"""A task manager for fleet tests, loaded by real worker processes (``--factory``).

Each run appends ``{"task_id", "account_id", "worker", "phase", "at"}`` lines (phase ``start``
then ``end``) to the file named by its ``probe_log`` kwarg, sleeps ``seconds`` and fails if
``fail`` is true. The worker's name comes from ``$TD_TEST_WORKER``.
"""

from __future__ import annotations

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
        **kwargs: Any,
    ) -> None:
        self.sys_type = sys_type
        self.task_id = task_id
        self.account_id = account_id
        self.log = probe_log
        self.seconds = float(seconds)
        self.fail = bool(fail)

    def _write(self, phase: str) -> None:
        line = {
            "task_id": self.task_id,
            "account_id": self.account_id,
            "sys_type": self.sys_type,
            "worker": os.environ.get("TD_TEST_WORKER", "?"),
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


def factory(**kwargs: Any) -> ProbeManager:
    """The worker's ``--factory fleet_probe:factory``."""
    return ProbeManager(**kwargs)


def read_probe(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines written so far."""
    try:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    except FileNotFoundError:
        return []
