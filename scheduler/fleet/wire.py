"""What the dispatcher and its workers agree on: queue names, Redis keys, scripts, messages.

Imports neither Celery nor redis, so the dispatcher, the worker and the CLI share these names
without the ``celery`` extra being installed.

Who writes what (``S`` a sys_type, ``R`` a run id):

- queue ``td.sys.S``: the Celery message of a run of a task with sys_type ``S`` (JSON, with
  its :data:`MESSAGE_FORMAT`).
- ``td:claim:R``: the run's claim. A worker takes it with ``SET NX`` before executing (so one
  worker at most executes a run, however often its message is delivered); the dispatcher takes
  it with an ``expired`` marker when nobody started the run by its deadline, or turns a silent
  worker's claim into ``lost``. It outlives any redelivery (:data:`CLAIM_TTL`).
- ``td:alive:R``: the executing worker's heartbeat, a key renewed while the run executes and
  left to expire if the worker dies.
- stream ``td:events``: the run events (``started``, ``succeeded``, ``failed``, ``lost``,
  ``expired``) in the order they happened, read by the dispatcher through the consumer group
  ``dispatcher`` and acknowledged only once applied durably.
- ``td:worker:NAME``: a live worker's sys_types (renewed while the worker runs).
- ``td:epoch``: a token the dispatcher sets; its disappearance means Redis lost its data.
- ``td:dispatcher``: the lease of the one dispatcher that uses this database (who it is:
  host, pid, directory; in a cluster its name and the fencing epoch it leads in), renewed
  while it runs and left to expire if it dies; a leader of a newer epoch of the same cluster
  replaces it at once.

Each state change of a run is one Lua script: taking a claim and announcing ``started`` happen
together or not at all, as do recording an outcome and releasing the heartbeat.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tasks.errors import BrokerNotDurableError

__all__ = [
    "ALIVE_PREFIX",
    "ALLOW_NON_DURABLE_ENV_VAR",
    "BROKER_ENV_VAR",
    "CLAIM_PREFIX",
    "CLAIM_SCRIPT",
    "CLAIM_TTL",
    "EPOCH_KEY",
    "EVENTS_GROUP",
    "EVENTS_STREAM",
    "FACTORY_ENV_VAR",
    "FIND_QUEUED_SCRIPT",
    "FINISH_SCRIPT",
    "HEARTBEAT_SCRIPT",
    "LEASE_KEY",
    "LEASE_RELEASE_SCRIPT",
    "LEASE_SCRIPT",
    "MARK_SCRIPT",
    "MESSAGE_FORMAT",
    "QUEUE_PREFIX",
    "TASK_NAME",
    "WORKER_PREFIX",
    "alive_key",
    "broker_durability",
    "check_broker_url",
    "claim_key",
    "dumps",
    "mask_url",
    "not_durable",
    "queue_name",
    "worker_name",
]

TASK_NAME = "task_dispatcher.run"
"""The Celery task name of a run (stable: queued messages name it)."""
QUEUE_PREFIX = "td.sys."
"""The queue of sys_type ``S`` is ``td.sys.S``."""
CLAIM_PREFIX = "td:claim:"
ALIVE_PREFIX = "td:alive:"
WORKER_PREFIX = "td:worker:"
EVENTS_STREAM = "td:events"
EPOCH_KEY = "td:epoch"
"""Set once by the dispatcher: if it vanishes, the broker lost its data (a restart without
persistence) and with it the messages of runs not started yet."""
EVENTS_GROUP = "dispatcher"
LEASE_KEY = "td:dispatcher"
"""The running dispatcher's lease on this database (JSON: id, host, pid, directory, since;
and cluster, epoch for a dispatcher of a cluster)."""
CLAIM_TTL = 7 * 24 * 3600
"""Seconds a claim is kept: far longer than any redelivery of a run's message."""

BROKER_ENV_VAR = "TASK_DISPATCHER_BROKER"
"""The broker URL when ``--broker`` is not given."""
FACTORY_ENV_VAR = "TASK_DISPATCHER_FACTORY"
"""A worker's ``module:attr`` manager factory when ``--factory`` is not given."""
ALLOW_NON_DURABLE_ENV_VAR = "TASK_DISPATCHER_ALLOW_NON_DURABLE_BROKER"
"""Set to 1 to start a worker on a broker whose persistence cannot keep claims across a crash
(``--allow-non-durable-broker``)."""

MESSAGE_FORMAT = 1
"""The format of a run message's payload (its ``format`` field; absent means 1). A worker
refuses a message of another format: dispatcher and workers must run the same release."""

_SYS_TYPE = re.compile(r"[A-Za-z0-9_.\-]+")


def queue_name(sys_type: str) -> str:
    """The Celery queue of ``sys_type`` (``td.sys.<sys_type>``)."""
    if not _SYS_TYPE.fullmatch(sys_type):
        raise ValueError(
            f"sys_type: {sys_type!r} cannot name a queue (use letters, digits, '_', '.', '-')"
        )
    return QUEUE_PREFIX + sys_type


def claim_key(run_id: str) -> str:
    """The Redis key of ``run_id``'s claim."""
    return CLAIM_PREFIX + run_id


def alive_key(run_id: str) -> str:
    """The Redis key of ``run_id``'s heartbeat."""
    return ALIVE_PREFIX + run_id


def worker_name(nodename: str) -> str:
    """The name a worker reports: its ``--hostname`` (Celery's nodename without ``celery@``)."""
    return nodename.removeprefix("celery@")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and health)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable broker URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_broker_url(url: str, field: str = "broker_url") -> str:
    """``url`` if it names a Redis server (``redis://`` or ``rediss://``), else ``ValueError``.

    Claims, heartbeats and outcomes live in Redis beside the queues, so the broker must be one.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"{field}: a Redis URL is required, e.g. redis://host:6379/0")
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss"):
        raise ValueError(
            f"{field}: {mask_url(url)!r} is not a Redis URL (redis:// or rediss://); "
            "runs, claims and outcomes travel through Redis"
        )
    return url


def _version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        numbers.append(int(digits.group()) if digits else 0)
    return tuple(numbers)


def not_durable(problem: str, fix: str) -> BrokerNotDurableError:
    """The error refusing a broker whose persistence cannot keep claims: ``problem``, what
    that risks, and ``fix`` (or the flag that accepts the risk)."""
    return BrokerNotDurableError(
        f"{problem}: a broker crash could lose claims of runs already started, and their "
        f"messages would run them again. {fix}, or start the worker with "
        f"--allow-non-durable-broker (${ALLOW_NON_DURABLE_ENV_VAR}=1) to accept that"
    )


def broker_durability(version: str, settings: Mapping[str, str | None]) -> str:
    """How a worker makes each claim durable on a Redis ``version`` with ``settings``.

    ``settings`` maps ``appendonly``, ``appendfsync`` and ``maxmemory-policy`` to their values
    (None: unknown, e.g. ``CONFIG`` is disabled). Returns ``"waitaof"`` (Redis >= 7.2 with the
    append-only file: the worker waits for its claim to reach the disk with ``WAITAOF``) or
    ``"fsync"`` (``appendfsync always``: Redis answers only once a write is on disk). With
    ``appendfsync`` unknown on Redis >= 7.2, the worker's first ``WAITAOF`` (see
    :func:`scheduler.fleet.worker.check_durability`) tells.

    Raises :class:`BrokerNotDurableError` naming the setting that breaks "at most once": a
    claim lost in a broker crash (not yet on disk, or evicted) lets a redelivered message
    execute the run a second time.
    """

    def known(name: str) -> str:
        value = settings.get(name)
        if value is None:
            raise not_durable(
                f"cannot read the broker's {name} (CONFIG GET disabled?)",
                "Check appendonly yes, appendfsync always (or Redis >= 7.2) and "
                "maxmemory-policy noeviction yourself",
            )
        return value.strip().lower()

    if known("appendonly") != "yes":
        raise not_durable(
            "the broker runs without its append-only file (appendonly no)",
            "Set appendonly yes and appendfsync always in redis.conf",
        )
    policy = known("maxmemory-policy")
    if policy != "noeviction":
        raise not_durable(
            f"the broker may evict keys (maxmemory-policy {policy})",
            "Set maxmemory-policy noeviction",
        )
    if _version(version) >= (7, 2):
        if (settings.get("appendfsync") or "").strip().lower() == "no":
            raise not_durable(
                "the broker leaves its append-only file to the kernel (appendfsync no), so "
                "WAITAOF never confirms a claim",
                "Set appendfsync everysec or always",
            )
        return "waitaof"
    fsync = known("appendfsync")
    if fsync != "always":
        raise not_durable(
            f"the broker writes its append-only file to disk with appendfsync {fsync} "
            f"(and Redis {version} has no WAITAOF)",
            "Set appendfsync always (or use Redis >= 7.2)",
        )
    return "fsync"


def dumps(value: Any) -> str:
    """Compact JSON for values stored in Redis."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# KEYS: claim, alive, events. ARGV: claim value, claim ttl (s), alive ttl (ms), started event.
# Returns 1 when the claim was taken, else the claim's current value. A claim that already holds
# ARGV[1] was taken by the same attempt on a connection that broke before its reply: it is
# taken, and written again (its heartbeat too, which may have run out meanwhile) so that a
# WAITAOF on this connection waits for it to reach the disk.
CLAIM_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
  redis.call('XADD', KEYS[3], '*', 'event', ARGV[4])
  return 1
end
if current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
  return 1
end
return current
"""

# KEYS: claim, alive. ARGV: claim value, claim ttl (s), alive ttl (ms).
# Renews the heartbeat; re-creates the claim if the broker lost it (a restart without
# persistence). Returns 1 while the claim is ours, else its current value.
HEARTBEAT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  return current
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return 1
"""

# KEYS: claim, alive, events. ARGV: our claim value, the done value, claim ttl, event JSON.
# Records the outcome if the claim is still ours (or was lost with the broker's data);
# returns 1 if it was recorded, else the claim's current value.
FINISH_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return current
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'event', ARGV[4])
return 1
"""

# The dispatcher's verdicts. KEYS: claim, alive, events. ARGV: expected claim value ('' for
# none), new claim value, claim ttl, event JSON. Takes effect only if the claim still holds the
# expected value and, for a claimed run, its heartbeat is gone: a worker that claimed the run
# or renewed its heartbeat in the meantime wins. Returns 1 if it took effect.
MARK_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then return 0 end
else
  if current ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('XADD', KEYS[3], '*', 'event', ARGV[4])
return 1
"""

# The dispatcher's lease. KEYS: lease. ARGV: our value, ttl (ms), a holder's value we may
# replace ('' for none: a dead predecessor of ours). Returns 1 if the lease is ours (taken or
# renewed), else the holder's value.
LEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and current ~= ARGV[3] then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: our value. Gives the lease back if it is still ours.
LEASE_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: a queue (a Redis list of Celery messages). ARGV: run ids. Returns those whose message
# waits in the queue (a message's task id is the first "id" of its headers). One pass over the
# queue whatever the number of ids.
FIND_QUEUED_SCRIPT = """
local wanted = {}
for _, id in ipairs(ARGV) do wanted[id] = true end
local found = {}
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local id = string.match(item, '"id": "([^"]*)"')
  if id and wanted[id] then
    table.insert(found, id)
    wanted[id] = nil
  end
end
return found
"""
