"""Listeners: typed events for what happens to runs, tasks and saving, and a webhook.

The event classes are those of :mod:`tasks.events` (the one hierarchy the task core emits),
re-exported here under the names users import.

``TaskDispatcher.add_listener(callback, events=...)`` calls ``callback(event)`` for each event
of the classes asked for (all of them by default), in APScheduler's style. A callback may be
a plain function or a coroutine function (run as a task of the dispatcher's loop); one that
raises is logged and never breaks the dispatcher. Callbacks run on the event loop: a slow one
delays the dispatcher, so do I/O in a coroutine (or in a thread, as :class:`WebhookListener`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable

import orjson

from tasks.events import (
    EVENT_CLASSES,
    DispatcherEvent,
    RunFailed,
    RunRetried,
    RunStarted,
    RunSucceeded,
    RunTimedOut,
    SaveFailed,
    SaveRecovered,
    TaskAdded,
    TaskCompleted,
    TaskPaused,
    TaskRemoved,
    TaskResumed,
    event_by_kind,
)

__all__ = [
    "DispatcherEvent",
    "Listener",
    "Listeners",
    "RunFailed",
    "RunRetried",
    "RunStarted",
    "RunSucceeded",
    "RunTimedOut",
    "SaveFailed",
    "SaveRecovered",
    "TaskAdded",
    "TaskCompleted",
    "TaskPaused",
    "TaskRemoved",
    "TaskResumed",
    "WebhookListener",
]

logger = logging.getLogger(__name__)

Listener = Callable[[DispatcherEvent], object]
"""A callback: ``callback(event)``, plain or a coroutine function."""
EventFilter = Iterable["type[DispatcherEvent] | str"] | None


def event_classes(events: EventFilter) -> tuple[type[DispatcherEvent], ...]:
    """The event classes named by ``events`` (classes or kind strings; None: all of
    :data:`EVENT_CLASSES`, the listener events)."""
    if events is None:
        return EVENT_CLASSES
    found: list[type[DispatcherEvent]] = []
    for item in events:
        if isinstance(item, str):
            cls = event_by_kind(item)
            if cls is None:
                known = sorted(event.kind for event in EVENT_CLASSES)
                raise ValueError(f"events: unknown event {item!r} (known: {known})")
            found.append(cls)
        elif isinstance(item, type) and issubclass(item, DispatcherEvent):
            found.append(item)
        else:
            raise TypeError(f"events: {item!r} is not an event class or name")
    return tuple(found)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs ``loop`` (a callback it queues needs no wake-up)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class Listeners:
    """The dispatcher's listeners; :meth:`emit` calls the ones that asked for an event."""

    def __init__(self) -> None:
        self._entries: list[tuple[Listener, tuple[type[DispatcherEvent], ...]]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, callback: Listener, events: EventFilter = None) -> None:
        """Call ``callback(event)`` for events of the classes in ``events`` (None: all)."""
        if not callable(callback):
            raise TypeError(f"callback: {callback!r} is not callable")
        self._entries.append((callback, event_classes(events)))

    def remove(self, callback: Listener) -> None:
        """Stop calling ``callback`` (every registration of it)."""
        self._entries = [entry for entry in self._entries if entry[0] is not callback]

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The dispatcher's loop: coroutine callbacks run there, events from other threads
        are handed there."""
        self._loop = loop

    def __bool__(self) -> bool:
        return bool(self._entries)

    def emit_soon(self, event: DispatcherEvent) -> None:
        """Emit ``event`` from the loop, later (safe under the table's lock, from any thread)."""
        loop = self._loop
        if not self._entries or not isinstance(event, EVENT_CLASSES):
            return  # nobody listens, or not a listener event (a run's report)
        if loop is None or not loop.is_running() or loop.is_closed():
            self.emit(event)
        elif _on(loop):
            loop.call_soon(self.emit, event)  # the same queue, without waking the loop
        else:
            loop.call_soon_threadsafe(self.emit, event)

    def emit(self, event: DispatcherEvent) -> None:
        """Call every listener that asked for ``event``; a raising one is logged."""
        if not isinstance(event, EVENT_CLASSES):
            return  # not a listener event (a run's report, for observers)
        for callback, classes in list(self._entries):
            if not isinstance(event, classes):
                continue
            try:
                result = callback(event)
            except Exception:
                logger.exception("listener %r failed on %s", callback, event.kind)
                continue
            if inspect.isawaitable(result):
                self._schedule(callback, event, result)

    def _schedule(
        self, callback: Listener, event: DispatcherEvent, result: Awaitable[None]
    ) -> None:
        async def guarded() -> None:
            try:
                await result
            except Exception:
                logger.exception("listener %r failed on %s", callback, event.kind)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = loop.create_task(guarded())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(guarded(), self._loop)
        else:  # no loop at all (a dispatcher never started): run it here
            asyncio.run(guarded())

    async def drain(self, grace_period: float) -> None:
        """Wait up to ``grace_period`` seconds for coroutine callbacks still running."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_period)


class WebhookListener:
    """POSTs each event it receives to ``url`` as JSON (:meth:`DispatcherEvent.to_json`).

    The request runs in a thread, off the event loop, with ``timeout`` seconds per attempt;
    a connection error or a 5xx answer is retried up to ``retries`` times, waiting ``backoff``
    seconds, doubled each time; then the event is dropped with a WARNING. While the endpoint
    is down (the last event was not delivered), each event is tried once, so an outage that
    fails every task does not multiply the wait by the retries. At most ``max_waiting`` events
    wait their turn; one more is dropped with a WARNING (counted in :attr:`dropped`).
    ``events`` are the event classes (or names) it wants: failed runs and pauses by default.
    ``add_listener(WebhookListener(url))`` subscribes it to those.
    """

    def __init__(
        self,
        url: str,
        events: EventFilter = (RunFailed, TaskPaused),
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_waiting: int = 1000,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must be an http:// or https:// URL, not {url!r}")
        if max_waiting < 1:
            raise ValueError(f"max_waiting: must be at least 1, got {max_waiting}")
        self.url = url
        self.events = event_classes(events)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_waiting = max_waiting
        self.dropped = 0
        """Events dropped because ``max_waiting`` events were waiting already."""
        self._waiting = 0
        self._down = False
        self._order: asyncio.Lock | None = None

    async def __call__(self, event: DispatcherEvent) -> None:
        """Send ``event`` (in a thread; one at a time, in the order they happened)."""
        if self._waiting >= self.max_waiting:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "webhook %s: %d events waiting; %s dropped (%d so far)",
                    self.url,
                    self._waiting,
                    event.kind,
                    self.dropped,
                )
            return
        body = orjson.dumps(event.to_json())
        if self._order is None:
            self._order = asyncio.Lock()
        self._waiting += 1
        try:
            async with self._order:
                retries = 0 if self._down else self.retries
                delivered = await asyncio.to_thread(self.post, body, event.kind, retries)
                self._down = not delivered
        finally:
            self._waiting -= 1

    def post(self, body: bytes, what: str = "event", retries: int | None = None) -> bool:
        """POST ``body``, retrying as described (``retries`` times, if given); True once the
        server accepted it."""
        error = ""
        for attempt in range((self.retries if retries is None else retries) + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "task-dispatcher"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                return True
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
                if exc.code < 500:
                    break
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        logger.warning("webhook %s: %s not delivered (%s)", self.url, what, error)
        return False
