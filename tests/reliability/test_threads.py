"""Host applications call the API from web-request threads while runs happen."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

from helpers import read_state

from scheduler import TaskDispatcher, TaskNotFoundError


class Quick:
    runs = 0

    def __init__(self, **kwargs: Any) -> None:
        pass

    async def run(self) -> None:
        Quick.runs += 1


async def test_hammering_the_api_from_threads_keeps_file_and_memory_in_step(tmp_path: Path) -> None:
    dispatcher = TaskDispatcher(tmp_path, task_manager_factory=Quick, timezone="UTC")
    ids = [
        await dispatcher.add_task(sys_type="s", task_type="t", account_id=f"acc{n % 4}", interval=1)
        for n in range(20)
    ]
    await dispatcher.start()
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []
    added: list[str] = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                task_id = rng.choice(ids + added)
                action = rng.choice(["pause", "resume", "reorder", "remove", "add", "get"])
                try:
                    if action == "reorder":
                        record = dispatcher.get_task(task_id)
                        dispatcher.reorder_task(
                            task_id, rng.randrange(len(dispatcher.account_tasks[record.account_id]))
                        )
                    elif action == "add":
                        future = asyncio.run_coroutine_threadsafe(
                            dispatcher.add_task(
                                sys_type="s", task_type="t", account_id="acc9", interval=1
                            ),
                            loop,
                        )
                        added.append(future.result(10))
                    elif action == "get":
                        dispatcher.get_task(task_id)
                        dispatcher.list_tasks()
                    else:
                        getattr(dispatcher, f"{action}_task")(task_id)
                except (TaskNotFoundError, ValueError):
                    pass  # removed by another thread meanwhile, or reordered past the end
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    await asyncio.gather(*(asyncio.to_thread(thread.join, 60) for thread in threads))
    assert errors == []
    await dispatcher.stop()
    memory = {record.task_id: record for record in dispatcher.list_tasks()}
    order = dispatcher.account_tasks
    assert Quick.runs > 0

    saved = read_state(tmp_path)
    assert {task["task_id"] for task in saved["tasks"]} == set(memory)
    assert saved["account_tasks"] == order
    for task in saved["tasks"]:
        assert task["status"] == memory[task["task_id"]].status.value
        assert task["run_count"] == memory[task["task_id"]].run_count
    again = TaskDispatcher(tmp_path, task_manager_factory=Quick, timezone="UTC")
    try:
        assert {r.task_id: r for r in again.list_tasks()} == memory
    finally:
        again.close()
