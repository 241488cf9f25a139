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

from scheduler.fleet import wire
from scheduler.fleet.wire import *  # noqa: F403  (the names both sides agree on, listed in wire.__all__)

__all__ = list(wire.__all__)
