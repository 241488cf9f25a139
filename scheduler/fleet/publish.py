"""``RunPublisher``: sends a run's message to the queue of its sys_type through Celery.

The message carries the request and the worker's heartbeat settings (derived from
``lost_after``), and expires at the run's deadline. Celery's publishing blocks: call
:meth:`RunPublisher.publish` in a thread.
"""

from __future__ import annotations

import asyncio

from celery import Celery

from scheduler.fleet.openruns import OpenRun
from scheduler.fleet.wire import MESSAGE_FORMAT, TASK_NAME
from tasks.runs import RunRequest

__all__ = ["RunPublisher", "message_repr"]


def message_repr(request: RunRequest) -> str:
    """What a run's message shows for its arguments (Celery's ``argsrepr``)."""
    return f"[run {request.run_id} of task {request.task_id} ({request.task_type})]"


class RunPublisher:
    """The Celery app of one broker, publishing runs (see the module)."""

    def __init__(self, lost_after: float) -> None:
        self.lost_after = lost_after
        # A worker renews its heartbeat ten times per lost_after; the heartbeat lasts 40% of
        # it, and a run is declared lost once its heartbeat has been seen missing for half of
        # it: a dead worker's run is lost within lost_after (plus one poll).
        self._heartbeat = max(0.05, lost_after / 10)
        self._alive_ms = max(100, int(lost_after * 400))
        self.app: Celery | None = None

    def open(self, broker_url: str) -> None:
        """Make the Celery app that publishes to ``broker_url``."""
        from scheduler.fleet.worker import make_app

        self.app = make_app(broker_url)

    async def close(self) -> None:
        """Close the Celery app (its connections)."""
        if self.app is not None:
            await asyncio.to_thread(self.app.close)

    def publish(self, run: OpenRun, queue: str) -> None:
        """Send ``run``'s message to ``queue`` (blocking)."""
        assert self.app is not None
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
        self.app.send_task(
            TASK_NAME,
            args=[payload],
            task_id=request.run_id,
            queue=queue,
            expires=run.deadline,
            **limits,
            # Results are not kept (the outcome goes through the stream): say so here, so no
            # result backend is looked up per message.
            ignore_result=True,
            # What Celery shows for the arguments (its logs, events, monitors): the run named,
            # not a repr of the whole request (a third of the publishing's cost, and the
            # task's arguments, which may hold secrets, in every header).
            argsrepr=message_repr(request),
            kwargsrepr="{}",
            retry=True,
            retry_policy={
                "max_retries": 1,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.2,
            },
        )
