"""Runs on a fleet of workers through Celery on Redis: the dispatcher's side.

:class:`CeleryRunBackend` sends each run to the queue of its sys_type (``td.sys.<S>``) and
turns what the workers record in Redis into run events for the dispatcher's inbox:

- the ``td:events`` stream (``started``, ``succeeded``, ``failed``), read through a consumer
  group and acknowledged only after the inbox made the change durable, so outcomes recorded
  while the dispatcher is down are applied when it comes back;
- the runs' claims and heartbeats, watched for runs that nobody started by their deadline
  (``expired``), runs whose worker went silent (``lost``) and runs withdrawn before they
  started (``cancelled``). These verdicts are taken in Redis atomically against the workers
  (see :mod:`scheduler.fleet`), so a late worker can never execute an expired or cancelled
  run and a declared-lost run is never recorded twice;
- the queues, for runs nobody claimed whose message is gone (a worker killed holding it, a
  broker restart): those are sent again, and their claim makes any other copy a no-op.

Nothing here blocks the event loop: Redis is spoken to through ``redis.asyncio`` and Celery's
(blocking) publishing runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from scheduler.fleet import (
    CLAIM_TTL,
    EPOCH_KEY,
    EVENTS_GROUP,
    EVENTS_STREAM,
    FIND_QUEUED_SCRIPT,
    LEASE_KEY,
    LEASE_RELEASE_SCRIPT,
    LEASE_SCRIPT,
    MARK_SCRIPT,
    MESSAGE_FORMAT,
    TASK_NAME,
    WORKER_PREFIX,
    alive_key,
    check_broker_url,
    claim_key,
    dumps,
    mask_url,
    queue_name,
)
from tasks.errors import BrokerInUseError, BrokerUnavailableError
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest, describe_error

__all__ = ["CeleryRunBackend"]

logger = logging.getLogger(__name__)

_CONSUMER = "dispatcher"
"""The stream consumer name: fixed, so a restarted dispatcher reads its predecessor's
unacknowledged events first."""
_BATCH = 500
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 2.0
"""Seconds between reconnection attempts at most: once the broker is back, runs due are
refused for at most this long."""
_UNSENT_EVERY = 60.0
"""Seconds between the counts of runs not sent, while an outage lasts."""
_WORKERS_EVERY = 5.0
_FLAP = 10.0
_REREAD_EVERY = 10.0
_LEASE_TTL = 15.0
"""Seconds the dispatcher's lease on the database outlives its last renewal (renewed at every
poll): how long a dispatcher that died (elsewhere) keeps another one out."""
"""Seconds between re-reads of the dispatcher's own pending stream entries."""


@dataclass(slots=True)
class _OpenRun:
    """A run sent (or recovered) whose finishing event has not been delivered yet."""

    request: RunRequest
    deadline: datetime | None
    state: str = "queued"
    worker: str | None = None
    silent_since: float | None = None
    """Monotonic time since which the run's heartbeat has been seen missing."""
    verdict: bool = False
    """Whether this backend already recorded it as expired or lost."""
    orphan_since: float | None = None
    """Monotonic time at which the broker was found to have lost its data (and maybe this
    run's message)."""
    sent_at: float = float("-inf")
    """Monotonic time at which its message was last sent or seen in its queue (-inf: a run
    recovered after a restart, whose message may never have been sent)."""
    claimed: bool = False
    """Whether a worker was ever seen holding its claim (such a run is never sent again)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _stream_entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of one stream in an XREADGROUP reply (RESP2: a list, RESP3: a dict)."""
    if not response:
        return []
    if isinstance(response, dict):
        return list(next(iter(response.values()))[0] if response else [])
    return list(response[0][1])


def _decode_events(
    entries: list[tuple[bytes, dict[bytes, bytes] | None]],
) -> tuple[list[bytes], list[tuple[bytes, RunEvent]]]:
    """A stream read's entries: the ids to acknowledge as they are (empty or malformed
    entries, logged) and the run events of the others, in stream order."""
    done: list[bytes] = []
    events: list[tuple[bytes, RunEvent]] = []
    for entry_id, fields in entries:
        raw = (fields or {}).get(b"event")
        if raw is None:
            done.append(entry_id)
            continue
        try:
            events.append((entry_id, RunEvent.from_json(json.loads(raw))))
        except ValueError as exc:
            logger.error("ignoring a malformed run event %s: %s", entry_id.decode(), exc)
            done.append(entry_id)
    return done, events


def _track(runs: dict[str, _OpenRun], event: RunEvent) -> None:
    """Follow an applied event in the backend's runs out: a finished run is gone, a started
    one claimed (and running, if it was queued)."""
    if event.kind.finished:
        runs.pop(event.run_id, None)
        return
    run = runs.get(event.run_id)
    if run is not None:
        run.claimed = True
        if run.state == "queued":
            run.state, run.worker = "running", event.worker


class _Fencing(Protocol):
    """The lease of a shared store, as the backend reads it (see
    :class:`scheduler.leadership.LeaseView`)."""

    cluster: str

    @property
    def epoch(self) -> int | None: ...

    def is_leader_now(self) -> bool: ...


class _BrokerLease:
    """The one dispatcher's lease on a Redis database (``td:dispatcher``).

    A dispatcher of a cluster (its inbox has a ``leadership``: a shared store's lease) writes
    the cluster and the fencing epoch it leads in: a newer leader of the same cluster
    replaces the holder of an older epoch at once (it was taken over, whether it died, froze
    or lost the database), and the older one, on its next renewal, finds the newer epoch and
    neither sends runs nor reads outcomes again.
    """

    def __init__(self, masked: str) -> None:
        self._masked = masked
        self._redis: aioredis.Redis | None = None
        self.value = ""
        self.directory: str | None = None
        self.fencing: _Fencing | None = None
        self.epoch: int | None = None
        """The fencing epoch this dispatcher leads in (None: not in a cluster)."""
        self.leased = False
        self.fenced: str | None = None
        """Why this dispatcher may not use the database now (another one holds its lease)."""

    def describe(self, client: aioredis.Redis, token: str, inbox: RunInbox) -> None:
        """Who this dispatcher is, from its inbox (a TaskDispatcher's names its directory and,
        in a cluster, its lease)."""
        self._redis = client
        directory = getattr(inbox, "directory", None)
        self.directory = None if directory is None else str(directory)
        self.fencing = getattr(inbox, "leadership", None)
        self.epoch = None if self.fencing is None else self.fencing.epoch
        holder: dict[str, Any] = {
            "id": token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "directory": self.directory,
            "since": _utcnow().isoformat(timespec="seconds"),
        }
        if self.fencing is not None:
            holder.update(cluster=self.fencing.cluster, epoch=self.epoch)
        self.value = dumps(holder)

    def leading(self) -> bool:
        """Whether this dispatcher leads its cluster at this instant (always, outside one)."""
        return self.fencing is None or self.fencing.is_leader_now()

    def usable(self) -> bool:
        """Whether outcomes may be read now: the lease is ours and this dispatcher leads."""
        return self.leased and self.fenced is None and self.leading()

    async def take(self) -> None:
        """Take (or renew) the lease; :class:`BrokerInUseError` naming the holder if another
        running dispatcher has it (or a newer leader of this cluster)."""
        assert self._redis is not None
        ttl = int(_LEASE_TTL * 1000)
        result = await self._redis.eval(LEASE_SCRIPT, 1, LEASE_KEY, self.value, ttl, "")
        if result != 1 and (self._predecessor(result) or self._superseded(result)):
            result = await self._redis.eval(LEASE_SCRIPT, 1, LEASE_KEY, self.value, ttl, result)
        if result == 1:
            self.leased = True
            return
        raise BrokerInUseError(self._in_use(result))

    async def renew(self) -> bool:
        """Renew the lease; False (logged once) while another dispatcher holds it."""
        try:
            await self.take()
        except BrokerInUseError as exc:
            if self.fenced is None:
                logger.error("%s; this dispatcher neither sends runs nor reads outcomes", exc)
            self.fenced = str(exc)
            return False
        if self.fenced is not None:
            logger.warning("broker %s: the dispatcher lease is ours again", self._masked)
            self.fenced = None
        return True

    async def release(self) -> None:
        """Give the lease back if it is still ours."""
        if self._redis is None or not self.leased:
            return
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(
                self._redis.eval(LEASE_RELEASE_SCRIPT, 1, LEASE_KEY, self.value), 2.0
            )

    def _predecessor(self, holder: bytes) -> bool:
        """Whether the lease ``holder`` is a dispatcher that is gone: one of this host that
        had our directory (which we own now) or whose process no longer exists."""
        try:
            info = json.loads(holder)
            same_host = info["host"] == socket.gethostname()
            pid = int(info["pid"])
            directory = info.get("directory")
        except (ValueError, KeyError, TypeError):
            return False
        if not same_host:
            return False
        if self.directory is not None and directory == self.directory:
            return True
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _holder_epoch(self, holder: bytes) -> int | None:
        """The epoch of a ``holder`` of this dispatcher's cluster (None: not of it)."""
        if self.fencing is None or self.epoch is None:
            return None
        try:
            info = json.loads(holder)
            if info.get("cluster") != self.fencing.cluster:
                return None
            return int(info["epoch"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def _superseded(self, holder: bytes) -> bool:
        """Whether ``holder`` led this dispatcher's cluster at an older epoch (taken over)."""
        epoch = self._holder_epoch(holder)
        return epoch is not None and self.epoch is not None and epoch < self.epoch

    def _in_use(self, holder: Any) -> str:
        epoch = self._holder_epoch(holder)
        if epoch is not None and self.fencing is not None and epoch > (self.epoch or 0):
            return (
                f"broker {self._masked} is used by the leader of cluster "
                f"{self.fencing.cluster!r} at epoch {epoch}; this dispatcher led it at epoch "
                f"{self.epoch} and was taken over"
            )
        try:
            info = json.loads(holder)
            who = (
                f"the dispatcher on host {info.get('host')!r} (pid {info.get('pid')}, "
                f"directory {info.get('directory')!r}, since {info.get('since')})"
            )
        except (ValueError, TypeError, AttributeError):
            who = f"another dispatcher ({holder!r})"
        return (
            f"broker {self._masked} is already used by {who}: one dispatcher per Redis "
            f"database; stop that one, or give this one another database (its lease expires "
            f"{_LEASE_TTL:g}s after it stops renewing it)"
        )


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
        # A worker renews its heartbeat ten times per lost_after; the heartbeat lasts 40% of
        # it, and a run is declared lost once its heartbeat has been seen missing for half of
        # it: a dead worker's run is lost within lost_after (plus one poll).
        self._heartbeat = max(0.05, self.lost_after / 10)
        self._alive_ms = max(100, int(self.lost_after * 400))
        self._silence = self.lost_after / 2
        self._poll = poll_interval or min(1.0, self.lost_after / 10)
        self._masked = mask_url(broker_url)
        self._runs: dict[str, _OpenRun] = {}
        self._inbox: RunInbox | None = None
        self._redis: aioredis.Redis | None = None
        self._app: Celery | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[None]] = set()
        self._closing = False
        self._outage_since: float | None = None
        self._recovered_at: float | None = None
        self._outage_at: datetime | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_FIRST
        self._last_error: str | None = None
        self._unsent = 0
        """Runs refused since the outage began (or since the last count was logged)."""
        self._unsent_at = 0.0
        self._workers: dict[str, list[str]] = {}
        self._workers_at = 0.0
        self._unserved: set[str] = set()
        """Sys_types with runs waiting and no worker registered (logged once each)."""
        self._epoch = uuid.uuid4().hex
        self._epoch_set = False
        self._lease = _BrokerLease(self._masked)

    # ------------------------------------------------------------------ the protocol

    async def open(self, inbox: RunInbox) -> None:
        """Start reading outcomes (those waiting from before a restart first) and watching runs.

        Does not fail if the broker is unreachable: it is retried with backoff.
        """
        from scheduler.worker import make_app

        if self._inbox is not None:
            raise RuntimeError("CeleryRunBackend: already opened")
        self._inbox = inbox
        self._redis = aioredis.Redis.from_url(
            self.broker_url,
            socket_connect_timeout=5,
            socket_timeout=15,
            health_check_interval=30,
            # No silent retry: a read retried after a reset would skip the entries whose reply
            # was lost; every error reaches the loops here, which re-read and back off.
            retry=Retry(NoBackoff(), 0),
        )
        self._app = make_app(self.broker_url)
        self._lease.describe(self._redis, self._epoch, inbox)
        try:
            # One dispatcher per database: refuse to start beside another (an unreachable
            # broker is not a refusal: the lease is then taken at the first contact).
            await asyncio.wait_for(self._lease.take(), 2.0)
            # Know the broker's data before the first run is sent (see _check_epoch).
            await asyncio.wait_for(self._check_epoch(), 2.0)
        except (RedisError, OSError, TimeoutError):
            pass
        except BrokerInUseError:
            self._closing = True
            await self._redis.aclose()
            await asyncio.to_thread(self._app.close)
            raise
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_events(), name="celery backend: events"),
            loop.create_task(self._watch_runs(), name="celery backend: claims"),
        ]
        logger.info(
            "celery run backend on %s (start_timeout %s, lost_after %ss, resend_after %ss)",
            self._masked,
            self.start_timeout,
            self.lost_after,
            self.resend_after,
        )

    async def submit(self, request: RunRequest) -> None:
        """Publish ``request`` on the queue of its sys_type.

        Raises :class:`BrokerUnavailableError` if the broker cannot take it (at once, without
        trying, while a known outage lasts and the next reconnection attempt is not due).
        """
        if self._app is None or self._closing:
            raise RuntimeError("CeleryRunBackend: not open")
        if self._lease.fenced is not None:
            raise BrokerInUseError(f"run {request.run_id} was not sent: {self._lease.fenced}")
        queue = queue_name(request.sys_type)
        if self._outage_since is not None and time.monotonic() < self._retry_at:
            self._count_unsent()
            raise BrokerUnavailableError(
                f"run {request.run_id} of task {request.task_id} was not sent: broker "
                f"{self._masked} unreachable since {self._outage_text()} ({self._last_error})"
            )
        run = _OpenRun(request, self._deadline(request), sent_at=time.monotonic())
        self._runs[request.run_id] = run
        try:
            await asyncio.to_thread(self._publish, run, queue)
        except (OperationalError, RedisError, OSError) as exc:
            self._runs.pop(request.run_id, None)
            self._broker_failed(exc)
            self._count_unsent()
            raise BrokerUnavailableError(
                f"run {request.run_id} of task {request.task_id} was not sent: broker "
                f"{self._masked} unreachable ({describe_error(exc)})"
            ) from exc
        except BaseException:
            self._runs.pop(request.run_id, None)
            raise
        self._broker_ok()

    async def cancel(self, run_id: str) -> bool:
        """Withdraw a run no worker has claimed: its claim is taken with a ``cancelled``
        verdict (so no copy of its message ever executes) and its ``cancelled`` event goes
        through the stream like any outcome. False if a worker holds it already (it runs to
        its end), or the broker cannot be reached."""
        run = self._runs.get(run_id)
        if run is None or run.verdict or run.claimed or self._redis is None or self._closing:
            return False
        error = "cancelled: its task was paused or removed before a worker started it"
        try:
            return await self._mark(run, "", RunEventKind.CANCELLED, None, error)
        except (RedisError, OSError) as exc:
            self._broker_failed(exc)
            return False

    async def recover(self, requests: Sequence[RunRequest]) -> None:
        """Watch runs sent before a restart again (never re-sent).

        A run whose outcome waits in the stream is applied by the reader; a started run whose
        worker is silent becomes lost; an unstarted one expires at its deadline, if it has one.
        """
        for request in requests:
            if request.run_id not in self._runs:
                self._runs[request.run_id] = _OpenRun(request, self._deadline(request))
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
        if self._app is not None:
            await asyncio.to_thread(self._app.close)

    def health(self) -> Mapping[str, Any]:
        """Broker reachability, open runs by state, and the live workers by sys_type."""
        states: dict[str, int] = {}
        for run in self._runs.values():
            states[run.state] = states.get(run.state, 0) + 1
        return {
            "backend": self.name,
            "broker": self._masked,
            "connected": self._outage_since is None,
            "unreachable_since": self._outage_text() if self._outage_since is not None else None,
            "last_error": self._last_error,
            "open_runs": len(self._runs),
            "runs": states,
            "workers": dict(self._workers),
            "waiting_for_workers": self._waiting(),
            "start_timeout": self.start_timeout,
            "lost_after": self.lost_after,
            "resend_after": self.resend_after,
            "in_use_by_another_dispatcher": self._lease.fenced,
        }

    def _waiting(self) -> dict[str, dict[str, Any]]:
        """Sys_type -> the runs no worker has taken yet and the workers registered for it."""
        waiting: dict[str, dict[str, Any]] = {}
        for run in self._runs.values():
            if run.state == "queued" and not run.verdict:
                sys_type = run.request.sys_type
                entry = waiting.setdefault(sys_type, {"runs": 0, "workers": []})
                entry["runs"] += 1
        for worker, sys_types in self._workers.items():
            for sys_type in sys_types:
                if sys_type in waiting:
                    waiting[sys_type]["workers"].append(worker)
        return waiting

    # ------------------------------------------------------------------ queries

    def run_state(self, run_id: str) -> str | None:
        """``queued``, ``running`` or ``finishing`` for an open run, else None."""
        run = self._runs.get(run_id)
        return None if run is None else run.state

    # ------------------------------------------------------------------ sending

    def _deadline(self, request: RunRequest) -> datetime | None:
        deadline = request.deadline
        if self.start_timeout is not None:
            limit = request.submitted_at + timedelta(seconds=self.start_timeout)
            deadline = limit if deadline is None else min(deadline, limit)
        return deadline

    def _publish(self, run: _OpenRun, queue: str) -> None:
        assert self._app is not None
        request = run.request
        payload = {
            "format": MESSAGE_FORMAT,
            "request": request.to_json(),
            "heartbeat": self._heartbeat,
            "alive_ms": self._alive_ms,
            "lost_after": self.lost_after,
        }
        # The worker bounds the run itself (any pool); Celery's own limits back it up where
        # the pool enforces them (prefork), a little later so the worker reports first.
        timeout = request.timeout
        limits = {} if timeout is None else {"time_limit": timeout + 30.0}
        self._app.send_task(
            TASK_NAME,
            args=[payload],
            task_id=request.run_id,
            queue=queue,
            expires=run.deadline,
            **limits,
            retry=True,
            retry_policy={
                "max_retries": 1,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.2,
            },
        )

    # ------------------------------------------------------------------ outages

    def _outage_text(self) -> str:
        return self._outage_at.isoformat(timespec="seconds") if self._outage_at else "?"

    def _count_unsent(self) -> None:
        self._unsent += 1
        now = time.monotonic()
        if now - self._unsent_at >= _UNSENT_EVERY and self._outage_since is not None:
            if self._unsent_at:  # not the first: the outage's ERROR said it all
                self._log_unsent("in the last minute of the outage")
            self._unsent_at = now

    def _log_unsent(self, when: str) -> None:
        if self._unsent:
            logger.warning(
                "%d run(s) not sent %s of broker %s (recorded as failed; they do not count "
                "toward pause_after_failures)",
                self._unsent,
                when,
                self._masked,
            )
        self._unsent = 0

    def _broker_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._last_error = describe_error(exc)
        if self._outage_since is None:
            self._outage_since = now
            self._outage_at = _utcnow()
            self._backoff = _BACKOFF_FIRST
            # A connection that went stale in the outage may fail once more just after it:
            # that is the same outage, not a new one worth an ERROR.
            flap = self._recovered_at is not None and now - self._recovered_at < _FLAP
            logger.log(
                logging.WARNING if flap else logging.ERROR,
                "broker %s unreachable (%s): runs due meanwhile are recorded as failed; "
                "reconnecting with backoff",
                self._masked,
                self._last_error,
            )
        else:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self._retry_at = now + self._backoff

    def _broker_ok(self) -> None:
        if self._outage_since is None:
            return
        logger.warning(
            "broker %s reachable again after %.1fs",
            self._masked,
            time.monotonic() - self._outage_since,
        )
        self._log_unsent("during the outage")
        self._unsent_at = 0.0
        self._outage_since = None
        self._outage_at = None
        self._recovered_at = time.monotonic()
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

    # ------------------------------------------------------------------ events

    async def _read_events(self) -> None:
        assert self._redis is not None
        client = self._redis
        group_ready = False
        caught_up = False
        reread_at = time.monotonic() + _REREAD_EVERY
        while not self._closing:
            try:
                if self._outage_since is not None and time.monotonic() < self._retry_at:
                    await asyncio.sleep(min(self._poll, self._retry_at - time.monotonic()))
                    continue
                if not self._lease.usable():
                    # The outcomes belong to whichever dispatcher holds the lease (and, in a
                    # cluster, leads it): a deposed one leaves them pending for its successor.
                    caught_up = False
                    await asyncio.sleep(self._poll)
                    continue
                if time.monotonic() >= reread_at:
                    # Our own pending entries (id 0) again now and then, as after an error:
                    # a reply lost without an error we saw must not strand an outcome.
                    caught_up = False
                    reread_at = time.monotonic() + _REREAD_EVERY
                if not group_ready:
                    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                        await client.xgroup_create(EVENTS_STREAM, EVENTS_GROUP, "0", mkstream=True)
                    group_ready = True
                response: Any = await client.xreadgroup(
                    EVENTS_GROUP,
                    _CONSUMER,
                    {EVENTS_STREAM: ">" if caught_up else "0"},
                    count=_BATCH,
                    block=1000 if caught_up else None,
                )
                self._broker_ok()
                entries = _stream_entries(response)
                if not entries:
                    caught_up = True
                    continue
                if not await self._apply(entries):
                    caught_up = False  # re-read what was not acknowledged
                    await asyncio.sleep(1.0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The broker lost the stream (a restart without persistence): start over.
                group_ready = caught_up = False
            except (RedisError, OSError) as exc:
                # The reply of a read may have been lost with the connection (its entries are
                # then pending for us, never delivered), or an acknowledgement may have
                # failed: read our own pending entries again first (applying is idempotent).
                caught_up = False
                self._broker_failed(exc)

    async def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> bool:
        """Deliver a batch, then acknowledge what was applied: to an inbox with
        ``deliver_batch`` (the ledger: one commit) whole, else each run's events in order."""
        assert self._redis is not None
        assert self._inbox is not None
        inbox = self._inbox
        done, batch = _decode_events(entries)
        by_run: dict[str, list[tuple[bytes, RunEvent]]] = {}
        for entry_id, event in batch:
            by_run.setdefault(event.run_id, []).append((entry_id, event))

        def delivered(entry_id: bytes, event: RunEvent) -> None:
            done.append(entry_id)
            _track(self._runs, event)

        async def deliver(items: list[tuple[bytes, RunEvent]]) -> None:
            for entry_id, event in items:
                await inbox.deliver(event)
                delivered(entry_id, event)

        async def deliver_batch(
            deliver_all: Callable[[list[RunEvent]], Awaitable[None]],
            items: list[tuple[bytes, RunEvent]],
        ) -> None:
            await deliver_all([event for _, event in items])
            for entry_id, event in items:
                delivered(entry_id, event)

        deliver_all = getattr(inbox, "deliver_batch", None)
        jobs = (
            [deliver_batch(deliver_all, batch)]
            if deliver_all is not None and batch
            else [deliver(items) for items in by_run.values()]
        )
        results = await asyncio.gather(*jobs, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for failure in failed:
            logger.error("run events not applied yet (will retry): %s", describe_error(failure))
        if done:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(EVENTS_STREAM, EVENTS_GROUP, *done)
                pipe.xdel(EVENTS_STREAM, *done)
                await pipe.execute()
        return not failed

    # ------------------------------------------------------------------ claims

    async def _watch_runs(self) -> None:
        assert self._redis is not None
        while not self._closing:
            await asyncio.sleep(self._poll)
            if self._outage_since is not None and time.monotonic() < self._retry_at:
                continue
            try:
                if self._outage_since is not None:
                    await self._redis.ping()
                    self._broker_ok()
                if not self._lease.leading() or not await self._lease.renew():
                    continue
                await self._check_epoch()
                await self._check_runs()
                if time.monotonic() - self._workers_at >= _WORKERS_EVERY:
                    await self._refresh_workers()
            except (RedisError, OSError) as exc:
                self._broker_failed(exc)
            except Exception:
                # Keep watching: a run stuck open forever is worse than a logged bug.
                logger.exception("celery run backend: checking runs failed")

    async def _check_epoch(self) -> None:
        """Notice a broker that lost its data: unstarted runs' messages went with it."""
        assert self._redis is not None
        if await self._redis.set(EPOCH_KEY, self._epoch, nx=True):
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
        assert self._redis is not None
        runs = [run for run in self._runs.values() if not run.verdict]
        for start in range(0, len(runs), _BATCH):
            chunk = runs[start : start + _BATCH]
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
        assert self._redis is not None
        now = time.monotonic()
        due: dict[str, list[_OpenRun]] = {}
        for run in self._runs.values():
            if (
                run.verdict
                or run.claimed
                or run.state != "queued"
                or run.orphan_since is not None
                or now - run.sent_at < self.resend_after
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
                    await asyncio.to_thread(self._publish, run, queue)
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

    async def _judge(self, run: _OpenRun, claim: bytes | None, alive: bool) -> None:
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
                if await self._mark(run, "", RunEventKind.LOST, None, error):
                    logger.info(
                        "run %s of task %s (account %s) lost with the broker's data",
                        request.run_id,
                        request.task_id,
                        request.account_id,
                    )
                return
            if run.deadline is not None and _utcnow() >= run.deadline:
                waited = (run.deadline - request.submitted_at).total_seconds()
                serving = sorted(
                    name for name, types in self._workers.items() if request.sys_type in types
                )
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
                if await self._mark(run, "", RunEventKind.EXPIRED, None, error):
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
            f"{self.lost_after:g}s); the run is not retried"
        )
        if await self._mark(run, claim.decode(), RunEventKind.LOST, worker, error):
            logger.info(
                "run %s of task %s (account %s) lost: worker %s stopped sending heartbeats",
                request.run_id,
                request.task_id,
                request.account_id,
                worker,
            )

    async def _mark(
        self,
        run: _OpenRun,
        expected: str,
        kind: RunEventKind,
        worker: str | None,
        error: str,
    ) -> bool:
        """Record the dispatcher's verdict in Redis, atomically against the workers."""
        assert self._redis is not None
        request = run.request
        now = _utcnow()
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

    async def _refresh_workers(self) -> None:
        assert self._redis is not None
        self._workers_at = time.monotonic()
        keys = [key async for key in self._redis.scan_iter(match=WORKER_PREFIX + "*", count=200)]
        workers: dict[str, list[str]] = {}
        if keys:
            for raw in await self._redis.mget(keys):
                if raw is None:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    info = json.loads(raw)
                    workers[str(info["worker"])] = [str(s) for s in info["sys_types"]]
        self._workers = workers
        waiting = self._waiting()
        unserved = {sys_type for sys_type, entry in waiting.items() if not entry["workers"]}
        for sys_type in sorted(unserved - self._unserved):
            logger.warning(
                "%d run(s) of sys_type %r wait in queue %s: no worker for it is registered "
                "(start one: task-dispatcher worker --sys-type %s)%s",
                waiting[sys_type]["runs"],
                sys_type,
                queue_name(sys_type),
                sys_type,
                ""
                if self.start_timeout is None
                else f"; they expire {self.start_timeout:g}s after they were sent",
            )
        for sys_type in sorted(self._unserved - unserved):
            logger.info("sys_type %r: a worker is registered again", sys_type)
        self._unserved = unserved
