"""Account lanes without a scheduler: priority order, serial per account, global limit."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.lanes import AccountLanes


async def test_waiting_runs_go_in_priority_order_not_arrival_order() -> None:
    priority = {"low": 2, "mid": 1, "high": 0}
    lanes = AccountLanes(10, priority.__getitem__)
    order: list[str] = []

    async def run(task_id: str) -> None:
        async with lanes.slot("acc", task_id):
            order.append(task_id)

    await asyncio.wait_for(asyncio.gather(run("low"), run("mid"), run("high")), 5)
    assert order == ["high", "mid", "low"]


async def test_priority_is_read_when_the_lane_frees() -> None:
    priority = {"holder": 0, "a": 1, "b": 2}
    version = [0]
    lanes = AccountLanes(10, priority.__getitem__, lambda: version[0])
    release = asyncio.Event()
    entered = asyncio.Event()
    order: list[str] = []

    async def hold() -> None:
        async with lanes.slot("acc", "holder"):
            entered.set()
            await release.wait()

    async def run(task_id: str) -> None:
        async with lanes.slot("acc", task_id):
            order.append(task_id)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 5)
    waiting = [asyncio.create_task(run("a")), asyncio.create_task(run("b"))]
    await asyncio.sleep(0)
    assert lanes.waiting("acc") == ["a", "b"]
    priority["b"] = -1  # a reorder while they wait
    version[0] += 1
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, *waiting), 5)
    assert order == ["b", "a"]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    lanes = AccountLanes(10, lambda task_id: 0)
    release = asyncio.Event()
    entered = asyncio.Event()
    ran: list[str] = []

    async def hold() -> None:
        async with lanes.slot("acc", "holder"):
            entered.set()
            await release.wait()

    async def run(task_id: str) -> None:
        async with lanes.slot("acc", task_id):
            ran.append(task_id)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 5)
    doomed = asyncio.create_task(run("doomed"))
    survivor = asyncio.create_task(run("survivor"))
    await asyncio.sleep(0)
    doomed.cancel()
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, survivor), 5)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert ran == ["survivor"]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_concurrent_runs"):
        AccountLanes(0, lambda task_id: 0)
