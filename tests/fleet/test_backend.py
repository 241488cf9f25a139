"""CeleryRunBackend with real worker processes on a real Redis, against a small durable inbox."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from fleet_probe import read_probe
from fleet_support import (
    FaultProxy,
    FileInbox,
    OpenBackend,
    RedisServer,
    StartWorker,
    eventually,
    request,
    wait_until,
)

from scheduler.errors import BrokerUnavailableError
from scheduler.fleet.wire import EVENTS_STREAM

pytestmark = pytest.mark.timeout(60)


async def test_routing_by_sys_type_and_outcomes(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path
) -> None:
    start_worker("linux-1", "linux")
    start_worker("mac-1", "mac_intel")
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox)
    probe = tmp_path / "probe.jsonl"
    runs = {
        "l-ok": request("l-ok", sys_type="linux", probe_log=probe),
        "l-bad": request("l-bad", sys_type="linux", probe_log=probe, fail=True),
        "m-ok": request("m-ok", sys_type="mac_intel", probe_log=probe),
        "m-bad": request("m-bad", sys_type="mac_intel", probe_log=probe, fail=True),
    }
    for run in runs.values():
        await backend.submit(run)
    await eventually(lambda: inbox.finished(*runs), 20, "four outcomes")

    for run_id, run in runs.items():
        assert inbox.kinds(run_id) == ["started", "failed" if "bad" in run_id else "succeeded"]
        expected = "linux-1" if run.sys_type == "linux" else "mac-1"
        started, finished = inbox.events[run_id]
        assert started["worker"] == finished["worker"] == expected
        assert finished["started_at"] == started["at"]
    assert inbox.last("l-ok")["error"] is None  # type: ignore[index]
    assert inbox.last("m-bad")["error"] == (  # type: ignore[index]
        "RuntimeError: probe task-m-bad failed on purpose"
    )
    # Each run executed once, on a worker of its sys_type.
    starts = [line for line in read_probe(probe) if line["phase"] == "start"]
    assert sorted(line["task_id"] for line in starts) == sorted(f"task-{r}" for r in runs)
    for line in starts:
        assert line["worker"] == ("linux-1" if line["sys_type"] == "linux" else "mac-1")
    assert backend.health()["open_runs"] == 0


async def test_message_delivered_twice_executes_once(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path
) -> None:
    start_worker("w1", "linux", concurrency=2)
    start_worker("w2", "linux", concurrency=2)
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox)
    probe = tmp_path / "probe.jsonl"
    run = request("twice", sys_type="linux", probe_log=probe, seconds=0.5)
    await backend.submit(run)
    await backend.submit(run)  # the same message again: a duplicate delivery
    await eventually(lambda: inbox.finished("twice"), 20, "the outcome")
    assert [line["phase"] for line in read_probe(probe)] == ["start", "end"]
    assert inbox.kinds("twice") == ["started", "succeeded"]


async def test_worker_killed_mid_run_is_lost_and_not_rerun(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path, broker_url: str
) -> None:
    doomed = start_worker("doomed", "linux")
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, lost_after=2.0)
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("victim", sys_type="linux", probe_log=probe, seconds=60))
    await eventually(lambda: inbox.kinds("victim") == ["started"], 20, "the run to start")
    doomed.kill()
    killed_at = datetime.now(UTC)
    await eventually(lambda: inbox.finished("victim"), 10, "the run to be declared lost")
    lost = inbox.last("victim")
    assert lost is not None
    assert lost["kind"] == "lost"
    assert lost["worker"] == "doomed"
    assert "'doomed'" in lost["error"]
    assert "lost" in lost["error"]
    assert datetime.fromisoformat(lost["at"]) - killed_at < timedelta(seconds=2.0 + 1.5)

    # A live worker (which also restores the dead one's unacknowledged message after its
    # visibility timeout) never re-executes the lost run, and takes the next runs.
    heir = start_worker("heir", "linux", visibility_timeout=1)
    await backend.submit(request("next", sys_type="linux", probe_log=probe))
    await eventually(lambda: inbox.finished("next"), 20, "the next run")
    assert inbox.events["next"][0]["worker"] == "heir"
    await eventually(
        lambda: "run victim of task task-victim not executed here" in heir.log(),
        15,
        "the restored message of the lost run to be refused",
    )
    starts = [line["task_id"] for line in read_probe(probe) if line["phase"] == "start"]
    assert starts == ["task-victim", "task-next"]


async def test_no_worker_with_start_timeout_expires_and_never_runs_late(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path
) -> None:
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, start_timeout=1.0)
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("stale", sys_type="windows", probe_log=probe))
    await eventually(lambda: inbox.finished("stale"), 10, "the run to expire")
    expired = inbox.last("stale")
    assert expired is not None
    assert expired["kind"] == "expired"
    assert "sys_type 'windows'" in expired["error"]
    # A worker that comes later never executes the stale run, but runs a fresh one.
    start_worker("win-1", "windows")
    await backend.submit(request("fresh", sys_type="windows", probe_log=probe))
    await eventually(lambda: inbox.finished("fresh"), 20, "the fresh run")
    assert inbox.kinds("fresh") == ["started", "succeeded"]
    assert [line["task_id"] for line in read_probe(probe)] == ["task-fresh", "task-fresh"]
    assert inbox.kinds("stale") == ["expired"]


async def test_no_worker_without_start_timeout_waits_in_queue(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path
) -> None:
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, lost_after=1.0)
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("patient", sys_type="windows", probe_log=probe))
    # Watched for several rounds (lost_after is short), it stays queued.
    await eventually(lambda: backend.health()["runs"] == {"queued": 1}, 5, "a queued run")
    assert backend.run_state("patient") == "queued"
    assert inbox.kinds("patient") == []
    start_worker("win-1", "windows")
    await eventually(lambda: inbox.finished("patient"), 20, "the run once a worker came")
    assert inbox.kinds("patient") == ["started", "succeeded"]


async def test_outcomes_wait_for_a_restarted_dispatcher_and_apply_once(
    start_worker: StartWorker, open_backend: OpenBackend, tmp_path: Path, broker_url: str
) -> None:
    start_worker("w1", "linux", concurrency=3)
    path = tmp_path / "inbox.json"
    inbox = FileInbox(path)
    first = await open_backend(inbox)
    probe = tmp_path / "probe.jsonl"
    runs = [request(f"r{i}", sys_type="linux", probe_log=probe, seconds=1.5) for i in range(3)]
    for run in runs:
        await first.submit(run)
    await eventually(lambda: all(inbox.kinds(r.run_id) for r in runs), 20, "runs to start")
    await first.close(0)  # the dispatcher goes away while the runs execute

    client = redis.Redis.from_url(broker_url)
    wait_until(lambda: client.xlen(EVENTS_STREAM) >= 3, 20, "outcomes to wait in the stream")
    # It comes back, applies the first outcome durably and dies before acknowledging it.
    again = FileInbox(path)
    again.fail_once.add("r0")
    second = await open_backend(again)
    await second.recover(runs)
    await eventually(lambda: again.finished("r0", "r1", "r2"), 20, "all outcomes")
    await eventually(lambda: client.xlen(EVENTS_STREAM) == 0, 10, "the stream to be drained")
    # The unacknowledged outcome came again and was ignored: every run applied once.
    assert again.duplicates >= 1
    for run in runs:
        assert again.kinds(run.run_id) == ["started", "succeeded"]
    assert [line["phase"] for line in read_probe(probe)].count("start") == 3


async def test_broker_killed_and_restarted(
    own_redis: RedisServer,
    start_worker: StartWorker,
    open_backend: OpenBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = own_redis.url(0)
    start_worker("w1", "linux", broker=url)
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, broker_url=url, poll_interval=0.1)
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("before", sys_type="linux", probe_log=probe))
    await eventually(lambda: inbox.finished("before"), 20, "a run before the outage")
    # Queued (no worker for its sys_type) when the broker dies with its data.
    await backend.submit(request("queued", sys_type="nobody", probe_log=probe))
    await eventually(lambda: backend.run_state("queued") == "queued", 5, "a queued run")

    caplog.set_level(logging.INFO, logger="scheduler.backends.celery")
    own_redis.kill()
    for i in range(3):
        with pytest.raises(BrokerUnavailableError, match="not sent: broker redis://"):
            await backend.submit(request(f"lost-{i}", sys_type="linux", probe_log=probe))
    await eventually(lambda: not backend.health()["connected"], 5, "the outage to be seen")
    own_redis.start()
    await eventually(lambda: backend.health()["connected"], 20, "the broker to be back")
    # The queued run's message died with the broker's data: nobody claimed it, so it is sent
    # again (not forgotten, not recorded as lost) and runs once a worker of its type comes.
    client = redis.Redis.from_url(url)
    await eventually(lambda: client.llen("td.sys.nobody") == 1, 15, "the run sent again")
    client.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    outage = [m for m in errors if "unreachable" in m]
    assert len(outage) == 1, errors
    start_worker("w2", "nobody", broker=url)
    await eventually(lambda: inbox.finished("queued"), 20, "the queued run to execute")
    assert inbox.kinds("queued") == ["started", "succeeded"]

    # The worker reconnects by itself; runs flow again.
    await backend.submit(request("after", sys_type="linux", probe_log=probe))
    await eventually(lambda: inbox.finished("after"), 30, "a run after the outage")
    assert inbox.kinds("after") == ["started", "succeeded"]
    assert not any(line["task_id"].startswith("task-lost") for line in read_probe(probe))


def _pending(broker_url: str) -> int:
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.xpending(EVENTS_STREAM, "dispatcher")["pending"])
    except redis.ResponseError:
        return 0


async def test_an_outcome_whose_reply_was_lost_is_read_again(
    start_worker: StartWorker,
    open_backend: OpenBackend,
    fault_proxy: FaultProxy,
    broker_url: str,
    tmp_path: Path,
) -> None:
    # The dispatcher reads the stream through a proxy that swallows the reply carrying the
    # outcome and resets the connection: the entry is pending for the dispatcher, delivered
    # to nobody. It must be read again (id 0) right after the error, not only at a restart.
    start_worker("w1", "linux")
    db = int(broker_url.rsplit("/", 1)[1])
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, broker_url=fault_proxy.url(db))
    probe = tmp_path / "probe.jsonl"
    fault_proxy.drop_reply(b'"kind":"succeeded"')
    await backend.submit(request("swallowed", sys_type="linux", probe_log=probe, seconds=0.3))
    await eventually(fault_proxy.dropped.is_set, 20, "the reply to be swallowed")
    await eventually(lambda: inbox.finished("swallowed"), 5, "the outcome read again")
    assert inbox.kinds("swallowed") == ["started", "succeeded"]
    await eventually(lambda: _pending(broker_url) == 0, 5, "the entries acknowledged")


async def test_an_outcome_applied_but_not_acknowledged_is_acknowledged_later(
    start_worker: StartWorker,
    open_backend: OpenBackend,
    fault_proxy: FaultProxy,
    broker_url: str,
    tmp_path: Path,
) -> None:
    start_worker("w1", "linux")
    db = int(broker_url.rsplit("/", 1)[1])
    inbox = FileInbox(tmp_path / "inbox.json")
    backend = await open_backend(inbox, broker_url=fault_proxy.url(db))
    probe = tmp_path / "probe.jsonl"
    await backend.submit(request("first", sys_type="linux", probe_log=probe))
    await eventually(lambda: inbox.finished("first"), 20, "a first outcome")
    await eventually(lambda: _pending(broker_url) == 0, 5, "its entries acknowledged")
    fault_proxy.drop_request(b"XACK")  # the acknowledgement never reaches Redis
    await backend.submit(request("unacked", sys_type="linux", probe_log=probe))
    await eventually(fault_proxy.dropped.is_set, 20, "an acknowledgement to be cut")
    await eventually(lambda: inbox.finished("unacked"), 5, "the outcome applied")
    # Read again and acknowledged; the inbox saw the copy and applied it once.
    await eventually(lambda: _pending(broker_url) == 0, 5, "the entries acknowledged")
    assert inbox.duplicates >= 1
    assert inbox.kinds("unacked") == ["started", "succeeded"]
