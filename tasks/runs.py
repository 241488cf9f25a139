"""Runs as messages: what the dispatcher sends to a run backend and what comes back.

A :class:`RunRequest` is plain data (no live manager), so it can cross a process boundary:
whoever executes it re-creates the manager as ``factory(sys_type=sys_type, **kwargs)``.
What happens to a run comes back as :class:`RunEvent` messages (``started``, then one of
``succeeded``, ``failed``, ``lost`` or ``expired``; ``cancelled`` for one withdrawn before it
started), delivered to the dispatcher's
:class:`RunInbox`, which applies each one once, by run id, possibly after a restart.

A :class:`RunBackend` is the seam between "this run is due" and "it ran, with this outcome":
the local backend runs managers in this process; a remote one routes runs to workers by
``sys_type``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

from tasks.secrets import mask_text

__all__ = [
    "ERROR_LIMIT",
    "NOT_SENT",
    "TIMED_OUT",
    "TRIGGERS",
    "RunBackend",
    "RunEvent",
    "RunEventKind",
    "RunInbox",
    "RunRequest",
    "Trigger",
    "describe_error",
    "run_trigger",
    "timed_out_error",
]

ERROR_LIMIT = 2000
"""The longest error text recorded for a run (longer ones are cut)."""


TIMED_OUT = "timed_out"
"""The key in :attr:`RunEvent.extra` of a failed run that was stopped by its timeout (the
value: the timeout in seconds)."""


NOT_SENT = "not_sent"
"""The key in :attr:`RunEvent.extra` of a run that failed because its broker was unreachable
(the value: True). Such a run is recorded as failed but does not count toward
``pause_after_failures``: an outage is not the task's fault."""


Trigger = Literal["schedule", "retry", "manual"]
"""Why a run was started: its planned time came (``schedule``), it retries a failed run
(``retry``), or an operator asked for it (``manual``: "run now")."""

TRIGGERS: tuple[Trigger, ...] = ("schedule", "retry", "manual")


def run_trigger(attempt: int, manual: bool = False) -> Trigger:
    """The trigger of a run: ``manual`` if asked for, else by its attempt number."""
    if manual:
        return "manual"
    return "retry" if attempt > 1 else "schedule"


def timed_out_error(timeout: float) -> str:
    """The error recorded for a run stopped by its timeout."""
    return f"timed out after {timeout:g} s"


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` with credentials masked (see :func:`~tasks.secrets.mask_text`),
    cut to :data:`ERROR_LIMIT` characters."""
    text = mask_text(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__
    if not text.isascii():  # a lone surrogate (undecodable bytes) becomes U+FFFD: storable
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."


def _instant(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_instant(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 datetime, got {value!r}")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"datetime {value!r} has no UTC offset")
    return parsed


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run of one task, as plain data.

    ``kwargs`` are the task record's kwargs (they include ``task_id`` and ``task_type``); the
    executor re-creates the manager as ``factory(sys_type=sys_type, **kwargs)``.
    """

    run_id: str
    task_id: str
    account_id: str
    sys_type: str
    task_type: str
    kwargs: Mapping[str, Any]
    scheduled_at: datetime
    """The planned time of this run (aware)."""
    submitted_at: datetime
    """When the dispatcher handed the run to the backend."""
    deadline: datetime | None = None
    """The latest instant at which the run may start; a run not started by then expires."""
    attempt: int = 1
    """1 for a planned run, 2 and up for its retries."""
    timeout: float | None = None
    """Seconds the run may take (the task's ``run_timeout``); the executor stops a run still
    going then and reports it failed, "timed out after N s". The local backend cancels
    coroutines and shell commands; a fleet worker is to apply it as the task's time limit."""
    trigger: Trigger = "schedule"
    """Why the run was started (``schedule``, ``retry`` or ``manual``)."""

    def to_json(self) -> dict[str, Any]:
        """The request as a JSON object (datetimes as ISO-8601 with offset)."""
        return {
            "run_id": self.run_id,
            "task_id": self.task_id,
            "account_id": self.account_id,
            "sys_type": self.sys_type,
            "task_type": self.task_type,
            "kwargs": dict(self.kwargs),
            "scheduled_at": _instant(self.scheduled_at),
            "submitted_at": _instant(self.submitted_at),
            "deadline": _instant(self.deadline),
            "attempt": self.attempt,
            "timeout": self.timeout,
            "trigger": self.trigger,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRequest:
        """The request :meth:`to_json` made; raises ``ValueError`` if ``data`` is not one."""
        try:
            scheduled_at = _parse_instant(data["scheduled_at"])
            submitted_at = _parse_instant(data["submitted_at"])
            if scheduled_at is None or submitted_at is None:
                raise ValueError("scheduled_at and submitted_at are required")
            kwargs = data.get("kwargs") or {}
            if not isinstance(kwargs, Mapping):
                raise ValueError("kwargs must be an object")
            return cls(
                run_id=str(data["run_id"]),
                task_id=str(data["task_id"]),
                account_id=str(data["account_id"]),
                sys_type=str(data["sys_type"]),
                task_type=str(data["task_type"]),
                kwargs=dict(kwargs),
                scheduled_at=scheduled_at,
                submitted_at=submitted_at,
                deadline=_parse_instant(data.get("deadline")),
                attempt=int(data.get("attempt", 1)),
                timeout=None if data.get("timeout") is None else float(data["timeout"]),
                trigger=_trigger(data.get("trigger"), int(data.get("attempt", 1))),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a run request: {exc!r}") from exc


def _trigger(value: Any, attempt: int) -> Trigger:
    """A trigger read back; a message from before triggers existed gets its attempt's."""
    for trigger in TRIGGERS:
        if value == trigger:
            return trigger
    if value is None:
        return run_trigger(attempt)
    raise ValueError(f"trigger: must be one of {', '.join(TRIGGERS)}, got {value!r}")


class RunEventKind(StrEnum):
    """What happened to a run."""

    STARTED = "started"
    """A worker (or this process) began executing it."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    """Whoever executed it went silent (killed, power loss): it counts as a failed run."""
    EXPIRED = "expired"
    """Nobody started it before its deadline: it counts as a failed run, and never runs."""
    CANCELLED = "cancelled"
    """Withdrawn before any worker started it (its task was paused or removed): it never
    runs and does not count."""

    @property
    def finished(self) -> bool:
        """Whether this is the run's last event."""
        return self is not RunEventKind.STARTED


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One thing that happened to one run."""

    run_id: str
    task_id: str
    kind: RunEventKind
    at: datetime
    """When it happened, on the reporter's clock (aware)."""
    worker: str | None = None
    """The name of the worker that executed the run (None: this process)."""
    error: str | None = None
    """``"Type: message"`` for failed, lost and expired runs, credentials masked."""
    started_at: datetime | None = None
    """For a finishing event: when the run started, if the reporter knows."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Anything else the backend reports (kept in the run history)."""

    def __post_init__(self) -> None:
        # Every run's error text passes here where it is formed (this process, a worker, a
        # verdict of lost or expired), so the record, the history, the logs and the webhooks
        # only ever see it masked, whichever reporter sent it.
        if self.error is not None:
            object.__setattr__(self, "error", mask_text(self.error))

    @property
    def ok(self) -> bool:
        """Whether the run succeeded."""
        return self.kind is RunEventKind.SUCCEEDED

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object."""
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "task_id": self.task_id,
            "kind": self.kind.value,
            "at": _instant(self.at),
            "worker": self.worker,
            "error": self.error,
            "started_at": _instant(self.started_at),
        }
        if self.extra:
            data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunEvent:
        """The event :meth:`to_json` made; raises ``ValueError`` if ``data`` is not one."""
        try:
            at = _parse_instant(data["at"])
            if at is None:
                raise ValueError("at is required")
            error = data.get("error")
            worker = data.get("worker")
            return cls(
                run_id=str(data["run_id"]),
                task_id=str(data["task_id"]),
                kind=RunEventKind(data["kind"]),
                at=at,
                worker=None if worker is None else str(worker),
                error=None if error is None else str(error)[:ERROR_LIMIT],
                started_at=_parse_instant(data.get("started_at")),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a run event: {exc!r}") from exc


class RunInbox(Protocol):
    """Where a backend delivers run events: the dispatcher's side."""

    async def deliver(self, event: RunEvent) -> None:
        """Apply ``event`` once (a duplicate, or one for a run no longer open, is ignored).

        Returns once the resulting record change is durable, so a backend may acknowledge
        the event to its transport after this returns (and must not before).
        """
        ...


class RunBackend(Protocol):
    """Executes runs somewhere and reports what happened through the inbox.

    The dispatcher speaks to every backend (the local one included) through these members
    only. A backend may subclass this class to take the defaults of :meth:`prepare` and
    :meth:`forget`.

    Every submitted or recovered run must eventually produce exactly one finishing event
    (succeeded, failed, lost or expired), unless the dispatcher closes the backend first.
    """

    name: str
    """A short name for logs and health ("local", "celery")."""
    remote: bool
    """Whether runs execute in other processes: they then outlive a restart of the
    dispatcher (which recovers them), and each run is made durable before it is sent."""

    async def open(self, inbox: RunInbox) -> None:
        """Start: from now on deliver events (including those waiting from before a restart)."""
        ...

    async def submit(self, request: RunRequest) -> RunEvent | None:
        """Hand ``request`` over; returns once it is on its way (None), or, for a backend
        that executes the run in the caller's task (the local one), once it has run and its
        finishing event was delivered to the inbox (that event).

        Raising means the run could not be sent; the dispatcher records it as failed.
        Cancelling the caller of a backend that executes in it cuts the run off.
        """
        ...

    def prepare(
        self, task_id: str, sys_type: str, kwargs: Mapping[str, Any], *, renew: bool = False
    ) -> None:
        """Get ready to execute ``task_id``'s runs (the dispatcher calls this when a task is
        added or loaded, and with ``renew`` when its kwargs or sys_type change); raising
        :class:`~tasks.errors.InvalidTaskError` refuses the task.

        A backend that keeps a manager per task (the local one) creates it here; one that
        executes elsewhere has nothing to do (the default).
        """
        return

    def forget(self, task_id: str) -> None:
        """``task_id`` was removed: drop what :meth:`prepare` kept for it (default: nothing)."""
        return

    async def cancel(self, run_id: str) -> bool:
        """Withdraw ``run_id`` if nobody started it yet: True if it will never start (its
        ``cancelled`` event follows through the inbox), False if it runs (or already ran)."""
        ...

    async def recover(self, requests: Sequence[RunRequest]) -> None:
        """Take back runs that were in flight when the dispatcher last stopped.

        Their outcomes may already be waiting, may still come, or never come (then the
        backend reports them lost); none is sent again.
        """
        ...

    async def close(self, grace_period: float | None) -> None:
        """Stop: let runs of this process finish for up to ``grace_period`` seconds."""
        ...

    def health(self) -> Mapping[str, Any]:
        """What an operator should see about the backend (JSON-safe values)."""
        ...
