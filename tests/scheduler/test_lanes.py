"""Account lanes without a scheduler: priority order, serial per account, global limit."""

from __future__ import annotations

import asyncio
import functools

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


class Lane:
    """One account's lane with a holder inside it, and runs queued behind it."""

    def __init__(self, lanes: AccountLanes) -> None:
        self.lanes = lanes
        self.release = asyncio.Event()
        self.ran: list[str] = []
        self.holder: asyncio.Task[None] | None = None

    async def hold(self) -> None:
        entered = asyncio.Event()

        async def holder() -> None:
            async with self.lanes.slot("acc", "holder"):
                entered.set()
                await self.release.wait()

        self.holder = asyncio.create_task(holder())
        await asyncio.wait_for(entered.wait(), 5)

    def queue(self, task_id: str) -> asyncio.Task[None]:
        async def run() -> None:
            async with self.lanes.slot("acc", task_id):
                self.ran.append(task_id)

        return asyncio.create_task(run())


async def test_priority_is_read_when_the_lane_frees() -> None:
    priority = {"holder": 0, "a": 1, "b": 2}
    version = [0]
    lane = Lane(AccountLanes(10, priority.__getitem__, lambda: version[0]))
    await lane.hold()
    waiting = [lane.queue("a"), lane.queue("b")]
    await asyncio.sleep(0)  # let both join the queue
    assert lane.lanes.waiting("acc") == ["a", "b"]
    priority["b"] = -1  # a reorder while they wait
    version[0] += 1
    lane.release.set()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert lane.ran == ["b", "a"]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    lane = Lane(AccountLanes(10, lambda task_id: 0))
    await lane.hold()
    doomed, survivor = lane.queue("doomed"), lane.queue("survivor")
    await asyncio.sleep(0)  # let both join the queue
    doomed.cancel()
    lane.release.set()
    await asyncio.wait_for(survivor, 5)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert lane.ran == ["survivor"]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_concurrent_runs"):
        AccountLanes(0, lambda task_id: 0)


async def test_a_waiter_withdrawn_while_waiting_for_a_global_slot_gives_back_its_lane() -> None:
    lanes = AccountLanes(1, lambda task_id: 0)
    granted: list[str] = []
    first = lanes.enqueue("a", "a-1", lambda: granted.append("a-1"))
    blocked = lanes.enqueue("b", "b-1", lambda: granted.append("b-1"))
    lanes.enqueue("b", "b-2", lambda: granted.append("b-2"))
    await asyncio.sleep(0)  # the grants run on the next loop iteration
    assert granted == ["a-1"]  # b-1 holds b's lane, but the only global slot is a-1's
    assert lanes.waiting("b") == ["b-2"]
    lanes.withdraw(blocked)
    await asyncio.sleep(0)
    assert granted == ["a-1"]  # b's lane went to b-2, which now waits for the slot
    assert lanes.waiting("b") == []
    lanes.release(first.account)
    assert granted == ["a-1", "b-2"]  # the slot passes straight on
    lanes.release("b")
    await asyncio.sleep(0)
    assert lanes.waiting_counts() == {}


async def test_a_granted_waiter_withdrawn_gives_back_lane_and_slot() -> None:
    lanes = AccountLanes(1, lambda task_id: 0)
    granted: list[str] = []
    first = lanes.enqueue("a", "a-1", lambda: granted.append("a-1"))
    lanes.enqueue("a", "a-2", lambda: granted.append("a-2"))
    lanes.enqueue("b", "b-1", lambda: granted.append("b-1"))
    await asyncio.sleep(0)
    assert granted == ["a-1"]
    lanes.withdraw(first)
    await asyncio.sleep(0)
    assert granted == ["a-1", "b-1"]  # b-1 held b's lane, waiting for the slot: it passes on
    await asyncio.sleep(0)
    assert lanes.waiting("a") == []  # a-2 has a's lane now, and waits for the slot
    lanes.release("b")
    assert granted == ["a-1", "b-1", "a-2"]


async def test_a_lane_given_back_passes_at_once_to_the_run_waiting_first() -> None:
    priority = {"a-1": 0, "a-2": 2, "a-3": 1}
    lanes = AccountLanes(10, priority.__getitem__)
    granted: list[str] = []
    for task_id in priority:
        lanes.enqueue("a", task_id, functools.partial(granted.append, task_id))
    await asyncio.sleep(0)  # runs submitted together are granted on the next iteration
    assert granted == ["a-1"]
    lanes.release("a")
    assert granted == ["a-1", "a-3"]  # no iteration in between, still by priority
    lanes.release("a")
    lanes.release("a")
    assert granted == ["a-1", "a-3", "a-2"]
    assert lanes.waiting_counts() == {}
