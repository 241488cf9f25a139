"""The fleet's worker side: the Celery app and what a worker does with one run.

A worker consumes the queues ``td.sys.<S>`` of its sys_types. For each run message it takes
the run's claim in Redis (``SET NX``: a run executes at most once, however often its message is
delivered), announces ``started``, keeps a heartbeat while the manager runs, and records the
outcome in the ``td:events`` stream, which the dispatcher reads. The manager is re-created from
the message as ``factory(sys_type=sys_type, **kwargs)``.

Start one with ``task-dispatcher worker --broker URL --sys-type S``, or with Celery's own
command on this module's :data:`app`::

    TASK_DISPATCHER_BROKER=redis://host:6379/0 celery -A scheduler.worker worker -Q td.sys.S
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery, signals

from scheduler.backends.local import call_manager, create_manager
from scheduler.fleet import (
    BROKER_ENV_VAR,
    CLAIM_SCRIPT,
    CLAIM_TTL,
    EVENTS_STREAM,
    FACTORY_ENV_VAR,
    FINISH_SCRIPT,
    HEARTBEAT_SCRIPT,
    QUEUE_PREFIX,
    TASK_NAME,
    WORKER_PREFIX,
    alive_key,
    claim_key,
    dumps,
    mask_url,
    worker_name,
)
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.registry import default_registry
from tasks.runs import (
    TIMED_OUT,
    RunEvent,
    RunEventKind,
    RunRequest,
    describe_error,
    timed_out_error,
)

__all__ = ["app", "execute_run", "load_factory", "make_app"]

logger = logging.getLogger(__name__)

_OUTCOME_PATIENCE = 3600.0
"""Seconds a worker keeps trying to record an outcome while the broker is unreachable."""
_REGISTRATION_TTL = 30
"""Seconds a worker's registration outlives its last renewal."""


def make_app(broker_url: str | None, *, visibility_timeout: float | None = None) -> Celery:
    """A Celery app for the fleet: JSON only, no results, late acknowledgement.

    Late acknowledgement means a message is redelivered if a worker dies before it finishes;
    the run's claim turns every redelivery after the first start into a no-op, so a run is
    never lost to a dying worker before it starts and never executed twice.
    """
    app = Celery("task_dispatcher", broker=broker_url, set_as_current=False)
    transport: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 15}
    if visibility_timeout is not None:
        transport["visibility_timeout"] = visibility_timeout
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        task_reject_on_worker_lost=False,
        task_create_missing_queues=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=True,
    )
    return app


app = make_app(os.environ.get(BROKER_ENV_VAR) or None)
"""The worker's Celery app (``celery -A scheduler.worker``); its broker is
``$TASK_DISPATCHER_BROKER``."""


# ---------------------------------------------------------------------- per-process state


def load_factory(spec: str | None) -> TaskManagerFactory:
    """The manager factory named ``module:attr``; None: the task-type registry."""
    if not spec:
        import tasks.shell  # noqa: F401  (registers the built-in shell type)

        return default_registry
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"factory: {spec!r} is not module:attr, e.g. myapp.tasks:TaskManager")
    try:
        factory = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"factory: cannot load {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ValueError(f"factory: {spec!r} is not callable")
    result: TaskManagerFactory = factory
    return result


class _ProcessState:
    """The Redis client and the factory of this process (re-made after a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._client: redis.Redis | None = None
        self._factory: TaskManagerFactory | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._client = None
            self._factory = None

    def client(self) -> redis.Redis:
        with self._lock:
            self._check_pid()
            if self._client is None:
                url = app.conf.broker_url or os.environ.get(BROKER_ENV_VAR)
                if not url:
                    raise RuntimeError(f"no broker: set ${BROKER_ENV_VAR} or pass --broker")
                self._client = redis.Redis.from_url(
                    url, socket_connect_timeout=5, socket_timeout=15, health_check_interval=30
                )
            return self._client

    def factory(self) -> TaskManagerFactory:
        with self._lock:
            self._check_pid()
            if self._factory is None:
                self._factory = load_factory(os.environ.get(FACTORY_ENV_VAR))
            return self._factory


_state = _ProcessState()


# ---------------------------------------------------------------------- one run


def _now() -> datetime:
    return datetime.now(UTC)


def _event(event: RunEvent) -> str:
    return dumps(event.to_json())


class _Heartbeat:
    """Renews a run's heartbeat (and, if the broker lost it, its claim) until stopped."""

    def __init__(
        self, client: redis.Redis, run_id: str, claim: str, interval: float, ttl_ms: int
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._claim = claim
        self._interval = interval
        self._ttl_ms = ttl_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"td-heartbeat-{run_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        keys = [claim_key(self._run_id), alive_key(self._run_id)]
        failing = False
        while not self._stop.wait(self._interval):
            try:
                result = self._client.eval(
                    HEARTBEAT_SCRIPT, 2, *keys, self._claim, CLAIM_TTL, self._ttl_ms
                )
            except redis.RedisError as exc:
                if not failing:
                    logger.warning(
                        "run %s: heartbeat failed, retrying (broker unreachable?): %s",
                        self._run_id,
                        exc,
                    )
                failing = True
                continue
            if failing:
                logger.info("run %s: heartbeat restored", self._run_id)
                failing = False
            if result != 1:
                logger.warning(
                    "run %s: the dispatcher no longer counts on this run (claim: %s); "
                    "it finishes here but its outcome will not be recorded",
                    self._run_id,
                    result,
                )
                return


def _record_outcome(client: redis.Redis, run_id: str, claim: str, done: str, event: str) -> Any:
    """Run the finish script, retrying while the broker is unreachable (bounded)."""
    keys = [claim_key(run_id), alive_key(run_id), EVENTS_STREAM]
    deadline = time.monotonic() + _OUTCOME_PATIENCE
    delay = 0.2
    while True:
        try:
            return client.eval(FINISH_SCRIPT, 3, *keys, claim, done, CLAIM_TTL, event)
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning(
                "run %s: cannot record its outcome yet (retrying in %.1fs): %s",
                run_id,
                delay,
                exc,
            )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def execute_run(payload: Mapping[str, Any], nodename: str) -> str:
    """Execute one run message at most once; returns what happened (for logs and tests).

    ``payload`` holds the run request (``request``), the heartbeat interval in seconds
    (``heartbeat``) and how long a heartbeat lasts (``alive_ms``).
    """
    request = RunRequest.from_json(payload["request"])
    interval = float(payload.get("heartbeat", 5.0))
    alive_ms = int(payload.get("alive_ms", 15000))
    name = worker_name(nodename)
    client = _state.client()
    started = _now()
    claim = dumps({"state": "running", "worker": name, "at": started.isoformat()})
    announced = RunEvent(
        request.run_id, request.task_id, RunEventKind.STARTED, at=started, worker=name
    )
    taken = client.eval(
        CLAIM_SCRIPT,
        3,
        claim_key(request.run_id),
        alive_key(request.run_id),
        EVENTS_STREAM,
        claim,
        CLAIM_TTL,
        alive_ms,
        _event(announced),
    )
    if taken != 1:
        holder = taken.decode() if isinstance(taken, bytes) else taken
        logger.info(
            "run %s of task %s not executed here: already claimed (%s)",
            request.run_id,
            request.task_id,
            holder,
        )
        return "skipped"
    logger.info(
        "run %s of task %s (account %s, %s) started on %s",
        request.run_id,
        request.task_id,
        request.account_id,
        request.task_type,
        name,
    )
    error: str | None = None
    extra: dict[str, Any] = {}
    with _Heartbeat(client, request.run_id, claim, interval, alive_ms):
        try:
            manager = create_manager(_state.factory(), request.sys_type, request.kwargs)
            _run_bounded(manager, request.timeout)
        except TimeoutError:
            assert request.timeout is not None
            error, extra[TIMED_OUT] = timed_out_error(request.timeout), request.timeout
        except Exception as exc:
            error = describe_error(exc)
    finished = _now()
    kind = RunEventKind.SUCCEEDED if error is None else RunEventKind.FAILED
    outcome = RunEvent(
        request.run_id,
        request.task_id,
        kind,
        at=finished,
        worker=name,
        error=error,
        started_at=started,
        extra=extra,
    )
    done = dumps({"state": kind.value, "worker": name, "at": finished.isoformat()})
    recorded = _record_outcome(client, request.run_id, claim, done, _event(outcome))
    seconds = (finished - started).total_seconds()
    if recorded != 1:
        logger.warning(
            "run %s of task %s %s after %.3fs, too late: the dispatcher had declared it %s",
            request.run_id,
            request.task_id,
            kind.value,
            seconds,
            recorded,
        )
    elif error is None:
        logger.info(
            "run %s of task %s succeeded in %.3fs", request.run_id, request.task_id, seconds
        )
    else:
        logger.warning(
            "run %s of task %s failed after %.3fs: %s",
            request.run_id,
            request.task_id,
            seconds,
            error,
        )
    return kind.value


def _run_bounded(manager: TaskManager, timeout: float | None) -> None:
    """Run ``manager`` on a loop of its own; raise ``TimeoutError`` once ``timeout`` passes.

    An async manager is cancelled (the shell type kills its process group). A sync one runs
    in a thread that cannot be stopped: the timeout is reported at once and the thread is left
    to return on its own (this worker slot stays busy until it does, as the local backend's
    lane does).
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(call_manager(manager), timeout))
    finally:
        if timeout is None:
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


@app.task(name=TASK_NAME, bind=True, ignore_result=True)
def run_task(self: Any, payload: dict[str, Any]) -> str:
    """The Celery task: one run of one dispatcher task."""
    return execute_run(payload, str(self.request.hostname or ""))


# ---------------------------------------------------------------------- registration


class _Registration:
    """Keeps ``td:worker:<name>`` alive while this worker consumes: who serves which sys_type."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._key = ""

    def start(self, nodename: str, sys_types: list[str]) -> None:
        name = worker_name(nodename)
        self._key = WORKER_PREFIX + name
        value = dumps({"worker": name, "sys_types": sys_types, "pid": os.getpid()})
        client = _state.client()

        def renew() -> None:
            while True:
                try:
                    client.set(self._key, value, ex=_REGISTRATION_TTL)
                except redis.RedisError as exc:
                    logger.debug("worker registration not renewed: %s", exc)
                if self._stop.wait(_REGISTRATION_TTL / 3):
                    return

        self._thread = threading.Thread(target=renew, name="td-registration", daemon=True)
        self._thread.start()
        logger.info(
            "worker %s serves sys_type(s) %s on %s",
            name,
            ", ".join(sys_types) or "(none)",
            mask_url(str(app.conf.broker_url)),
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                _state.client().delete(self._key)


_registration = _Registration()


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    if sender is None or sender.app is not app:
        return
    queues = sender.app.amqp.queues.consume_from or {}
    sys_types = sorted(
        name.removeprefix(QUEUE_PREFIX) for name in queues if name.startswith(QUEUE_PREFIX)
    )
    _registration.start(str(sender.hostname), sys_types)


@signals.worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    _registration.stop()
