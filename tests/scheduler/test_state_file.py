"""What the seed's host reads: ``dispatch_config.json`` itself, with ``json.load``, right after
each call that changes a task (below the snapshot threshold), and within the documented lag
above it."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Recorder, at, read_state

from jobstores import journal
from scheduler import TaskDispatcher

MakeDispatcher = Callable[..., TaskDispatcher]


def the_file(state_dir: Path) -> dict[str, Any]:
    """The state file alone, read as the seed's host reads it."""
    with (state_dir / "dispatch_config.json").open(encoding="utf-8") as file:
        data: dict[str, Any] = json.load(file)
    return data


def saved(state_dir: Path, task_id: str) -> dict[str, Any] | None:
    """``task_id``'s object in the state file alone (None: not there)."""
    return next((t for t in the_file(state_dir)["tasks"] if t["task_id"] == task_id), None)


async def add(dispatcher: TaskDispatcher, account: str, **options: Any) -> str:
    options.setdefault("interval", 3600)
    options.setdefault("valid_time_range", [8, 22])
    return await dispatcher.add_task(
        sys_type="mac_intel", task_type="xhs_type", xhs_account_id=account, **options
    )


async def test_the_file_holds_each_change_when_the_call_returns(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    dispatcher = make_dispatcher()
    ending = await add(dispatcher, "account_1", task_end_time=datetime.date(2026, 1, 8))
    assert saved(state_dir, ending) is not None
    other = await add(dispatcher, "account_1")
    failing = await add(dispatcher, "account_2")
    recorder.fail.add(failing)
    await dispatcher.start()

    dispatcher.pause_task(other)
    assert saved(state_dir, other)["status"] == "paused"  # type: ignore[index]
    dispatcher.resume_task(other)
    assert saved(state_dir, other)["status"] == "pending"  # type: ignore[index]
    dispatcher.reorder_task(other, 0)
    assert the_file(state_dir)["account_tasks"]["account_1"] == [other, ending]
    dispatcher.update_task(other, interval=7200)
    assert saved(state_dir, other)["interval"] == 7200  # type: ignore[index]

    clock.move_to(at(2026, 1, 8, 8, 0))
    await dispatcher.run_pending()  # a run finishing, a run raising
    ran = saved(state_dir, ending)
    assert ran is not None
    assert (ran["run_count"], ran["last_execution_time"]) == (1, "2026-01-08T08:00:00+08:00")
    raised = saved(state_dir, failing)
    assert raised is not None
    assert (raised["status"], raised["last_error"]) == ("error", f"ValueError: boom in {failing}")

    clock.move_to(at(2026, 1, 8, 21, 0))
    await dispatcher.run_pending()  # the last run before the end date: completed
    assert saved(state_dir, ending)["status"] == "completed"  # type: ignore[index]

    dispatcher.remove_task(failing)
    assert saved(state_dir, failing) is None
    assert the_file(state_dir)["account_tasks"] == {"account_1": [other, ending]}
    assert not list(state_dir.glob("dispatch_config.journal-*"))
    await dispatcher.stop()


async def test_above_the_threshold_the_file_follows_within_the_documented_lag(
    make_dispatcher: MakeDispatcher, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "MAX_AGE", 0.5)  # ten minutes by default
    dispatcher = make_dispatcher(snapshot_below=2)
    first = await add(dispatcher, "account_1")
    second = await add(dispatcher, "account_1")  # two tasks: the journal takes the changes
    await dispatcher.start()
    dispatcher.pause_task(first)
    # Readers that fold the journal in see the change at once; the file alone, not yet ...
    assert next(t for t in read_state(state_dir)["tasks"] if t["task_id"] == first)["status"] == (
        "paused"
    )
    assert saved(state_dir, second) is None
    assert saved(state_dir, first)["status"] == "pending"  # type: ignore[index]

    async def followed() -> None:
        # ... but within MAX_AGE, with no further change.
        while (saved(state_dir, first) or {}).get("status") != "paused":  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(followed(), 10)
    await dispatcher.stop()
