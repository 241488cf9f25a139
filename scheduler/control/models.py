"""Request and response bodies of the control API (tasks themselves are ``TaskRecord``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scheduler.history import MAX_QUERY_LIMIT
from tasks.model import TaskRecord

__all__ = [
    "AccountChanges",
    "AccountOrder",
    "AccountTaskChange",
    "BulkAdd",
    "BulkAdded",
    "ErrorBody",
    "Health",
    "NextRuns",
    "Position",
    "RunFilters",
    "SaveHealthBody",
    "TaskList",
    "TaskSpec",
    "TaskView",
    "WaitingBody",
]


class ErrorBody(BaseModel):
    """Every error response: what went wrong and, when it is about one, which field."""

    error: str = Field(description="A short code: not_found, invalid, conflict, unauthorized, ...")
    message: str = Field(description="A sentence for a person; names the field or the task id.")
    field: str | None = Field(default=None, description="The request field at fault, if any.")


class TaskSpec(BaseModel):
    """``add_task``'s keywords: the named ones below, every other key goes into ``kwargs``.

    The account is ``account_id`` or the one key ending in ``_account_id``. Values are checked
    by the dispatcher exactly as ``add_task`` checks them; errors name the field.
    """

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra={
            "example": {
                "task_type": "shell",
                "sys_type": "local",
                "account_id": "shop-1",
                "interval": 1800,
                "valid_time_range": [8, 22],
                "task_end_time": "2027-03-31",
                "command": "./sync.sh",
            }
        },
    )

    sys_type: str | None = None
    task_type: str | None = None
    interval: float | None = Field(default=None, description="Seconds between runs.")
    valid_time_range: list[int] | None = Field(
        default=None, description="[start_hour, end_hour] in the dispatcher's zone; [22, 6] wraps."
    )
    task_end_time: str | None = Field(
        default=None, description="Last day (YYYY-MM-DD) or an ISO-8601 cut-off."
    )
    task_id: str | None = Field(default=None, description="Default: generated.")
    account_id: str | None = None
    account_name: str | None = None

    def keywords(self) -> dict[str, Any]:
        """The keywords for ``add_task``: what the client sent, extras included."""
        return self.model_dump(exclude_unset=True)


class BulkAdd(BaseModel):
    """Many tasks added with one save, all or none."""

    tasks: list[TaskSpec] = Field(min_length=1)


class BulkAdded(BaseModel):
    """The ids of the tasks a bulk add created, in request order."""

    task_ids: list[str]


class Position(BaseModel):
    """A 0-based position in the account's priority order."""

    model_config = ConfigDict(strict=True)

    position: int = Field(description="0-based; the dispatcher checks the account's range.")


class TaskChanges(BaseModel):
    """What ``update_task`` changes: only the fields given (``task_end_time`` null removes
    the end; a ``run_policy`` object changes the policy fields it names)."""

    model_config = ConfigDict(extra="forbid")

    interval: float | None = None
    valid_time_range: list[int] | None = None
    task_end_time: str | None = None
    run_policy: dict[str, Any] | None = None
    kwargs: dict[str, Any] | None = None


class AccountTaskChange(BaseModel):
    """What pausing or resuming an account did to one of its tasks."""

    task_id: str
    status: str = Field(description="The task's status after the change.")
    changed: bool = Field(description="False for a task already so, or completed.")


class AccountChanges(BaseModel):
    """The tasks of an account after pausing or resuming all of them (one commit)."""

    account_id: str
    tasks: list[AccountTaskChange]


class AccountOrder(BaseModel):
    """One account's tasks in priority order, and those whose due run waits for the lane."""

    account_id: str
    task_ids: list[str]
    queued: list[str] = Field(default_factory=list)


class WaitingBody(BaseModel):
    """Why a task's next run has not started (``tasks.waiting.why_waiting``)."""

    kind: str = Field(
        description="paused, paused_after_failures, running, broker_outage, no_worker, queued, "
        "lane, retry, requested, jitter, due, past_end or outside_hours (the first that fits)."
    )
    message: str = Field(description="A sentence for a person; credentials masked.")
    since: datetime | None = Field(description="Since when it waits, when known.")
    until: datetime | None = Field(description="Until when it waits, when known.")


class TaskView(TaskRecord):
    """A task as ``GET /tasks/{id}`` and ``GET /tasks`` show it: its record and why it waits."""

    waiting: WaitingBody | None = Field(
        default=None,
        description="Why its next run has not started: a run out, its account's lane, a "
        "worker, the broker, a retry, its hours, a pause (null: it is simply not due yet, or "
        "completed). Not part of the record: a change sends none.",
    )


class TaskList(BaseModel):
    """Tasks (ordered by account, then priority) and the live state around them."""

    tasks: list[TaskView]
    total: int = Field(description="How many tasks the dispatcher has, before filtering.")
    next: str | None = Field(
        default=None,
        description="More tasks follow: pass this as `after` for the next page (null: none).",
    )
    queued: dict[str, list[str]] = Field(
        description="Account id -> tasks whose due run waits for the account's lane."
    )
    timezone: str = Field(description="The zone of the hour windows.")
    state_file: str


class NextRuns(BaseModel):
    """A task's next planned runs (for a paused task: if it were resumed now)."""

    task_id: str
    status: str
    if_resumed: bool
    runs: list[datetime]


class RunFilters(BaseModel):
    """Which recorded runs to list (query parameters); newest first."""

    account: str | None = None
    failed: bool | None = Field(
        default=None, description="true: failed, lost and expired runs; false: succeeded ones."
    )
    since: datetime | None = Field(default=None, description="Started at or after (with offset).")
    until: datetime | None = Field(default=None, description="Started before (with offset).")
    limit: int = Field(default=100, ge=1, le=MAX_QUERY_LIMIT)
    before_run: str | None = Field(
        default=None, description="The next page: the run_id of the previous page's last entry."
    )


class SaveHealthBody(BaseModel):
    """How saving is going (``TaskDispatcher.save_health``)."""

    ok: bool
    last_saved_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    failed_saves: int
    unsaved_task_ids: list[str]


class LeaderBody(BaseModel):
    """The instance leading a cluster that shares a store."""

    id: str | None = Field(description="Its id in the lease: host, process and a random part.")
    url: str | None = Field(description="Its control API (its run --advertise-url), if given.")


class Health(BaseModel):
    """The dispatcher's state: a monitor alerts on ``status != "ok"``."""

    status: str = Field(description="ok, degraded (the latest save failed) or stopped.")
    version: str
    running: bool
    uptime_seconds: float | None
    directory: str
    state_file: str
    timezone: str
    tasks: int
    tasks_by_status: dict[str, int]
    backend: dict[str, Any] = Field(description="The run backend: its name and its runs.")
    save_health: SaveHealthBody
    role: str = Field(
        default="leader",
        description="leader, or standby (another instance of the cluster leads: changes are "
        "answered with 307 to the leader's URL). A dispatcher on a file always leads.",
    )
    epoch: int | None = Field(
        default=None, description="The fencing epoch it leads in (null: a store of one owner)."
    )
    leader: LeaderBody | None = Field(
        default=None, description="Who leads the cluster (null: a store of one owner)."
    )
