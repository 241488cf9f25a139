"""Runs on a fleet of workers through Celery on Redis: the dispatcher's side.

:class:`CeleryRunBackend` sends each run to the queue of its sys_type (``td.sys.<S>``) and
turns what the workers record in Redis into run events for the dispatcher's inbox:

- the ``td:events`` stream (``started``, ``succeeded``, ``failed``), read through a consumer
  group and acknowledged only after the inbox made the change durable, so outcomes recorded
  while the dispatcher is down are applied when it comes back
  (:class:`~scheduler.fleet.stream.EventStreamReader`);
- the runs' claims and heartbeats, watched for runs that nobody started by their deadline
  (``expired``), runs whose worker went silent (``lost``) and runs withdrawn before they
  started (``cancelled``). These verdicts are taken in Redis atomically against the workers
  (see :mod:`scheduler.fleet.wire`), so a late worker can never execute an expired or cancelled
  run and a declared-lost run is never recorded twice (:class:`~scheduler.fleet.watch.RunWatch`);
- the queues, for runs nobody claimed whose message is gone (a worker killed holding it, a
  broker restart): those are sent again, and their claim makes any other copy a no-op.

The backend itself holds the runs out and the protocol; its parts are the broker's lease
(:class:`~scheduler.fleet.lease.BrokerLease`), its reachability
(:class:`~scheduler.fleet.outage.BrokerOutage`), publishing
(:class:`~scheduler.fleet.publish.RunPublisher`) and the worker roster
(:class:`~scheduler.fleet.roster.WorkerRoster`).

Nothing here blocks the event loop: Redis is spoken to through ``redis.asyncio`` and Celery's
(blocking) publishing runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from kombu.exceptions import OperationalError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from scheduler.fleet.lease import BrokerLease
from scheduler.fleet.openruns import OpenRun, run_deadline
from scheduler.fleet.outage import BrokerOutage
from scheduler.fleet.publish import RunPublisher
from scheduler.fleet.roster import WorkerRoster
from scheduler.fleet.stream import EventStreamReader
from scheduler.fleet.watch import RunWatch
from scheduler.fleet.wire import check_broker_url, mask_url, queue_name
from tasks.errors import BrokerInUseError, BrokerUnavailableError
from tasks.runs import RunBackend, RunEventKind, RunInbox, RunRequest, describe_error

__all__ = ["CeleryRunBackend"]

logger = logging.getLogger("scheduler.backends.celery")  # the backend's log, as it always was


class CeleryRunBackend(RunBackend):
    """Executes runs on Celery workers chosen by sys_type, through a Redis broker.

    ``broker_url`` is a ``redis://`` or ``rediss://`` URL (TLS: ``rediss://``); the workers
    must use the same one. ``start_timeout``: seconds a run may wait in its queue before it
    expires (None: it waits for a worker as long as it takes). ``lost_after``: seconds without
    a heartbeat after which a started run is recorded as lost (its worker died).
    ``poll_interval``: how often claims and heartbeats are checked (default: a tenth of
    ``lost_after``, at most one second). ``resend_after``: seconds after which a run that no
    worker has claimed and whose message is no longer in its queue (lost with a worker killed
    holding it, a broker restart, or this dispatcher killed before it published) is sent
    again (default: ``lost_after``); its claim makes any other copy a no-op.

    One dispatcher per Redis database: the event stream and its consumer group belong to it.
    :meth:`open` takes the database's lease (``td:dispatcher``) and raises
    :class:`BrokerInUseError` naming the dispatcher that holds it. In a cluster (a store
    several dispatchers share) the lease carries the fencing epoch: a new leader takes it from
    the one it replaced at once, reads the outcomes that one left unacknowledged first, and
    the old one stops sending and reading on its next renewal.
    """

    name = "celery"
    remote = True
    """Runs outlive this process: after a restart they are recovered, not re-sent."""

    def __init__(
        self,
        broker_url: str,
        *,
        start_timeout: float | None = None,
        lost_after: float = 30.0,
        poll_interval: float | None = None,
        resend_after: float | None = None,
    ) -> None:
        self.broker_url = check_broker_url(broker_url)
        if start_timeout is not None and not start_timeout > 0:
            raise ValueError(f"start_timeout: must be positive or None, got {start_timeout!r}")
        if not lost_after > 0:
            raise ValueError(f"lost_after: must be positive, got {lost_after!r}")
        if poll_interval is not None and not poll_interval > 0:
            raise ValueError(f"poll_interval: must be positive, got {poll_interval!r}")
        if resend_after is not None and not resend_after > 0:
            raise ValueError(f"resend_after: must be positive or None, got {resend_after!r}")
        self.resend_after = float(resend_after or lost_after)
        self.start_timeout = start_timeout
        self.lost_after = float(lost_after)
        self._poll = poll_interval or min(1.0, self.lost_after / 10)
        self._masked = mask_url(broker_url)
        self._runs: dict[str, OpenRun] = {}
        self._inbox: RunInbox | None = None
        self._redis: aioredis.Redis | None = None
        self._publisher = RunPublisher(self.lost_after)
        self._watch: RunWatch | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[None]] = set()
        self._closing = False
        self._outage = BrokerOutage(self._masked, self._recovered)
        self._roster = WorkerRoster(self._runs, start_timeout)
        self._epoch = uuid.uuid4().hex
        self._lease = BrokerLease(self._masked)

    # ------------------------------------------------------------------ the protocol

    async def open(self, inbox: RunInbox) -> None:
        """Start reading outcomes (those waiting from before a restart first) and watching runs.

        Does not fail if the broker is unreachable: it is retried with backoff.
        """
        if self._inbox is not None:
            raise RuntimeError("CeleryRunBackend: already opened")
        self._inbox = inbox
        client = self._redis = aioredis.Redis.from_url(
            self.broker_url,
            socket_connect_timeout=5,
            socket_timeout=15,
            health_check_interval=30,
            # No silent retry: a read retried after a reset would skip the entries whose reply
            # was lost; every error reaches the loops here, which re-read and back off.
            retry=Retry(NoBackoff(), 0),
        )
        self._publisher.open(self.broker_url)
        self._lease.describe(client, self._epoch, inbox)
        closing = self._is_closing
        watch = self._watch = RunWatch(
            client,
            self._runs,
            lease=self._lease,
            outage=self._outage,
            roster=self._roster,
            publisher=self._publisher,
            token=self._epoch,
            masked=self._masked,
            poll=self._poll,
            lost_after=self.lost_after,
            resend_after=self.resend_after,
            closing=closing,
        )
        reader = EventStreamReader(
            client, inbox, self._runs, self._lease, self._outage, self._poll, closing
        )
        try:
            # One dispatcher per database: refuse to start beside another (an unreachable
            # broker is not a refusal: the lease is then taken at the first contact).
            await asyncio.wait_for(self._lease.take(), 2.0)
            # Know the broker's data before the first run is sent (see RunWatch.check_epoch).
            await asyncio.wait_for(watch.check_epoch(), 2.0)
        except (RedisError, OSError, TimeoutError):
            pass
        except BrokerInUseError:
            self._closing = True
            await client.aclose()
            await self._publisher.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(reader.run(), name="celery backend: events"),
            loop.create_task(watch.run(), name="celery backend: claims"),
        ]
        logger.info(
            "celery run backend on %s (start_timeout %s, lost_after %ss, resend_after %ss)",
            self._masked,
            self.start_timeout,
            self.lost_after,
            self.resend_after,
        )

    def _is_closing(self) -> bool:
        return self._closing

    async def submit(self, request: RunRequest) -> None:
        """Publish ``request`` on the queue of its sys_type.

        Raises :class:`BrokerUnavailableError` if the broker cannot take it (at once, without
        trying, while a known outage lasts and the next reconnection attempt is not due).
        """
        if self._publisher.app is None or self._closing:
            raise RuntimeError("CeleryRunBackend: not open")
        if self._lease.fenced is not None:
            raise BrokerInUseError(f"run {request.run_id} was not sent: {self._lease.fenced}")
        queue = queue_name(request.sys_type)
        if self._outage.backing_off():
            self._outage.count_unsent()
            raise BrokerUnavailableError(
                f"run {request.run_id} of task {request.task_id} was not sent: broker "
                f"{self._masked} unreachable since {self._outage.text()} "
                f"({self._outage.last_error})"
            )
        run = OpenRun(request, run_deadline(request, self.start_timeout), sent_at=time.monotonic())
        self._runs[request.run_id] = run
        try:
            await asyncio.to_thread(self._publisher.publish, run, queue)
        except (OperationalError, RedisError, OSError) as exc:
            self._runs.pop(request.run_id, None)
            self._outage.failed(exc)
            self._outage.count_unsent()
            raise BrokerUnavailableError(
                f"run {request.run_id} of task {request.task_id} was not sent: broker "
                f"{self._masked} unreachable ({describe_error(exc)})"
            ) from exc
        except BaseException:
            self._runs.pop(request.run_id, None)
            raise
        self._outage.ok()

    async def cancel(self, run_id: str) -> bool:
        """Withdraw a run no worker has claimed: its claim is taken with a ``cancelled``
        verdict (so no copy of its message ever executes) and its ``cancelled`` event goes
        through the stream like any outcome. False if a worker holds it already (it runs to
        its end), or the broker cannot be reached."""
        run = self._runs.get(run_id)
        if run is None or run.verdict or run.claimed or self._watch is None or self._closing:
            return False
        error = "cancelled: its task was paused or removed before a worker started it"
        try:
            return await self._watch.mark(run, "", RunEventKind.CANCELLED, None, error)
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            return False

    async def recover(self, requests: Sequence[RunRequest]) -> None:
        """Watch runs sent before a restart again (never re-sent).

        A run whose outcome waits in the stream is applied by the reader; a started run whose
        worker is silent becomes lost; an unstarted one expires at its deadline, if it has one.
        """
        for request in requests:
            if request.run_id not in self._runs:
                self._runs[request.run_id] = OpenRun(
                    request, run_deadline(request, self.start_timeout)
                )
        if requests:
            logger.info("celery run backend: watching %d run(s) sent before", len(requests))

    async def close(self, grace_period: float | None) -> None:
        """Stop reading and watching; runs on workers go on and their outcomes wait in Redis.

        ``grace_period`` bounds how long a batch of events being applied may take to finish.
        """
        if self._closing:
            return
        self._closing = True
        for task in self._tasks[1:]:
            task.cancel()
        if self._tasks:
            reader = self._tasks[0]
            # Let the batch being applied finish so it is acknowledged, then stop.
            timeout = 5.0 if grace_period is None else max(0.1, min(grace_period, 5.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), timeout)
            reader.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            await self._lease.release()
            await self._redis.aclose()
        await self._publisher.close()

    def health(self) -> Mapping[str, Any]:
        """Broker reachability, open runs by state, and the live workers by sys_type."""
        states: dict[str, int] = {}
        for run in self._runs.values():
            states[run.state] = states.get(run.state, 0) + 1
        return {
            "backend": self.name,
            "broker": self._masked,
            "connected": self._outage.since is None,
            "unreachable_since": self._outage.text() if self._outage.since is not None else None,
            "last_error": self._outage.last_error,
            "open_runs": len(self._runs),
            "runs": states,
            "workers": dict(self._roster.workers),
            "waiting_for_workers": self._roster.waiting(),
            "start_timeout": self.start_timeout,
            "lost_after": self.lost_after,
            "resend_after": self.resend_after,
            "in_use_by_another_dispatcher": self._lease.fenced,
        }

    # ------------------------------------------------------------------ queries

    def run_state(self, run_id: str) -> str | None:
        """``queued``, ``running`` or ``finishing`` for an open run, else None."""
        run = self._runs.get(run_id)
        return None if run is None else run.state

    def _recovered(self) -> None:
        """The broker is reachable again after an outage."""
        if self._redis is not None:
            # Drop idle connections opened before the outage rather than fail on each.
            chore = asyncio.get_running_loop().create_task(
                self._redis.connection_pool.disconnect(inuse_connections=False)
            )
            self._chores.add(chore)
            chore.add_done_callback(self._chores.discard)
        # Workers could not renew their heartbeats during the outage: judge them afresh.
        for run in self._runs.values():
            run.silent_since = None
