"""A bounded soak in real time: hundreds of 1-second tasks, nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
from helpers import read_state

from scheduler import TaskDispatcher

TASKS = 300
ACCOUNTS = 10
SECONDS = 20


class Counting:
    runs: ClassVar[Counter[str]] = Counter()
    active: ClassVar[Counter[str]] = Counter()
    max_active: ClassVar[Counter[str]] = Counter()

    def __init__(self, **kwargs: Any) -> None:
        self.task_id = kwargs["task_id"]
        self.account = kwargs["account_id"]

    async def run(self) -> None:
        cls = Counting
        cls.active[self.account] += 1
        cls.max_active[self.account] = max(cls.max_active[self.account], cls.active[self.account])
        await asyncio.sleep(0)
        cls.runs[self.task_id] += 1
        cls.active[self.account] -= 1


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_soak_hundreds_of_one_second_tasks(tmp_path: Path) -> None:
    dispatcher = TaskDispatcher(
        tmp_path, task_manager_factory=Counting, timezone="UTC", max_concurrent_runs=20
    )
    await dispatcher.add_tasks(
        {"sys_type": "s", "task_type": "t", "account_id": f"acc{n % ACCOUNTS}", "interval": 1}
        for n in range(TASKS)
    )
    firsts = {r.task_id: r.next_execution_time for r in dispatcher.list_tasks()}
    tracemalloc.start()
    await dispatcher.start()
    started = time.time()
    await asyncio.sleep(5)  # warm-up: the time passing is what is being tested
    runs_at_warmup = sum(Counting.runs.values())
    memory_at_warmup = tracemalloc.get_traced_memory()[0]
    await asyncio.sleep(SECONDS - 5)
    memory_at_end = tracemalloc.get_traced_memory()[0]
    runs_at_end = sum(Counting.runs.values())
    tracemalloc.stop()
    await dispatcher.stop()
    stopped = time.time()

    # Per-account serialisation held throughout.
    assert set(Counting.max_active.values()) == {1}
    # No run lost or duplicated: each task ran once per elapsed second since its first run.
    records = {r.task_id: r for r in dispatcher.list_tasks()}
    for task_id, first in firsts.items():
        assert first is not None
        due = int(stopped - first.timestamp()) + 1
        assert due - 2 <= Counting.runs[task_id] <= due, (task_id, Counting.runs[task_id], due)
        assert records[task_id].run_count == Counting.runs[task_id]
    saved = {t["task_id"]: t["run_count"] for t in read_state(tmp_path)["tasks"]}
    assert saved == dict(Counting.runs)
    # Memory does not grow with the number of runs.
    more_runs = runs_at_end - runs_at_warmup
    growth = memory_at_end - memory_at_warmup
    print(
        f"soak: {runs_at_end} runs in {stopped - started:.1f}s, {more_runs} after warm-up; "
        f"traced memory {memory_at_warmup / 1e6:.1f} MB -> {memory_at_end / 1e6:.1f} MB"
    )
    assert more_runs > TASKS * (SECONDS - 7)
    assert growth < 2_000_000
