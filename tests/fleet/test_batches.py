"""Outcomes read in one batch are applied together and made durable by one commit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet_support import FileInbox, Make, OpenBackend, eventually, probe_task

from jobstores.saver import Saver
from scheduler.fleet.wire import EVENTS_GROUP, EVENTS_STREAM, dumps
from tasks.runs import RunEvent, RunEventKind

pytestmark = pytest.mark.timeout(60)


def _events(run_id: str, task_id: str, at: datetime) -> list[RunEvent]:
    """What a worker records for a run: ``started``, then its outcome (with its start)."""
    return [
        RunEvent(run_id, task_id, RunEventKind.STARTED, at=at, worker="linux-1"),
        RunEvent(
            run_id,
            task_id,
            RunEventKind.SUCCEEDED,
            at=at + timedelta(milliseconds=5),
            worker="linux-1",
            started_at=at,
        ),
    ]


class BatchInbox(FileInbox):
    """A FileInbox that also takes batches, and keeps their sizes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[list[str]] = []

    async def deliver_batch(self, events: Sequence[RunEvent]) -> None:
        self.batches.append([f"{e.run_id}:{e.kind.value}" for e in events])
        for event in events:
            await self.deliver(event)


async def test_the_backend_hands_a_whole_read_to_an_inbox_that_takes_batches(
    open_backend: OpenBackend, broker_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(broker_url)
    at = datetime.now(UTC)
    expected = []
    for i in range(30):  # recorded while the dispatcher was away: one read takes them all
        for event in _events(f"r{i}", f"t{i}", at):
            client.xadd(EVENTS_STREAM, {"event": dumps(event.to_json())})
            expected.append(f"{event.run_id}:{event.kind.value}")
    inbox = BatchInbox(tmp_path / "inbox.json")
    await open_backend(inbox)
    await eventually(lambda: client.xlen(EVENTS_STREAM) == 0, 20, "the batch acknowledged")
    assert inbox.batches == [expected]  # in stream order: each run's start before its end
    assert all(inbox.kinds(f"r{i}") == ["started", "succeeded"] for i in range(30))
    assert client.xpending(EVENTS_STREAM, EVENTS_GROUP)["pending"] == 0


async def test_a_batch_of_outcomes_is_durable_in_one_commit_before_it_returns(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A remote ledger: delivering one by one committed once per event of a run (started,
    # then its outcome); a batch of both for 20 runs is one commit, and the state file
    # itself holds every outcome when it returns (the seed's contract below snapshot_below).
    dispatcher = make()
    ids = await dispatcher.add_tasks(probe_task(tmp_path / "probe", f"a{i}") for i in range(20))
    ledger = dispatcher._ledger
    now = datetime.now(UTC)
    requests = [ledger.open(task_id, now) for task_id in ids]
    assert await dispatcher._store.save_async()
    commits: list[int] = []
    save = Saver.save

    def counted(self: Saver, **options: Any) -> bool:
        commits.append(1)
        return save(self, **options)

    monkeypatch.setattr(Saver, "save", counted)
    batch = [e for r in requests if r is not None for e in _events(r.run_id, r.task_id, now)]
    await ledger.deliver_batch(batch)
    assert len(commits) == 1
    with (tmp_path / "ops" / "dispatch_config.json").open(encoding="utf-8") as file:
        on_disk = {t["task_id"]: t for t in json.load(file)["tasks"]}
    for task_id in ids:
        record = on_disk[task_id]
        assert (record["status"], record["run_count"], record.get("active_run")) == (
            "pending",
            1,
            None,
        )
        assert record["last_worker"] == "linux-1"
    assert len(ledger) == 0


async def test_the_runs_a_batch_frees_are_opened_in_its_commit(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A finishing event frees its run's lane: the run waiting for it is opened a few loop
    # passes later (as the runner does: the run's future, its task, the next run's task).
    # It rides on the batch's commit instead of waiting for that commit and making its own
    # before it may be sent.
    dispatcher = make()
    first, second = await dispatcher.add_tasks(
        probe_task(tmp_path / "probe", f"a{i}") for i in range(2)
    )
    ledger, store = dispatcher._ledger, dispatcher._store
    now = datetime.now(UTC)
    run = ledger.open(first, now)
    assert run is not None
    assert await store.save_async()
    ended = ledger.ended(run.run_id)
    assert ended is not None

    async def next_run() -> None:
        await asyncio.shield(ended)

        async def open_it() -> None:
            assert ledger.open(second, now) is not None
            assert await store.save_async()

        await asyncio.get_running_loop().create_task(open_it())

    waiting = asyncio.get_running_loop().create_task(next_run())
    commits: list[int] = []
    save = Saver.save

    def counted(self: Saver, **options: Any) -> bool:
        commits.append(1)
        return save(self, **options)

    opened_at_commit: list[bool] = []
    save_async = Saver.save_async

    async def watched(self: Saver) -> bool:
        record = store.table.find(second)
        opened_at_commit.append(record is not None and record.active_run is not None)
        return await save_async(self)

    monkeypatch.setattr(Saver, "save", counted)
    monkeypatch.setattr(Saver, "save_async", watched)
    await ledger.deliver_batch(_events(run.run_id, first, now))
    await asyncio.wait_for(waiting, 10)
    assert opened_at_commit[0]  # the batch's commit began once the freed run was open
    assert len(commits) == 1
    with (tmp_path / "ops" / "dispatch_config.json").open(encoding="utf-8") as file:
        on_disk = {t["task_id"]: t for t in json.load(file)["tasks"]}
    assert on_disk[first]["run_count"] == 1
    assert on_disk[second]["active_run"] is not None
