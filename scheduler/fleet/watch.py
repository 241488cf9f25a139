"""``RunWatch``: the Celery backend's watch over its runs out, and its verdicts on them.

Every poll, while this dispatcher holds the broker's lease (and leads its cluster), it reads
each open run's claim and heartbeat and records, atomically against the workers (see
:mod:`scheduler.fleet.wire`), the runs nobody started by their deadline (``expired``) and those
whose worker went silent (``lost``); ``cancelled`` (a run withdrawn before it started) goes
through the same verdict. It sends again the runs nobody claimed whose message is gone from their
queue, notices a broker that lost its data, and reads the worker roster now and then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from scheduler.fleet.lease import BrokerLease
from scheduler.fleet.openruns import OpenRun, utcnow
from scheduler.fleet.outage import BrokerOutage
from scheduler.fleet.publish import RunPublisher
from scheduler.fleet.roster import WorkerRoster
from scheduler.fleet.stream import BATCH
from scheduler.fleet.wire import (
    CLAIM_TTL,
    EPOCH_KEY,
    EVENTS_STREAM,
    FIND_QUEUED_SCRIPT,
    MARK_SCRIPT,
    alive_key,
    claim_key,
    dumps,
    queue_name,
)
from tasks.runs import RunEvent, RunEventKind, describe_error

__all__ = ["RunWatch"]

logger = logging.getLogger("scheduler.backends.celery")  # the backend's log, as it always was


class RunWatch:
    """Polls the runs out and takes the dispatcher's verdicts (see the module)."""

    def __init__(
        self,
        client: aioredis.Redis,
        runs: dict[str, OpenRun],
        *,
        lease: BrokerLease,
        outage: BrokerOutage,
        roster: WorkerRoster,
        publisher: RunPublisher,
        token: str,
        masked: str,
        poll: float,
        lost_after: float,
        resend_after: float,
        closing: Callable[[], bool],
    ) -> None:
        self._redis = client
        self._runs = runs
        self._lease = lease
        self._outage = outage
        self._roster = roster
        self._publisher = publisher
        self._token = token
        """This dispatcher's mark of the broker's data (``td:epoch``)."""
        self._epoch_set = False
        self._masked = masked
        self._poll = poll
        self._lost_after = lost_after
        self._silence = lost_after / 2
        self._resend_after = resend_after
        self._closing = closing

    async def run(self) -> None:
        """Check the runs out every poll until closing."""
        outage = self._outage
        while not self._closing():
            await asyncio.sleep(self._poll)
            if outage.backing_off():
                continue
            try:
                if outage.since is not None:
                    await self._redis.ping()
                    outage.ok()
                if not self._lease.leading() or not await self._lease.renew():
                    continue
                await self.check_epoch()
                await self._check_runs()
                if self._roster.due():
                    await self._roster.refresh(self._redis)
            except (RedisError, OSError) as exc:
                outage.failed(exc)
            except Exception:
                # Keep watching: a run stuck open forever is worse than a logged bug.
                logger.exception("celery run backend: checking runs failed")

    async def check_epoch(self) -> None:
        """Notice a broker that lost its data: unstarted runs' messages went with it."""
        if await self._redis.set(EPOCH_KEY, self._token, nx=True):
            if self._epoch_set:
                now = time.monotonic()
                logger.error(
                    "broker %s lost its data (restarted without persistence?): runs not "
                    "started yet are sent again; started ones whose worker does not report "
                    "are recorded as lost",
                    self._masked,
                )
                for run in self._runs.values():
                    run.orphan_since = now
            self._epoch_set = True
            return
        self._epoch_set = True

    async def _check_runs(self) -> None:
        runs = [run for run in self._runs.values() if not run.verdict]
        for start in range(0, len(runs), BATCH):
            chunk = runs[start : start + BATCH]
            async with self._redis.pipeline(transaction=False) as pipe:
                for run in chunk:
                    pipe.get(claim_key(run.request.run_id))
                    pipe.exists(alive_key(run.request.run_id))
                replies = await pipe.execute()
            for index, run in enumerate(chunk):
                await self._judge(run, replies[2 * index], bool(replies[2 * index + 1]))
        await self._resend_lost_messages()

    async def _resend_lost_messages(self) -> None:
        """Send again the runs nobody claimed whose message is no longer in their queue."""
        now = time.monotonic()
        due: dict[str, list[OpenRun]] = {}
        for run in self._runs.values():
            if (
                run.verdict
                or run.claimed
                or run.state != "queued"
                or run.orphan_since is not None
                or now - run.sent_at < self._resend_after
            ):
                continue
            due.setdefault(queue_name(run.request.sys_type), []).append(run)
        for queue, runs in due.items():
            waiting = await self._redis.eval(
                FIND_QUEUED_SCRIPT, 1, queue, *(run.request.run_id for run in runs)
            )
            present = {item.decode() if isinstance(item, bytes) else str(item) for item in waiting}
            for run in runs:
                run.sent_at = time.monotonic()
                if run.request.run_id in present or run.claimed or run.verdict:
                    continue  # it waits its turn (or no worker of its sys_type is there)
                try:
                    await asyncio.to_thread(self._publisher.publish, run, queue)
                except OperationalError as exc:
                    raise ConnectionError(describe_error(exc)) from exc  # an outage
                request = run.request
                logger.warning(
                    "run %s of task %s (account %s) sent again: no worker claimed it and its "
                    "message is no longer in queue %s (lost with a worker, a broker restart or "
                    "a dispatcher stop); a copy delivered later is dropped by its claim",
                    request.run_id,
                    request.task_id,
                    request.account_id,
                    queue,
                )

    async def _judge(self, run: OpenRun, claim: bytes | None, alive: bool) -> None:
        request = run.request
        if claim is None:
            run.state = "queued"
            orphaned = run.orphan_since is not None
            if orphaned and time.monotonic() - (run.orphan_since or 0.0) >= self._silence:
                run.orphan_since = None
                if not run.claimed:
                    # Its message went with the broker's data, or waits again in its queue:
                    # looked for, and sent again if it is not there.
                    run.sent_at = float("-inf")
                    return
                # Running workers re-create their claims with their next heartbeat: a started
                # run still without one lost its worker or its outcome with the broker's data.
                error = (
                    "RunLostError: the broker lost the run's claim (restarted without its "
                    "data) while it was out, and no worker reported it; it is not re-run"
                )
                if await self.mark(run, "", RunEventKind.LOST, None, error):
                    logger.info(
                        "run %s of task %s (account %s) lost with the broker's data",
                        request.run_id,
                        request.task_id,
                        request.account_id,
                    )
                return
            if run.deadline is not None and utcnow() >= run.deadline:
                waited = (run.deadline - request.submitted_at).total_seconds()
                serving = self._roster.serving(request.sys_type)
                why = (
                    f"its worker(s) of sys_type {request.sys_type!r} ({', '.join(serving)}) "
                    "were busy"
                    if serving
                    else f"no worker for sys_type {request.sys_type!r} was registered"
                )
                error = (
                    f"RunExpiredError: no worker started the run within {waited:g}s ({why}); "
                    "it will not run"
                )
                if await self.mark(run, "", RunEventKind.EXPIRED, None, error):
                    logger.info(
                        "run %s of task %s (account %s) expired: %s",
                        request.run_id,
                        request.task_id,
                        request.account_id,
                        why,
                    )
            return
        try:
            holder = json.loads(claim)
            state, worker = str(holder["state"]), holder.get("worker")
        except (ValueError, KeyError, TypeError):
            logger.error("run %s: unreadable claim %r", request.run_id, claim)
            return
        run.worker = worker
        run.claimed = True
        if state != "running":
            run.state = "finishing"  # its finishing event is in the stream
            return
        run.state = "running"
        if alive:
            run.silent_since = None
            return
        now = time.monotonic()
        if run.silent_since is None:
            run.silent_since = now
        if now - run.silent_since < self._silence:
            return
        error = (
            f"RunLostError: worker {worker!r} was lost during the run (no heartbeat for "
            f"{self._lost_after:g}s); the run is not retried"
        )
        if await self.mark(run, claim.decode(), RunEventKind.LOST, worker, error):
            logger.info(
                "run %s of task %s (account %s) lost: worker %s stopped sending heartbeats",
                request.run_id,
                request.task_id,
                request.account_id,
                worker,
            )

    async def mark(
        self,
        run: OpenRun,
        expected: str,
        kind: RunEventKind,
        worker: str | None,
        error: str,
    ) -> bool:
        """Record the dispatcher's verdict in Redis, atomically against the workers."""
        request = run.request
        now = utcnow()
        event = RunEvent(request.run_id, request.task_id, kind, at=now, worker=worker, error=error)
        value = dumps({"state": kind.value, "worker": worker, "at": now.isoformat()})
        done = await self._redis.eval(
            MARK_SCRIPT,
            3,
            claim_key(request.run_id),
            alive_key(request.run_id),
            EVENTS_STREAM,
            expected,
            value,
            CLAIM_TTL,
            dumps(event.to_json()),
        )
        if done == 1:
            run.verdict = True
            run.state = "finishing"
            return True
        return False
