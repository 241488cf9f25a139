"""``EventStreamReader``: the workers' run events, read from Redis into the dispatcher's inbox.

Workers append ``started``, ``succeeded`` and ``failed`` (and the backend its verdicts) to the
``td:events`` stream. The reader reads it through a consumer group with a fixed consumer name,
so a restarted dispatcher reads its predecessor's unacknowledged entries first, delivers each
batch to the inbox (the ledger: one commit) and acknowledges (and deletes) only what the inbox
made durable. After an error, a batch not applied, or now and then, it reads its own pending
entries again (applying is idempotent). Only the dispatcher holding the broker's lease (and,
in a cluster, leading) reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from scheduler.fleet.lease import BrokerLease
from scheduler.fleet.openruns import OpenRun, track
from scheduler.fleet.outage import BrokerOutage
from scheduler.fleet.wire import EVENTS_GROUP, EVENTS_STREAM
from tasks.runs import RunEvent, RunInbox, describe_error

__all__ = ["EventStreamReader"]

logger = logging.getLogger("scheduler.backends.celery")  # the backend's log, as it always was

_CONSUMER = "dispatcher"
"""The stream consumer name: fixed, so a restarted dispatcher reads its predecessor's
unacknowledged events first."""
BATCH = 500
"""Entries read (and runs checked) at a time."""
_REREAD_EVERY = 10.0
"""Seconds between re-reads of the dispatcher's own pending stream entries."""


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


class EventStreamReader:
    """Reads the event stream into the inbox until ``closing()`` (see the module)."""

    def __init__(
        self,
        client: aioredis.Redis,
        inbox: RunInbox,
        runs: dict[str, OpenRun],
        lease: BrokerLease,
        outage: BrokerOutage,
        poll: float,
        closing: Callable[[], bool],
    ) -> None:
        self._redis = client
        self._inbox = inbox
        self._runs = runs
        self._lease = lease
        self._outage = outage
        self._poll = poll
        self._closing = closing

    async def run(self) -> None:
        """Read, deliver and acknowledge until closing."""
        client = self._redis
        outage = self._outage
        group_ready = False
        caught_up = False
        reread_at = time.monotonic() + _REREAD_EVERY
        while not self._closing():
            try:
                if outage.backing_off():
                    await asyncio.sleep(min(self._poll, outage.retry_at - time.monotonic()))
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
                    count=BATCH,
                    block=1000 if caught_up else None,
                )
                outage.ok()
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
                outage.failed(exc)

    async def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> bool:
        """Deliver a batch, then acknowledge what was applied: to an inbox with
        ``deliver_batch`` (the ledger: one commit) whole, else each run's events in order."""
        inbox = self._inbox
        done, batch = _decode_events(entries)
        by_run: dict[str, list[tuple[bytes, RunEvent]]] = {}
        for entry_id, event in batch:
            by_run.setdefault(event.run_id, []).append((entry_id, event))

        def delivered(entry_id: bytes, event: RunEvent) -> None:
            done.append(entry_id)
            track(self._runs, event)

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
