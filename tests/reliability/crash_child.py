"""Drives a TaskDispatcher through random operations until it is killed.

Run as ``python crash_child.py DIR SEED [MODE [SNAPSHOT_BELOW]]``. MODE: ``journal`` (the
journal takes every change: a store above its snapshot threshold), ``compact`` (the journal
folded into the snapshot at almost every commit, so kills land during compactions),
``current`` (the default: a small store, whose every commit writes the file), ``threshold``
(a threshold of a few tasks, which the store keeps crossing both ways) or ``snapshot`` (the
whole-file backend); SNAPSHOT_BELOW is the dispatcher's option (none: the default). Before
each call it prints ``{"intent": ...}`` and, once the call has returned, ``{"ack": ...}``
(one JSON object per line, flushed), so the parent knows which operations were acknowledged
when it sends SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

from scheduler import TaskDispatcher, TaskNotFoundError

ACCOUNTS = ["a", "b", "c"]


class CrashManager:
    """Completes or raises, as its kwargs say."""

    def __init__(self, **kwargs: Any) -> None:
        self.fail = bool(kwargs.get("fail"))

    async def run(self) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("planned failure")


def say(kind: str, op: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({kind: op}) + "\n")
    sys.stdout.flush()


def use_mode(mode: str) -> None:
    import jobstores.journal
    import jobstores.storage
    import jobstores.stores

    if mode == "compact":
        jobstores.journal.MIN_BYTES = 1
        jobstores.journal.MAX_AGE = 0.0
    elif mode == "snapshot":
        jobstores.stores.JournalStorage = jobstores.storage.SnapshotStorage  # type: ignore[attr-defined, assignment]


async def main(directory: str, seed: int, mode: str, options: dict[str, Any]) -> None:
    rng = random.Random(seed)
    dispatcher = TaskDispatcher(
        directory, task_manager_factory=CrashManager, timezone="UTC", **options
    )
    await dispatcher.start()
    say("ack", {"op": "started"})
    counter = 0
    op: dict[str, Any]
    while True:
        ids = [record.task_id for record in dispatcher.list_tasks()]
        choices = ["add", "add", "pause", "resume", "reorder", "remove"]
        if mode == "threshold" and len(ids) >= options["snapshot_below"]:  # back below it
            choices = ["add", "pause", "resume", "reorder", "remove", "remove", "remove"]
        choice = rng.choice(choices) if ids else "add"
        if choice == "add":
            counter += 1
            task_id = f"s{seed}-{counter}"
            op = {"op": "add", "task_id": task_id, "account": rng.choice(ACCOUNTS)}
            say("intent", op)
            await dispatcher.add_task(
                sys_type="test",
                task_type="crash",
                account_id=op["account"],
                task_id=task_id,
                interval=rng.choice([1, 2, 3]),  # the shortest allowed: runs stay frequent
                fail=rng.random() < 0.3,
            )
        else:
            task_id = rng.choice(ids)
            op = {"op": choice, "task_id": task_id}
            if choice == "reorder":
                account = dispatcher.get_task(task_id).account_id
                op["position"] = rng.randrange(len(dispatcher.account_tasks[account]))
            say("intent", op)
            try:
                if choice == "reorder":
                    dispatcher.reorder_task(task_id, op["position"])
                else:
                    getattr(dispatcher, f"{choice}_task")(task_id)
            except TaskNotFoundError:  # pragma: no cover - ids come from the live list
                continue
        say("ack", op)
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01]))


if __name__ == "__main__":
    mode = sys.argv[3] if len(sys.argv) > 3 else "journal"
    below = sys.argv[4] if len(sys.argv) > 4 else ""
    use_mode(mode)
    asyncio.run(
        main(sys.argv[1], int(sys.argv[2]), mode, {"snapshot_below": int(below)} if below else {})
    )
