"""``LiveFeed``: the dashboard's live feed, as server-sent events.

Every open page listens to ``/events``; each tick (:data:`FEED_INTERVAL`) the feed looks at the
dispatcher's tasks, order and health once for every connection (the records looked at, not
copied) and sends each page only what changed since it was rendered (:func:`feed.diff`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from scheduler.control.waits import wait_context
from scheduler.triggers import utc_now
from scheduler.web.feed import diff, rendered_at
from tasks.model import TaskRecord
from tasks.waiting import WaitContext

if TYPE_CHECKING:
    from scheduler.dispatcher import Dispatcher

__all__ = ["FEED_INTERVAL", "FEED_LIFETIME", "LiveFeed"]

FEED_INTERVAL = 1.0
"""Seconds between two looks at the dispatcher for the live feed."""
FEED_LIFETIME = 300.0
"""Seconds after which a feed connection ends; the browser reconnects on its own."""

_Look = tuple[list[TaskRecord], dict[str, list[str]], dict[str, Any], WaitContext]


class LiveFeed:
    """The ``/events`` handler: one look at the dispatcher per tick, diffed per page."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        problems: Callable[[], list[str]],
        order_tag: Callable[[], str],
    ) -> None:
        self.dispatcher = dispatcher
        self._problems = problems
        self._order_tag = order_tag
        self._seen: tuple[float, _Look] | None = None

    def _health(self) -> dict[str, Any]:
        return {"problems": self._problems()}

    def _look(self) -> _Look:
        """The dispatcher's tasks, order, health and what it knows of why tasks wait, shared
        by every open feed for one tick.

        The records are looked at, not copied (a feed only reads them): copying each costs
        about 10 us, a second of the event loop's time every tick at 100,000 tasks.
        """
        now = time.monotonic()
        if self._seen is None or now - self._seen[0] >= FEED_INTERVAL / 2:
            dispatcher = self.dispatcher
            records = dispatcher.peek_tasks()
            self._seen = (
                now,
                (
                    records,
                    dispatcher.account_tasks,
                    self._health(),
                    wait_context(dispatcher, records),
                ),
            )
        return self._seen[1]

    async def events(self, request: Request) -> Response:
        """Server-sent events: one ``update`` message per change (see :func:`feed.diff`)."""
        dispatcher = self.dispatcher
        # Start from what the page shows: the tasks as they are now, less those changed since
        # the page was rendered (``since``), so the first message carries only those, plus
        # health. The order too, unless the page's ``order`` tag says it shows the current
        # one: at 100,000 tasks every account's order is over a megabyte.
        records, _, _, _ = self._look()
        try:
            since = datetime.fromisoformat(request.query_params["since"])
        except (KeyError, ValueError):
            since = None
        tag = self._order_tag()
        order = dispatcher.account_tasks
        if request.query_params.get("order") != tag or self._order_tag() != tag:
            order = {}
        state = await asyncio.to_thread(rendered_at, records, since, order)

        async def stream() -> AsyncIterator[bytes]:
            nonlocal state
            yield b"retry: 2000\n: connected\n\n"
            deadline = time.monotonic() + FEED_LIFETIME
            while time.monotonic() < deadline and not dispatcher.closed:
                await asyncio.sleep(FEED_INTERVAL)
                if await request.is_disconnected():
                    return
                # Off the event loop: a look at 100,000 tasks takes tens of milliseconds,
                # which the loop's thread then shares in slices instead of waiting them out.
                records, order, health, context = self._look()
                state, message = await asyncio.to_thread(
                    diff, state, records, order, health, dispatcher.timezone, utc_now(), context
                )
                if message is None:
                    yield b": idle\n\n"
                    continue
                yield b"event: update\ndata: " + orjson.dumps(message) + b"\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
