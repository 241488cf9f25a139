"""The fleet: runs executed on worker machines chosen by ``sys_type``, through Celery and Redis.

The dispatcher's side is :class:`~scheduler.fleet.backend.CeleryRunBackend` (``backend``) over
its parts: ``lease`` (one dispatcher per broker), ``outage`` (the broker's reachability),
``publish`` (sending run messages), ``stream`` (reading the run events), ``watch`` (runs nobody
started, silent workers, messages to send again), ``roster`` (the live workers) and
``openruns`` (the runs in flight). The worker's side is ``worker`` (the Celery app, also at its
documented path ``scheduler.worker``). ``cli`` holds ``task-dispatcher worker`` and the broker
options of ``run``. ``wire`` is what both sides agree on (queue names, Redis keys, scripts,
messages); this package re-exports it.

Importing this package (or ``wire``, or ``cli``) needs neither Celery nor redis; the other
modules need the ``celery`` extra.
"""

from scheduler.fleet.wire import (
    ALIVE_PREFIX,
    ALLOW_NON_DURABLE_ENV_VAR,
    BROKER_ENV_VAR,
    CLAIM_PREFIX,
    CLAIM_SCRIPT,
    CLAIM_TTL,
    EPOCH_KEY,
    EVENTS_GROUP,
    EVENTS_STREAM,
    FACTORY_ENV_VAR,
    FIND_QUEUED_SCRIPT,
    FINISH_SCRIPT,
    HEARTBEAT_SCRIPT,
    LEASE_KEY,
    LEASE_RELEASE_SCRIPT,
    LEASE_SCRIPT,
    MARK_SCRIPT,
    MESSAGE_FORMAT,
    QUEUE_PREFIX,
    TASK_NAME,
    WORKER_PREFIX,
    alive_key,
    broker_durability,
    check_broker_url,
    claim_key,
    dumps,
    mask_url,
    queue_name,
    worker_name,
)

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
    "queue_name",
    "worker_name",
]
