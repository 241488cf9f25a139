"""The facade's two halves of the public API: :class:`TaskQueries` reads the tasks and their
runs, :class:`TaskCommands` changes them. :class:`~scheduler.dispatcher.Dispatcher` wires the
parts both use, and holds the lifecycle and the listeners.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from jobstores.jsonfile import JsonJobStore
from scheduler.changes import AccountChange, TaskChanges, checked_id
from scheduler.history import RunEntry, RunHistory
from scheduler.intake import UNSET, Unset
from scheduler.runpath import RunPath
from tasks.errors import HistoryUnavailableError
from tasks.model import TaskRecord
from tasks.policy import RunPolicy
from tasks.schedule import RunPreview, preview_runs

__all__ = ["TaskCommands", "TaskQueries"]


class TaskQueries:
    """Reading the tasks, their order, their planned runs and the recorded ones."""

    _store: JsonJobStore
    _changes: TaskChanges
    _history: RunHistory | None
    _path: RunPath
    timezone: tzinfo

    @property
    def order_version(self) -> int:
        """A number that changes whenever an account's task order may have changed (a task
        added, removed or moved); it starts again from 0 in each process."""
        return self._store.table.order_version

    @property
    def account_tasks(self) -> dict[str, list[str]]:
        """Account id -> its task ids in priority order (a copy)."""
        return self._store.table.account_tasks()

    def get_task(self, task_id: str) -> TaskRecord:
        """A snapshot of ``task_id``'s record; raises :class:`TaskNotFoundError`."""
        return self._store.table.get(checked_id(task_id)).snapshot()

    def list_tasks(self) -> list[TaskRecord]:
        """Snapshots of every task, in the order they were added."""
        return [record.snapshot() for record in self._store.table.records()]

    def peek_tasks(self) -> list[TaskRecord]:
        """Every task's current record, in the order they were added, without a copy: for
        readers that only read and look often (the dashboard's live feed).

        Records are immutable and a change replaces a task's record, so a record seen here
        never changes; only its ``kwargs`` dict could be changed in place, and must not be
        (:meth:`list_tasks` gives copies, at about 10 us a task).
        """
        return self._store.table.records()

    def runs(
        self,
        task_id: str | None = None,
        *,
        account_id: str | None = None,
        failed: bool | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        before_run: str | None = None,
    ) -> list[RunEntry]:
        """Recorded runs, newest first, filtered as :meth:`RunHistory.query` describes.

        Blocks on a read of the history (its file, or its database): call it in a thread from
        async code.
        Raises :class:`HistoryUnavailableError` if the history is off.
        """
        if self._history is None:
            raise HistoryUnavailableError(
                f"the run history of {str(self._store.directory)!r} is off"
            )
        return self._history.query(
            task_id=task_id,
            account_id=account_id,
            failed=failed,
            since=since,
            until=until,
            limit=limit,
            before_run=before_run,
        )

    def next_runs(self, task_id: str, count: int = 5) -> RunPreview:
        """``task_id``'s next ``count`` planned runs (for a paused task: if resumed now)."""
        return preview_runs(self._store.table.get(task_id), self.timezone, self._store.now(), count)

    def preview_update(
        self,
        task_id: str,
        count: int = 5,
        *,
        interval: float | timedelta | Unset = UNSET,
        valid_time_range: Sequence[int] | Unset = UNSET,
        task_end_time: date | datetime | str | Unset | None = UNSET,
        run_policy: RunPolicy | Mapping[str, Any] | Unset | None = UNSET,
    ) -> RunPreview:
        """The next ``count`` runs ``task_id`` would have with these changes, changing nothing;
        invalid ones raise :class:`InvalidTaskError` naming the field, as :meth:`update_task`."""
        return self._changes.preview_edit(
            task_id,
            count,
            self.timezone,
            interval=interval,
            valid_time_range=valid_time_range,
            task_end_time=task_end_time,
            run_policy=run_policy,
        )

    def queued_runs(self) -> dict[str, list[str]]:
        """Account id -> ids of tasks whose due run awaits its lane (on the dispatcher's loop)."""
        return self._path.queued_runs(self.account_tasks)


class TaskCommands:
    """Changing the tasks: each change is applied, saved and announced by
    :class:`~scheduler.changes.TaskChanges` before the method returns."""

    _changes: TaskChanges

    async def add_task(
        self,
        *,
        sys_type: str | None = None,
        task_type: str | None = None,
        interval: float | timedelta | None = None,
        valid_time_range: Sequence[int] | None = None,
        task_end_time: date | datetime | str | None = None,
        task_id: str | None = None,
        run_policy: RunPolicy | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Register a task and return its id once it is saved.

        Every keyword besides the named ones goes into the task's ``kwargs``, which (with
        ``task_id`` and ``task_type``) re-create its manager as
        ``factory(sys_type=sys_type, **kwargs)``. The account is ``account_id`` or the one
        keyword ending in ``_account_id``. ``run_policy`` (a :class:`~tasks.RunPolicy` or a dict
        of its fields) sets jitter, retries, a run timeout and auto-pause; the defaults change
        nothing. Raises :class:`InvalidTaskError` (a ``ValueError``)
        naming the field, and saves nothing, if anything is invalid (:class:`TaskExistsError`
        if the id is taken). Raises :class:`SaveFailedError` if the task was added but could
        not be saved (it stays added and saving is retried).
        """
        keywords = dict(kwargs)
        keywords.update(
            sys_type=sys_type,
            task_type=task_type,
            interval=interval,
            task_end_time=task_end_time,
            task_id=task_id,
            run_policy=run_policy,
        )
        if valid_time_range is not None:
            keywords["valid_time_range"] = valid_time_range
        (task_id,) = await self.add_tasks([keywords])
        return task_id

    async def add_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add many tasks with one save: each validated as :meth:`add_task` does, all or none.

        Each item holds :meth:`add_task`'s keywords. Returns the new ids in order. Raises
        :class:`SaveFailedError` if the tasks were added but could not be saved.
        """
        return await self._changes.add(tasks)

    def pause_task(self, task_id: str) -> None:
        """Stop running ``task_id`` until resumed; saved when this returns.

        A run in progress finishes; none starts after it. Pausing a paused or completed task
        changes nothing.
        """
        self._changes.pause(task_id)

    def resume_task(self, task_id: str) -> None:
        """Schedule a paused task again; saved when this returns.

        The next run is one interval after the last run's planned time (not its jittered
        start: the grid never moves) or now, whichever is later, moved to the window's next
        opening if outside it. Resuming a task that is not paused
        changes nothing.
        """
        self._changes.resume(task_id)

    def update_task(
        self,
        task_id: str,
        *,
        interval: float | timedelta | Unset = UNSET,
        valid_time_range: Sequence[int] | Unset = UNSET,
        task_end_time: date | datetime | str | Unset | None = UNSET,
        run_policy: RunPolicy | Mapping[str, Any] | Unset | None = UNSET,
        kwargs: Mapping[str, Any] | Unset = UNSET,
    ) -> TaskRecord:
        """Change ``task_id``'s rules in place; returns its new record, saved when this returns.

        Only the fields given change; each is validated as :meth:`add_task` validates it
        (an :class:`InvalidTaskError` naming the field, and nothing changed, otherwise).
        ``task_end_time=None`` removes the end; ``run_policy`` as a dict changes only the
        policy fields it names (a :class:`~tasks.RunPolicy` or None replaces the policy);
        ``kwargs`` replaces the task keywords (the account must stay the same). The manager
        is created again from the new keywords, and the next run planned again from the new
        rules (from the last run's planned time when there is one); the id, counters, position,
        history and a run in progress are kept; a planned retry is dropped. A paused task
        stays paused; a completed one with a run left under the new rules is pending again.
        """
        return self._changes.update(
            task_id,
            interval=interval,
            valid_time_range=valid_time_range,
            task_end_time=task_end_time,
            run_policy=run_policy,
            kwargs=kwargs,
        )

    def remove_task(self, task_id: str) -> None:
        """Delete ``task_id`` for good; saved when this returns. A run in progress finishes."""
        self._changes.remove(task_id)

    def reorder_task(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based) in its account's priority order.

        Tasks of one account run one at a time in that order. Saved when this returns.
        """
        self._changes.reorder(task_id, position)

    def run_now(self, task_id: str) -> TaskRecord:
        """Run ``task_id`` once, as soon as its account's lane is free; the request is saved
        when this returns (a restart before the run starts still runs it once).

        The run starts whatever the task's hours, end or status (a paused or completed task
        too) and is stopped by the task's ``run_timeout``. It does not move the planned runs
        (``next_execution_time`` and ``last_execution_time`` stay), is never retried and does
        not count toward ``pause_after_failures``; the run history marks it
        ``trigger="manual"``. Asking again before it starts changes nothing. On a dispatcher
        not started yet it runs once :meth:`start` is called. Returns the task's record.
        """
        return self._changes.request_run(task_id)

    def pause_account(self, account_id: str) -> list[AccountChange]:
        """Pause every task of ``account_id`` (an account banned or logged out), in one
        commit, saved when this returns; runs in progress finish.

        Returns what happened to each task, in the account's order; a ``TaskPaused`` event
        is sent for each task paused. Raises :class:`AccountNotFoundError` if no task
        belongs to the account, :class:`SaveFailedError` if the change (in effect, and
        announced) could not be saved.
        """
        return self._changes.pause_account(account_id)

    def resume_account(self, account_id: str) -> list[AccountChange]:
        """Resume every paused task of ``account_id`` (as :meth:`resume_task` does each), in
        one commit, saved when this returns.

        Returns what happened to each task, in the account's order; a ``TaskResumed`` event
        is sent for each task resumed. Raises :class:`AccountNotFoundError` if no task
        belongs to the account, :class:`SaveFailedError` if the change (in effect, and
        announced) could not be saved.
        """
        return self._changes.resume_account(account_id)
