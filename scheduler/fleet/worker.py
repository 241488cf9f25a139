"""The fleet's worker side: the Celery app and what a worker does with one run.

A worker consumes the queues ``td.sys.<S>`` of its sys_types. For each run message it takes
the run's claim in Redis (``SET NX``: a run executes at most once, however often its message is
delivered), announces ``started``, keeps a heartbeat while the manager runs, and records the
outcome in the ``td:events`` stream, which the dispatcher reads. The manager is re-created from
the message as ``factory(sys_type=sys_type, **kwargs)``.

At most once holds across a broker crash only if the claim reaches the broker's disk before the
run starts: a worker refuses to start on a broker whose persistence cannot promise that (see
:func:`check_durability`). A run whose claim was taken meanwhile (the dispatcher declared it
lost) or could not be renewed for half of ``lost_after`` is stopped, so an account's runs never
overlap.

Start one with ``task-dispatcher worker --broker URL --sys-type S``, or with Celery's own
command on this module's :data:`app`::

    TASK_DISPATCHER_BROKER=redis://host:6379/0 celery -A scheduler.worker worker -Q td.sys.S
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery, signals

from scheduler.backends.execution import call_manager, create_manager, execute, finished_event
from scheduler.fleet.wire import (
    ALLOW_NON_DURABLE_ENV_VAR,
    BROKER_ENV_VAR,
    CLAIM_PREFIX,
    CLAIM_SCRIPT,
    CLAIM_TTL,
    EVENTS_STREAM,
    FACTORY_ENV_VAR,
    FINISH_SCRIPT,
    HEARTBEAT_SCRIPT,
    MESSAGE_FORMAT,
    QUEUE_PREFIX,
    TASK_NAME,
    WORKER_PREFIX,
    alive_key,
    broker_durability,
    claim_key,
    dumps,
    mask_url,
    not_durable,
    worker_name,
)
from tasks.errors import BrokerNotDurableError
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.registry import default_registry
from tasks.runs import (
    RunEvent,
    RunEventKind,
    RunRequest,
    describe_error,
)

__all__ = ["app", "check_durability", "execute_run", "load_factory", "make_app"]

logger = logging.getLogger("scheduler.worker")  # the worker's log, as it always was

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
    """The manager factory named ``module:attr``; None: the task-type registry.

    The module is looked up on ``sys.path`` (the worker command puts the current directory
    first, as ``celery`` does).
    """
    if not spec:
        import tasks.shell  # noqa: F401  (registers the built-in shell type)

        return default_registry
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"factory: {spec!r} is not module:attr, e.g. myapp.tasks:TaskManager")
    try:
        factory = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"factory: cannot load {spec!r}: {exc} (the module must be importable on this "
            f"worker: from the current directory {os.getcwd()} or $PYTHONPATH)"
        ) from exc
    if not callable(factory):
        raise ValueError(f"factory: {spec!r} is not callable")
    result: TaskManagerFactory = factory
    return result


def check_durability(client: redis.Redis) -> str:
    """How this worker makes its claims durable on ``client``'s server (``"waitaof"`` or
    ``"fsync"``), or ``"unchecked"`` if ``$TASK_DISPATCHER_ALLOW_NON_DURABLE_BROKER`` is set.

    Raises :class:`BrokerNotDurableError` if the server's persistence cannot keep a claim
    across a crash (see :func:`scheduler.fleet.wire.broker_durability`).
    """
    version = str(client.info("server").get("redis_version", "0"))
    settings: dict[str, str | None] = dict.fromkeys(_DURABILITY_SETTINGS)
    try:
        found = client.config_get(*_DURABILITY_SETTINGS)
        settings.update({str(k): str(v) for k, v in found.items()})
    except redis.ResponseError:
        # CONFIG disabled or not permitted: INFO tells all but appendfsync.
        info = {**client.info("persistence"), **client.info("memory")}
        if "aof_enabled" in info:
            settings["appendonly"] = "yes" if str(info["aof_enabled"]) == "1" else "no"
        if "maxmemory_policy" in info:
            settings["maxmemory-policy"] = str(info["maxmemory_policy"])
    try:
        mode = broker_durability(version, settings)
        if mode == "waitaof":
            _probe_fsync(client)
        return mode
    except BrokerNotDurableError:
        if os.environ.get(ALLOW_NON_DURABLE_ENV_VAR, "") not in ("", "0"):
            return "unchecked"
        raise


_PROBE_KEY = "td:durability-probe"
_PROBE_WAIT_MS = 3000


def _probe_fsync(client: redis.Redis) -> None:
    """Write once and ask ``WAITAOF`` for its fsync: a broker whose settings could not all be
    read (``appendfsync`` behind a disabled ``CONFIG``) proves here that it confirms fsyncs."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(_PROBE_KEY, "1", px=60_000)
        pipe.execute_command("WAITAOF", 1, 0, _PROBE_WAIT_MS)  # type: ignore[no-untyped-call]
        _, reply = pipe.execute(raise_on_error=False)
    problem = _not_on_disk(reply, _PROBE_WAIT_MS, "a test key")
    if problem is not None:
        raise not_durable(f"{problem} (appendfsync no?)", "Set appendfsync everysec or always")


def _not_on_disk(reply: Any, wait_ms: int, what: str) -> str | None:
    """What a ``WAITAOF 1 0 wait_ms`` reply says against ``what`` was written before it, or
    None if that is on the broker's disk."""
    if isinstance(reply, Exception):
        return f"the broker refused to confirm that {what} is on disk ({reply})"
    if int(reply[0]) < 1:
        return f"the broker did not write {what} to disk within {wait_ms}ms"
    return None


_DURABILITY_SETTINGS = ("appendonly", "appendfsync", "maxmemory-policy")


class _ProcessState:
    """The Redis client, the factory and the broker's durability in this process (re-made
    after a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._client: redis.Redis | None = None
        self._factory: TaskManagerFactory | None = None
        self._durability: str | None = None
        self._quick: redis.Redis | None = None
        self._quick_timeout = 0.0
        self.beats = _Heartbeats()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._client = None
            self._factory = None
            self._durability = None
            self._quick = None
            self.beats = _Heartbeats()

    def client(self, timeout: float | None = None) -> redis.Redis:
        """This process's client; with ``timeout``, one whose replies wait at most that long
        (kept for the heartbeats, whose patience is short)."""
        with self._lock:
            client = self._client_locked()
            if timeout is None:
                return client
            if self._quick is None or self._quick_timeout > timeout:
                self._quick_timeout = timeout
                self._quick = redis.Redis(
                    connection_pool=redis.ConnectionPool(
                        connection_class=client.connection_pool.connection_class,
                        **{
                            **client.connection_pool.connection_kwargs,
                            "socket_timeout": timeout,
                            "socket_connect_timeout": timeout,
                        },
                    )
                )
            return self._quick

    def _client_locked(self) -> redis.Redis:
        self._check_pid()
        if self._client is None:
            url = app.conf.broker_url or os.environ.get(BROKER_ENV_VAR)
            if not url:
                raise RuntimeError(f"no broker: set ${BROKER_ENV_VAR} or pass --broker")
            self._client = redis.Redis.from_url(
                url, socket_connect_timeout=5, socket_timeout=15, health_check_interval=30
            )
        return self._client

    def durability(self) -> str:
        """The broker's durability mode (checked once per process)."""
        with self._lock:
            client = self._client_locked()
            if self._durability is None:
                self._durability = check_durability(client)
            return self._durability

    def factory(self) -> TaskManagerFactory:
        with self._lock:
            self._check_pid()
            if self._factory is None:
                self._factory = load_factory(os.environ.get(FACTORY_ENV_VAR))
            return self._factory


# ---------------------------------------------------------------------- heartbeats


class _Beat:
    """One executing run's heartbeat, and what to do if the run must stop."""

    __slots__ = ("alive_ms", "claim", "due", "interval", "keys", "last_ok", "patience", "stop")

    def __init__(
        self,
        run_id: str,
        claim: str,
        interval: float,
        alive_ms: int,
        patience: float,
        stop: Callable[[str], None],
    ) -> None:
        self.keys = (claim_key(run_id), alive_key(run_id))
        self.claim = claim
        self.interval = interval
        self.alive_ms = alive_ms
        self.patience = patience
        self.stop: Callable[[str], None] | None = stop
        self.last_ok = time.monotonic()
        self.due = self.last_ok + interval

    def lost(self, reason: str) -> None:
        stop, self.stop = self.stop, None
        if stop is not None:
            stop(reason)


class _Heartbeats:
    """One thread renewing the heartbeats of every run this process executes.

    A run shorter than its heartbeat interval costs no round trip; the due ones are renewed
    together in one pipeline. A run whose claim was taken (the dispatcher declared it lost)
    or that could not renew for its patience (half of ``lost_after``: a partition) is told to
    stop before the dispatcher can give its account's next run to another worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats: dict[str, _Beat] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._until = 0.0
        """When the thread wakes next by itself (0: not waiting for a time it set)."""

    def add(self, run_id: str, beat: _Beat) -> None:
        with self._lock:
            self._beats[run_id] = beat
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="td-heartbeats", daemon=True
                )
                self._thread.start()
            # A run due after the thread's next wake-up is renewed then: no wake-up for it
            # (most runs end before their first renewal).
            wake = not 0.0 < self._until <= beat.due
        if wake:
            self._wake.set()

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._beats.pop(run_id, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                beats = list(self._beats.values())
            now = time.monotonic()
            due = [beat for beat in beats if beat.due <= now]
            if due:
                self._renew(due, now)
            with self._lock:
                upcoming = [beat.due for beat in self._beats.values()]
                self._until = min(upcoming) if upcoming else 0.0
            self._wake.wait(max(0.0, self._until - time.monotonic()) if upcoming else None)
            self._wake.clear()
            with self._lock:
                self._until = 0.0

    def _renew(self, due: list[_Beat], sent: float) -> None:
        # A renewal that hangs (packets dropped) must fail within the runs' patience.
        client = _state.client(timeout=max(0.2, min(beat.patience for beat in due) / 2))
        try:
            with client.pipeline(transaction=False) as pipe:
                for beat in due:
                    _scripts.heartbeat(
                        keys=beat.keys, args=[beat.claim, CLAIM_TTL, beat.alive_ms], client=pipe
                    )
                results = pipe.execute()
        except redis.RedisError as exc:
            if not self._failing:
                logger.warning("heartbeats failed, retrying (broker unreachable?): %s", exc)
                self._failing = True
            now = time.monotonic()
            for beat in due:
                beat.due = now + beat.interval
                if now - beat.last_ok >= beat.patience:
                    beat.lost(
                        f"could not renew its heartbeat for {beat.patience:g}s "
                        f"(broker unreachable: {exc})"
                    )
            return
        if self._failing:
            logger.info("heartbeats restored")
            self._failing = False
        for beat, result in zip(due, results, strict=True):
            beat.due = sent + beat.interval
            if result == 1:
                beat.last_ok = sent
            else:
                beat.lost(f"the dispatcher no longer counts on it (claim: {_text(result)})")


class _Scripts:
    """The fleet's scripts, sent by digest (``EVALSHA``) once Redis knows them."""

    def __init__(self) -> None:
        self._client: redis.Redis | None = None
        self.claim: Any = None
        self.heartbeat: Any = None
        self.finish: Any = None

    def bind(self, client: redis.Redis) -> None:
        if self._client is not client:
            self.claim = client.register_script(CLAIM_SCRIPT)
            self.heartbeat = client.register_script(HEARTBEAT_SCRIPT)
            self.finish = client.register_script(FINISH_SCRIPT)
            self._client = client


_state = _ProcessState()
_scripts = _Scripts()


# ---------------------------------------------------------------------- one run


def _now() -> datetime:
    return datetime.now(UTC)


def _event(event: RunEvent) -> str:
    return dumps(event.to_json())


def _text(value: Any) -> str:
    """A Redis reply for a log line (claims are JSON text, not a bytes repr)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _verdict(claim: Any) -> str:
    """What a claim says of its run, for a log line: ``lost (by the dispatcher)``, ..."""
    text = _text(claim)
    try:
        holder = json.loads(text)
        return f"{holder['state']} (at {holder['at']})"
    except (ValueError, KeyError, TypeError):
        return text


def _record_outcome(client: redis.Redis, run_id: str, claim: str, done: str, event: str) -> Any:
    """Run the finish script, retrying while the broker is unreachable (bounded)."""
    keys = [claim_key(run_id), alive_key(run_id), EVENTS_STREAM]
    deadline = time.monotonic() + _OUTCOME_PATIENCE
    delay = 0.2
    while True:
        try:
            return _scripts.finish(keys=keys, args=[claim, done, CLAIM_TTL, event], client=client)
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


def _refuse_format(payload: Mapping[str, Any], name: str, client: redis.Redis) -> str:
    """A message of another format: never executed; recorded as failed if it can be read."""
    got = payload.get("format")
    error = (
        f"MessageFormatError: the run message has format {got!r}, worker {name} reads format "
        f"{MESSAGE_FORMAT}: the dispatcher and its workers must run the same release"
    )
    try:
        request = RunRequest.from_json(payload["request"])
    except (KeyError, TypeError, ValueError):
        logger.error("refused a run message: %s", error)
        return "refused"
    logger.error("run %s of task %s refused: %s", request.run_id, request.task_id, error)
    now = _now()
    failed = RunEvent(
        request.run_id, request.task_id, RunEventKind.FAILED, at=now, worker=name, error=error
    )
    value = dumps({"state": RunEventKind.FAILED.value, "worker": name, "at": now.isoformat()})
    _scripts.claim(
        keys=[claim_key(request.run_id), alive_key(request.run_id), EVENTS_STREAM],
        args=[value, CLAIM_TTL, 1, _event(failed)],
        client=client,
    )
    return "refused"


_WAITAOF_MAX_MS = 10_000
"""The longest a run waits for its claim's fsync (below the client's 15 s socket timeout)."""


def _claim_on_disk(
    client: redis.Redis, keys: list[str], args: list[Any], wait_ms: int, patience: float
) -> tuple[Any, str | None]:
    """Take a run's claim and wait for it to reach the broker's disk, on one connection (a
    ``WAITAOF`` waits only for the writes of its own connection). Returns the claim script's
    reply and, if the claim was taken but is not known to be on disk, why.

    A broken connection leaves both unknown: the claim is asked for again for up to
    ``patience`` seconds (the script takes this attempt's own claim again, with a write for the
    new connection's ``WAITAOF``); after that the error is raised and the run is not executed.
    """
    deadline = time.monotonic() + patience
    delay = 0.2
    while True:
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.evalsha(_scripts.claim.sha, len(keys), *keys, *args)
                pipe.execute_command("WAITAOF", 1, 0, wait_ms)  # type: ignore[no-untyped-call]
                taken, fsynced = pipe.execute(raise_on_error=False)
            if isinstance(taken, redis.exceptions.NoScriptError) and time.monotonic() < deadline:
                client.script_load(CLAIM_SCRIPT)  # a (re)started broker knows no script yet
                continue
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "claim of run %s: broker unreachable before it confirmed the claim "
                "(retrying in %.1fs): %s",
                keys[0].removeprefix(CLAIM_PREFIX),
                delay,
                exc,
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if isinstance(taken, Exception):
            raise taken
        if taken != 1:
            return taken, None
        return taken, _not_on_disk(fsynced, wait_ms, "the run's claim")


def execute_run(payload: Mapping[str, Any], nodename: str) -> str:
    """Execute one run message at most once; returns what happened (for logs and tests).

    ``payload`` holds the message ``format``, the run request (``request``), the heartbeat
    interval in seconds (``heartbeat``), how long a heartbeat lasts (``alive_ms``) and the
    dispatcher's ``lost_after``.
    """
    name = worker_name(nodename)
    client = _state.client()
    durability = _state.durability()
    _scripts.bind(client)
    if payload.get("format", 1) != MESSAGE_FORMAT:
        return _refuse_format(payload, name, client)
    request = RunRequest.from_json(payload["request"])
    interval = float(payload.get("heartbeat", 5.0))
    alive_ms = int(payload.get("alive_ms", 15000))
    lost_after = float(payload.get("lost_after", interval * 10))
    started = _now()
    claim = dumps({"state": "running", "worker": name, "at": started.isoformat()})
    announced = RunEvent(
        request.run_id, request.task_id, RunEventKind.STARTED, at=started, worker=name
    )
    keys = [claim_key(request.run_id), alive_key(request.run_id), EVENTS_STREAM]
    args = [claim, CLAIM_TTL, alive_ms, _event(announced)]
    error: str | None = None
    if durability == "waitaof":
        # The claim must be on disk before the run executes: a crash that lost it would
        # bring the message back, and the run would execute again.
        wait_ms = min(max(1000, alive_ms), _WAITAOF_MAX_MS)
        taken, problem = _claim_on_disk(client, keys, args, wait_ms, lost_after / 2)
        if problem is not None:
            error = f"BrokerNotDurableError: {problem}; the run was not executed"
    else:
        taken = _scripts.claim(keys=keys, args=args, client=client)
    if taken != 1:
        logger.info(
            "run %s of task %s not executed here: already claimed (%s)",
            request.run_id,
            request.task_id,
            _text(taken),
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
    execution = _Execution(request, name)
    beat = _Beat(request.run_id, claim, interval, alive_ms, lost_after / 2, execution.stop)
    _state.beats.add(request.run_id, beat)
    try:
        if error is None:
            manager = create_manager(_state.factory(), request.sys_type, request.kwargs)
            outcome = execution.run(manager, started)
        else:
            outcome = finished_event(request, error, started=started, worker=name, at=_now())
    except Exception as exc:
        outcome = finished_event(
            request, describe_error(exc), started=started, worker=name, at=_now()
        )
    finally:
        _state.beats.remove(request.run_id)
    finished, kind, error = outcome.at, outcome.kind, outcome.error
    done = dumps({"state": kind.value, "worker": name, "at": finished.isoformat()})
    recorded = _record_outcome(client, request.run_id, claim, done, _event(outcome))
    seconds = (finished - started).total_seconds()
    if recorded != 1:
        logger.warning(
            "run %s of task %s %s after %.3fs, too late: the dispatcher had declared it "
            "%s; this outcome is dropped",
            request.run_id,
            request.task_id,
            "stopped" if execution.stopped else kind.value,
            seconds,
            _verdict(recorded),
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


_loops = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop, kept for its next runs (a pool thread runs one at a time)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed() or getattr(_loops, "pid", None) != os.getpid():
        loop = asyncio.new_event_loop()
        _loops.loop, _loops.pid = loop, os.getpid()
    return loop


class _Execution:
    """Runs one manager in the calling thread; :meth:`stop` (any thread) cuts it off.

    An async manager runs on this thread's event loop and is cancelled when stopped (the
    shell type then kills its process group). A sync one cannot be stopped: it is reported
    and this worker slot stays taken until it returns (its outcome is dropped).
    """

    def __init__(self, request: RunRequest, worker: str) -> None:
        self._request = request
        self._worker = worker
        self._lock = threading.Lock()
        self._cancel: Callable[[], object] | None = None
        self._stoppable = False
        """Whether the manager's call runs on the loop (a coroutine, or an awaitable its
        ``run()`` returned), where it can be cancelled."""
        self.stopped: str | None = None

    def stop(self, reason: str) -> None:
        with self._lock:
            self.stopped = reason
            cancel = self._cancel if self._stoppable else None
        request = self._request
        if cancel is not None:
            logger.error(
                "run %s of task %s (account %s) stopped on %s: it %s",
                request.run_id,
                request.task_id,
                request.account_id,
                self._worker,
                reason,
            )
            cancel()
            return
        logger.error(
            "run %s of task %s (account %s) on %s %s, but its manager runs in a thread, which "
            "cannot be stopped: this worker slot stays taken until it returns, and its "
            "outcome will be dropped",
            request.run_id,
            request.task_id,
            request.account_id,
            self._worker,
            reason,
        )

    def run(self, manager: TaskManager, started: datetime) -> RunEvent:
        """Execute the run with ``manager`` on this thread's event loop (see
        :func:`~scheduler.backends.execution.execute`); a plain ``run()`` is called in this
        pool thread unless it has a timeout to keep.

        A plain ``run()`` without a timeout is called before any loop is involved: the loop
        has nothing to bound or to stop in it, and takes over only if it returns an
        awaitable (which can then be stopped). Same outcome, a fraction of the cost.
        """
        request = self._request
        if request.timeout is None and not inspect.iscoroutinefunction(manager.run):
            try:
                result = manager.run()
            except asyncio.CancelledError:
                return self._finished(self._stopped_error(), started)
            except Exception as exc:
                return self._finished(describe_error(exc), started)
            if not inspect.isawaitable(result):
                return self._finished(None, started)
            pending: Awaitable[object] = result
            return self._on_loop(manager, started, lambda _: self._awaited(pending))
        call: Callable[[TaskManager], Awaitable[object]] = (
            self._call_here if request.timeout is None else call_manager
        )
        if inspect.iscoroutinefunction(manager.run):
            with self._lock:
                self._stoppable = True
        return self._on_loop(manager, started, call)

    def _finished(self, error: str | None, started: datetime) -> RunEvent:
        return finished_event(self._request, error, started=started, worker=self._worker, at=_now())

    def _on_loop(
        self,
        manager: TaskManager,
        started: datetime,
        call: Callable[[TaskManager], Awaitable[object]],
    ) -> RunEvent:
        request = self._request
        try:
            return _thread_loop().run_until_complete(
                execute(
                    request,
                    manager,
                    call=call,
                    worker=self._worker,
                    started=started,
                    watch=self._watch,
                    stopped=self._stopped_error,
                )
            )
        finally:
            with self._lock:
                self._cancel = None

    async def _call_here(self, manager: TaskManager) -> object:
        """``manager.run()`` in this thread (nothing to bound); an awaitable it returns can be
        stopped."""
        result = manager.run()
        if not inspect.isawaitable(result):
            return result
        return await self._awaited(result)

    async def _awaited(self, result: Awaitable[object]) -> object:
        """Await what a plain ``run()`` returned, stoppable."""
        awaited = asyncio.ensure_future(result)
        with self._lock:
            self._stoppable = True
            if self.stopped is not None:  # stopped while run() itself ran
                awaited.cancel()
        return await awaited

    def _watch(self, call: asyncio.Future[object]) -> None:
        loop = call.get_loop()
        with self._lock:
            if self.stopped is None:
                self._cancel = functools.partial(loop.call_soon_threadsafe, self._stop_call, call)
            else:
                self._stop_call(call)

    def _stop_call(self, call: asyncio.Future[object]) -> None:
        if self._stoppable:
            call.cancel()

    def _stopped_error(self) -> str:
        return f"RunStoppedError: worker {self._worker} stopped the run: it " + (
            self.stopped or "was cancelled"
        )


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
            "worker %s serves sys_type(s) %s on %s: %s",
            name,
            ", ".join(sys_types) or "(none)",
            mask_url(str(app.conf.broker_url)),
            _CLAIMS_KEPT.get(_state.durability(), "?"),
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                _state.client().delete(self._key)


_CLAIMS_KEPT = {
    "waitaof": "each claim waits for its fsync (WAITAOF) before its run starts",
    "fsync": "each claim is on disk when Redis answers (appendfsync always)",
    "unchecked": "claims may not survive a broker crash (--allow-non-durable-broker)",
}
"""How the worker's claims survive a broker crash, by durability mode (for its ready line)."""

_registration = _Registration()


@signals.worker_init.connect
def _on_init(sender: Any = None, **_: Any) -> None:
    """Refuse to start on a broker that cannot keep claims, or without the factory."""
    if sender is None or getattr(sender, "app", None) is not app:
        return
    delay = 0.5
    while True:
        try:
            mode = _state.durability()
            _state.factory()
            break
        except (BrokerNotDurableError, ValueError) as exc:
            logger.critical("worker not started: %s", exc)
            raise SystemExit(f"task-dispatcher worker: error: {exc}") from exc
        except redis.RedisError as exc:
            # Its persistence decides whether runs may start here: wait for the broker.
            logger.warning("broker unreachable, retrying in %.1fs: %s", delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    if mode == "unchecked":
        logger.warning(
            "broker %s: persistence not verified (--allow-non-durable-broker): a broker crash "
            "may execute runs twice",
            mask_url(str(sender.app.conf.broker_url)),
        )


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
