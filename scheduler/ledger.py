"""The run ledger: every run that is out, by run id, from "opened" to its last event.

Opening a run writes it into its task record (``active_run``), in the same change that marks
the task running for a run that starts at once, so the run is persisted with the task. Events
come back through :meth:`RunLedger.deliver` (the dispatcher's :class:`~tasks.runs.RunInbox`),
or :meth:`RunLedger.deliver_batch` for many at once, and are applied once: an event is
applied only while its run id is the record's open run, and applying a finishing event closes
it in the same record change, so a duplicate finds nothing to apply, even after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from jobstores.commands import RunAbandoned, RunOpened, RunReported
from jobstores.jsonfile import JsonJobStore
from scheduler.leadership import LeaseView
from tasks import lifecycle
from tasks.events import DispatcherEvent, RunReport
from tasks.model import ActiveRun, TaskRecord
from tasks.runs import NOT_SENT, RunEvent, RunEventKind, RunRequest, run_trigger

__all__ = ["ChangeObserver", "RunLedger", "RunObserver", "on_reports"]

logger = logging.getLogger(__name__)

_HANDOVER = 4
"""Passes of the event loop a batch of events lets go by before its commit: a finishing event
frees its run's lane and slot, and the run waiting for them is opened a few passes later (the
runner's future, its task, the next run's task); it is then saved by the same commit, where it
took a commit of its own after this one, before it could be sent."""

RunObserver = Callable[[RunRequest, RunEvent], None]
"""Told of every run event applied, with its run's request (``observe_runs``): an observer of
the event stream's :class:`~tasks.events.RunReport`."""


def on_reports(observer: RunObserver) -> Callable[[DispatcherEvent], None]:
    """``observer`` as a subscriber of the event stream: called with the request and the
    event of each :class:`~tasks.events.RunReport`, deaf to the other events."""

    def subscriber(event: DispatcherEvent) -> None:
        if isinstance(event, RunReport):
            observer(event.request, event.event)

    return subscriber


ChangeObserver = Callable[[RunRequest, RunEvent, TaskRecord | None, TaskRecord | None], None]
"""Told of every event applied with the task's record before and after it (retries,
listeners); the records are None for a task removed meanwhile."""


@dataclass(eq=False, slots=True)
class _Open:
    request: RunRequest
    ended: asyncio.Future[RunEvent] | None = None


class RunLedger:
    """Opens runs, applies their events once, and tells who waits on a run when it ended.

    ``remote`` says runs execute elsewhere: each event is then durable before
    :meth:`deliver` returns (the backend acknowledges it to its transport after that).
    """

    def __init__(self, store: JsonJobStore, *, remote: bool) -> None:
        self._store = store
        self._remote = remote
        self._directory = store.directory.resolve()
        self._open: dict[str, _Open] = {}
        self._watchers: list[ChangeObserver] = []
        # Run ids: unique per process by the counter, across processes by the prefix.
        self._prefix = uuid.uuid4().hex[:12]
        self._numbers = itertools.count(1)

    @property
    def directory(self) -> Path:
        """The dispatcher directory, absolute (a remote backend names its dispatcher by it)."""
        return self._directory

    @property
    def leadership(self) -> LeaseView | None:
        """The lease of a store that several dispatchers share (its ``cluster``, ``epoch`` and
        ``is_leader_now()``), None for a store of one owner. A remote backend ties its own
        guard on the broker to the epoch, and reads outcomes only while it leads."""
        lease: LeaseView | None = getattr(self._store._storage, "leadership", None)
        return lease

    def watch(self, observer: ChangeObserver) -> None:
        """Call ``observer(request, event, before, after)`` after each event is applied."""
        self._watchers.append(observer)

    def __len__(self) -> int:
        return len(self._open)

    def requests(self) -> list[RunRequest]:
        """The runs that are out."""
        return [entry.request for entry in self._open.values()]

    # ------------------------------------------------------------------ opening

    def open(
        self, task_id: str, scheduled_at: datetime, attempt: int = 1, *, manual: bool = False
    ) -> RunRequest | None:
        """Open attempt ``attempt`` of a run of ``task_id`` planned for ``scheduled_at``, if it
        may start now.

        A ``manual`` run (asked for with "run now") starts whatever the task's window, end or
        status, as long as it is still asked for (the record's ``run_requested``) and no other
        run of the task is out.

        A run starts only if the task is neither paused, completed nor removed, has no run
        out, its window is open and its end not passed; otherwise it is skipped (None): this
        is what makes missed runs coalesce into at most one run, and only inside the window.
        A retry (``attempt`` 2 and up) starts only while the record still plans it and its
        time has come (pausing or editing the task, or the next planned run, drops it).
        """
        store = self._store
        with store.lock:
            record = store.table.find(task_id)
            if record is None or store.closed:
                return None
            now = store.now()
            if manual:
                if record.run_requested is None or record.active_run is not None:
                    logger.info(
                        "manual run of task %s (account %s) not started: %s",
                        task_id,
                        record.account_id,
                        "no longer asked for"
                        if record.run_requested is None
                        else "another run is out; it runs at the next start",
                    )
                    return None
            elif attempt > 1 and not _retry_due(record, attempt, now):
                logger.debug("retry %d of task %s no longer planned", attempt, task_id)
                return None
            elif not lifecycle.can_start(record, store.schedule(record), now):
                if logger.isEnabledFor(logging.INFO):
                    logger.info(
                        "run of task %s (account %s) planned for %s skipped: task is %s%s; "
                        "next run %s",
                        task_id,
                        record.account_id,
                        scheduled_at.isoformat(),
                        record.status.value,
                        _why_not(record),
                        record.next_execution_time,
                    )
                return None
            started = not self._remote
            run = ActiveRun(
                run_id=f"{self._prefix}-{next(self._numbers)}",
                scheduled_at=scheduled_at.astimezone(now.tzinfo),
                submitted_at=now,
                attempt=attempt,
                started_at=now if started else None,
                manual=manual,
            )
            request = _request(record, run)  # the task's rules: opening changes none
            record = store.apply(RunOpened(task_id, run, started, request), now).record
        self._open[run.run_id] = _Open(request)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%srun %s of task %s (account %s, %s) %s%s",
                "manual " if manual else "",
                run.run_id,
                task_id,
                record.account_id,
                record.task_type,
                "sent" if self._remote else "started",
                f" (attempt {attempt})" if attempt > 1 else "",
            )
        if started:
            event = RunEvent(run.run_id, task_id, RunEventKind.STARTED, at=now)
            self._watch(request, event, None, record)
        return request

    def recover(self) -> list[RunRequest]:
        """Take back the runs that were out when the dispatcher last stopped.

        With a remote backend they are still out (their outcomes will come); with the local
        one they died with the process: each is closed without counting (the task stays
        runnable). On a store several dispatchers share, they died with another instance
        (this one took over): each is recorded as lost, and retried only as its task's
        policy says.
        """
        store = self._store
        recovered = []
        shared = self.leadership is not None
        for record in store.table.records():
            if record.active_run is None:
                continue
            if not self._remote and shared:
                self._lost_with_leader(record, record.active_run)
                continue
            if not self._remote:
                now = store.now()
                run_id = record.active_run.run_id
                store.apply(RunAbandoned(record.task_id, run_id), now)
                logger.warning(
                    "task %s (account %s) was running when the dispatcher stopped; runnable again",
                    record.task_id,
                    record.account_id,
                )
                continue
            request = _request(record, record.active_run)
            self._open[request.run_id] = _Open(request)
            recovered.append(request)
        return recovered

    def _lost_with_leader(self, record: TaskRecord, run: ActiveRun) -> None:
        request = _request(record, run)
        self._open[request.run_id] = _Open(request)
        error = (
            "RunLostError: the run was in progress in the dispatcher that led before this "
            "one took over; it is not re-run unless its task's retries say so"
        )
        at = self._store.now()
        self.apply(RunEvent(run.run_id, record.task_id, RunEventKind.LOST, at=at, error=error))

    # ------------------------------------------------------------------ events

    async def deliver(self, event: RunEvent) -> None:
        """Apply ``event`` once; return when its change is durable (remote runs) or requested
        (local runs, saved in the background)."""
        self.apply(event)
        if self._remote:
            if not await self._store.save_async():
                raise OSError(
                    f"the outcome of run {event.run_id} could not be saved: "
                    f"{self._store.save_health.last_error}"
                )
        else:
            self._store.request_save()

    async def deliver_batch(self, events: Sequence[RunEvent]) -> None:
        """Apply ``events`` in order, each once, like :meth:`deliver`; return when every change
        is durable (remote runs), made so by one commit for the whole batch.

        A backend reading outcomes in batches (a run's ``started`` and finishing events, and
        those of many runs) makes one commit where delivering them one by one made one per
        event of a run; the runs the batch lets start are opened first and share it.
        """
        for event in events:
            self.apply(event)
        if self._remote:
            for _ in range(_HANDOVER):
                await asyncio.sleep(0)
            if not await self._store.save_async():
                raise OSError(
                    f"the events of {len(events)} run(s) could not be saved: "
                    f"{self._store.save_health.last_error}"
                )
        else:
            self._store.request_save()

    def apply(self, event: RunEvent) -> bool:
        """Apply ``event`` to its task's record; False for a duplicate or an unknown run."""
        store = self._store
        now = store.now()
        entry = self._open.get(event.run_id)
        after: TaskRecord | None = None
        with store.lock:
            record = store.table.find(event.task_id)
            applied = record is not None and _is_open(record, event.run_id)
            if applied and entry is None:
                assert record is not None
                assert record.active_run is not None
                entry = _Open(_request(record, record.active_run))
            if entry is not None and (applied or not store.closed):
                # The core decides the transition (completion included) and its events.
                result = store.apply(RunReported(event, entry.request), now)
                if applied:
                    after = result.record
        if entry is None:
            logger.debug("run %s: %s event ignored (not open)", event.run_id, event.kind)
            return False
        if not applied and event.kind.finished:
            logger.info(
                "run %s of task %s ended after the task was removed", event.run_id, event.task_id
            )
        if event.kind.finished:
            self._open.pop(event.run_id, None)
            if entry.ended is not None and not entry.ended.done():
                entry.ended.set_result(event)
        _log(entry.request, event)
        if applied and event.kind.finished:
            _log_change(entry.request, record, after)
        self._watch(entry.request, event, record, after)
        return applied

    def abandon(self, run_id: str) -> None:
        """Close ``run_id`` without an outcome: cut off in this process; it does not count."""
        entry = self._open.pop(run_id, None)
        if entry is None:
            return
        store = self._store
        now = store.now()
        task_id = entry.request.task_id
        with store.lock:
            if not store.closed:  # reported as lost (it does not count)
                store.apply(RunAbandoned(task_id, run_id, entry.request), now)
        if entry.ended is not None and not entry.ended.done():
            entry.ended.cancel()
        logger.warning(
            "run %s of task %s was cut off before it ended; it stays runnable", run_id, task_id
        )

    def ended(self, run_id: str) -> asyncio.Future[RunEvent] | None:
        """A future of the finishing event of ``run_id`` (None: it is not out)."""
        entry = self._open.get(run_id)
        if entry is None:
            return None
        if entry.ended is None:
            entry.ended = asyncio.get_running_loop().create_future()
        return entry.ended

    def _watch(
        self,
        request: RunRequest,
        event: RunEvent,
        before: TaskRecord | None,
        after: TaskRecord | None,
    ) -> None:
        for watcher in self._watchers:
            try:
                watcher(request, event, before, after)
            except Exception:
                logger.exception("a run watcher failed on run %s", request.run_id)


def _why_not(record: TaskRecord) -> str:
    run = record.active_run
    if run is not None:
        if run.queued:
            return (
                f", its run {run.run_id} is still out (sent {run.submitted_at.isoformat()}, "
                f"not started by any {record.sys_type} worker yet)"
            )
        return f", its run {run.run_id} is still executing"
    return "" if record.status.settled else ", outside its hours or past its end"


def _is_open(record: TaskRecord, run_id: str) -> bool:
    return record.active_run is not None and record.active_run.run_id == run_id


def _retry_due(record: TaskRecord, attempt: int, now: datetime) -> bool:
    retry = record.retry
    return retry is not None and retry.attempt == attempt and retry.at <= now


def _log_change(request: RunRequest, before: TaskRecord | None, after: TaskRecord | None) -> None:
    if after is None:
        return
    if after.retry is not None and (before is None or before.retry != after.retry):
        logger.warning(
            "task %s (account %s): attempt %d failed; attempt %d at %s",
            request.task_id,
            request.account_id,
            after.retry.attempt - 1,
            after.retry.attempt,
            after.retry.at.isoformat(),
        )
    if after.paused_reason is not None and (before is None or before.paused_reason is None):
        logger.error(
            "task %s (account %s) paused: %s; resume it to run it again",
            request.task_id,
            request.account_id,
            after.paused_reason,
        )


def _request(record: TaskRecord, run: ActiveRun) -> RunRequest:
    return RunRequest(
        run_id=run.run_id,
        task_id=record.task_id,
        account_id=record.account_id,
        sys_type=record.sys_type,
        task_type=record.task_type,
        kwargs=record.kwargs,
        scheduled_at=run.scheduled_at,
        submitted_at=run.submitted_at,
        attempt=run.attempt,
        timeout=record.policy.run_timeout,
        trigger=run_trigger(run.attempt, run.manual),
    )


def _log(request: RunRequest, event: RunEvent) -> None:
    if (event.ok or event.kind is RunEventKind.STARTED) and not logger.isEnabledFor(logging.INFO):
        return
    if event.kind is RunEventKind.STARTED:
        logger.info(
            "run %s of task %s started on %s",
            request.run_id,
            request.task_id,
            event.worker or "this process",
        )
        return
    if event.kind is RunEventKind.CANCELLED:
        logger.info(
            "run %s of task %s (account %s) cancelled before it started: %s",
            request.run_id,
            request.task_id,
            request.account_id,
            event.error,
        )
        return
    if event.extra.get(NOT_SENT):
        # One of many while the broker is down: the backend logs the outage and a count.
        logger.info(
            "run %s of task %s (account %s) not sent: %s",
            request.run_id,
            request.task_id,
            request.account_id,
            event.error,
        )
        return
    if event.started_at is None and not event.ok:
        # Never started here (expired, lost with the broker) or declared lost by the
        # dispatcher: no duration to give.
        logger.error(
            "run %s of task %s (account %s) %s: %s",
            request.run_id,
            request.task_id,
            request.account_id,
            "failed" if event.kind is RunEventKind.FAILED else f"failed ({event.kind.value})",
            event.error,
        )
        return
    seconds = (event.at - (event.started_at or request.submitted_at)).total_seconds()
    if event.ok:
        logger.info(
            "run %s of task %s (account %s) finished in %.3fs",
            request.run_id,
            request.task_id,
            request.account_id,
            seconds,
        )
    else:
        logger.error(
            "run %s of task %s (account %s) %s after %.3fs: %s",
            request.run_id,
            request.task_id,
            request.account_id,
            "failed" if event.kind is RunEventKind.FAILED else f"failed ({event.kind.value})",
            seconds,
            event.error,
        )
