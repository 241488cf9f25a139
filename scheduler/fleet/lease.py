"""``BrokerLease``: the one dispatcher's lease on a Redis database (``td:dispatcher``).

One dispatcher per database: the event stream and its consumer group belong to it. The lease
names its holder (host, pid, directory, and in a cluster the cluster and fencing epoch), is
renewed at every poll and outlives its last renewal by 15 s. A predecessor that is gone (this
host's process that had our directory, or one that no longer exists) and, in a cluster, the
holder of an older epoch are replaced at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scheduler.fleet.openruns import utcnow
from scheduler.fleet.wire import LEASE_KEY, LEASE_RELEASE_SCRIPT, LEASE_SCRIPT, dumps
from tasks.errors import BrokerInUseError
from tasks.runs import RunInbox

__all__ = ["BrokerLease"]

logger = logging.getLogger("scheduler.backends.celery")  # the backend's log, as it always was

_LEASE_TTL = 15.0
"""Seconds the dispatcher's lease on the database outlives its last renewal (renewed at every
poll): how long a dispatcher that died (elsewhere) keeps another one out."""


class _Fencing(Protocol):
    """The lease of a shared store, as the backend reads it (see
    :class:`scheduler.leadership.LeaseView`)."""

    cluster: str

    @property
    def epoch(self) -> int | None: ...

    def is_leader_now(self) -> bool: ...


class BrokerLease:
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
            "since": utcnow().isoformat(timespec="seconds"),
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
