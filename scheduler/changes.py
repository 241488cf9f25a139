"""``TaskChanges``: the dispatcher API's changes to its tasks, each applied, saved, scheduled
and announced.

A change is one command (or one per task of an account, at one instant: one commit) applied
to the store; then it is saved, the scheduler woken, the events told, and, last, a failed
save raised (:class:`~scheduler.saving.SaveFailures`): a change whose save failed is in
effect all the same. A closed dispatcher, or a standby of a shared store, changes nothing.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, tzinfo
from typing import Any, NamedTuple

from jobstores.commands import (
    AddTasks,
    EditTask,
    PauseTask,
    RemoveTask,
    RequestRun,
    ResumeTask,
)
from jobstores.core import Applied
from jobstores.jsonfile import JsonJobStore
from scheduler.backends.local import create_manager
from scheduler.intake import UNSET, TaskIntake
from scheduler.leadership import Standing
from scheduler.listeners import TaskPaused
from scheduler.relay import EventRelay
from scheduler.runpath import RunPath
from scheduler.saving import SaveFailures
from tasks import lifecycle
from tasks.errors import AccountNotFoundError, DispatcherClosedError
from tasks.manager import TaskManagerFactory
from tasks.model import TaskRecord, TaskStatus
from tasks.runs import RunBackend
from tasks.schedule import RunPreview, preview_runs

__all__ = ["AccountChange", "TaskChanges", "checked_id", "prepare_manager"]

logger = logging.getLogger("scheduler.dispatcher")  # the dispatcher's log, as it always was


def checked_id(value: Any, name: str = "task_id") -> str:
    """``value`` if it is a string; else a ``TypeError`` naming the parameter."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: must be a string, not {type(value).__name__}")
    return value


def prepare_manager(
    backend: RunBackend,
    factory: TaskManagerFactory | None,
    record: TaskRecord,
    *,
    renew: bool = False,
) -> None:
    """Create ``record``'s manager now: a task whose manager cannot be created is refused
    at add time, and kept unrestored at load. ``renew``: its kwargs or sys_type were
    edited, so the manager made for the old ones is replaced."""
    backend.prepare(record.task_id, record.sys_type, record.kwargs, renew=renew)
    if backend.remote and factory is not None:
        # The workers create the managers; this process checks it could.
        create_manager(factory, record.sys_type, record.kwargs)


class AccountChange(NamedTuple):
    """What pausing or resuming a whole account did to one of its tasks."""

    task_id: str
    status: TaskStatus
    """The task's status after the change."""
    changed: bool
    """False for a task already so (paused, or not paused), or completed."""


class TaskChanges:
    """Applies, saves, schedules and announces the API's changes (see the module)."""

    def __init__(
        self,
        store: JsonJobStore,
        path: RunPath,
        relay: EventRelay,
        backend: RunBackend,
        check_manager: Callable[..., None],
        standing: Callable[[], Standing | None],
    ) -> None:
        self._store = store
        self._intake = TaskIntake(store)
        self._wake = path.wake
        self._handoff = path.handoff
        self._relay = relay
        self._backend = backend
        self._check_manager = check_manager
        self._standing = standing
        self._failures = SaveFailures(store)

    def check_open(self) -> None:
        """Raise :class:`DispatcherClosedError` once stopped, and
        :class:`~tasks.errors.NotLeaderError` on a standby."""
        if self._store.closed:
            raise DispatcherClosedError(
                f"the dispatcher on {str(self._store.directory)!r} was stopped; create a new one"
            )
        standing = self._standing()
        if standing is not None:
            standing.check_change()  # raises NotLeaderError on a standby

    async def add(self, tasks: Iterable[Mapping[str, Any]]) -> list[str]:
        """Add ``tasks`` (each the keywords of ``add_task``), all or none, with one save."""
        self.check_open()
        now = self._store.now()
        records = self._intake.new_records(tasks, now)
        for record in records:
            self._check_manager(record)
        added = self._store.apply(AddTasks(records), now, tell=False)
        saved = await self._store.save_async()
        self._wake()
        for record in added.records:
            logger.info(
                "task %s added for account %s (%s, every %ss, hours %d-%d), first run %s",
                record.task_id,
                record.account_id,
                record.task_type,
                record.interval,
                *record.valid_time_range,
                record.next_execution_time,
            )
        self._relay.tell_applied(added)
        self._failures.check(saved, (record.task_id for record in records))
        return [record.task_id for record in records]

    def pause(self, task_id: str) -> None:
        """Pause ``task_id`` (its run sent but not started is withdrawn)."""
        self.check_open()
        checked_id(task_id)
        applied = self._store.apply(PauseTask(task_id), tell=False)
        record = applied.record
        self._handoff.withdraw_sent(record)
        saved = self._store.save()
        logger.info("task %s (account %s) is %s", task_id, record.account_id, record.status.value)
        self._relay.tell_applied(applied)
        self._failures.check(saved, (task_id,))

    def resume(self, task_id: str) -> None:
        """Resume ``task_id``."""
        self.check_open()
        checked_id(task_id)
        applied = self._store.apply(ResumeTask(task_id), tell=False)
        record = applied.record
        saved = self._store.save()
        self._wake()
        self._relay.tell_applied(applied)
        logger.info(
            "task %s (account %s) is %s, next run %s",
            task_id,
            record.account_id,
            record.status.value,
            record.next_execution_time,
        )
        self._failures.check(saved, (task_id,))

    def _edited_rules(
        self, current: TaskRecord, now: datetime, edits: Mapping[str, Any]
    ) -> TaskRecord:
        """``current`` with ``edits`` (``update_task``'s keywords) validated and applied."""
        return self._intake.edited(current, now, **edits)

    def update(self, task_id: str, **edits: Any) -> TaskRecord:
        """Edit ``task_id``'s rules (``update_task``'s keywords); returns its new record."""
        self.check_open()
        checked_id(task_id)
        current = self._store.table.get(task_id)
        now = self._store.now()
        rules = self._edited_rules(current, now, edits)
        self._check_manager(
            rules, renew=(rules.kwargs, rules.sys_type) != (current.kwargs, current.sys_type)
        )
        applied = self._store.apply(EditTask(task_id, rules), now, tell=False)
        record = applied.record
        saved = self._store.save()
        self._wake()
        self._relay.tell_applied(applied)
        logger.info(
            "task %s (account %s) updated: every %ss, hours %d-%d, until %s; %s, next run %s",
            task_id,
            record.account_id,
            record.interval,
            *record.valid_time_range,
            record.task_end_time,
            record.status.value,
            record.start_time,
        )
        self._failures.check(saved, (task_id,))
        return record.snapshot()

    def preview_edit(self, task_id: str, count: int, tz: tzinfo, **edits: Any) -> RunPreview:
        """The next ``count`` runs ``task_id`` would have after :meth:`update` with
        ``edits``, changing nothing."""
        checked_id(task_id)
        current = self._store.table.get(task_id)
        now = self._store.now()
        rules = self._edited_rules(current, now, {**edits, "kwargs": UNSET})
        edited = lifecycle.edited(current, rules, self._store.schedule(rules), now)
        return preview_runs(edited, tz, now, count)

    def remove(self, task_id: str) -> None:
        """Delete ``task_id`` (its run sent but not started is withdrawn)."""
        self.check_open()
        checked_id(task_id)
        applied = self._store.apply(RemoveTask(task_id), tell=False)
        record = applied.record
        self._handoff.withdraw_sent(record)
        self._backend.forget(task_id)
        saved = self._store.save()
        logger.info("task %s (account %s) removed", task_id, record.account_id)
        self._relay.tell_applied(applied)
        self._failures.check(saved, (task_id,))

    def reorder(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` in its account's order."""
        self.check_open()
        checked_id(task_id)
        if isinstance(position, bool):
            raise TypeError("position: must be an integer, not bool")
        try:
            position = operator.index(position)
        except TypeError:
            raise TypeError(
                f"position: must be an integer, not {type(position).__name__}"
            ) from None
        self._store.reorder(task_id, position)
        saved = self._store.save()
        logger.info("task %s moved to position %d", task_id, position)
        self._failures.check(saved, (task_id,))

    def request_run(self, task_id: str) -> TaskRecord:
        """Ask for a manual run of ``task_id``, queued for its lane once saved."""
        self.check_open()
        checked_id(task_id)
        applied = self._store.apply(RequestRun(task_id), tell=False)
        record = applied.record
        first = applied.before is not None and applied.before.run_requested is None
        saved = self._store.save()
        if first and record.run_requested is not None:
            self._handoff.submit_manual(task_id)
        logger.info(
            "task %s (account %s): run now asked for%s",
            task_id,
            record.account_id,
            "" if first else " (already asked for)",
        )
        self._failures.check(saved, (task_id,))
        return record.snapshot()

    def pause_account(self, account_id: str) -> list[AccountChange]:
        """Pause every task of ``account_id`` in one commit."""
        changes, saved = self._change_account(account_id, PauseTask)
        for applied in changes:
            if any(isinstance(event, TaskPaused) for event in applied.events):
                self._handoff.withdraw_sent(applied.record)
            self._relay.tell_applied(applied)
        return self._account_report(account_id, "paused", changes, saved)

    def resume_account(self, account_id: str) -> list[AccountChange]:
        """Resume every paused task of ``account_id`` in one commit."""
        changes, saved = self._change_account(account_id, ResumeTask)
        for applied in changes:
            self._relay.tell_applied(applied)
        return self._account_report(account_id, "resumed", changes, saved)

    def _change_account(
        self, account_id: str, command: Callable[[str], PauseTask | ResumeTask]
    ) -> tuple[list[Applied], bool]:
        """Apply ``command`` to every task of ``account_id`` under the store's lock, at one
        instant, then save once: one commit. Returns what each command did, and whether the
        commit is on disk."""
        self.check_open()
        checked_id(account_id, "account_id")
        changes: list[Applied] = []
        now = self._store.now()
        with self._store.lock:
            task_ids = self._store.table.account_tasks().get(account_id)
            if not task_ids:
                raise AccountNotFoundError(account_id)
            for task_id in task_ids:
                changes.append(self._store.apply(command(task_id), now, tell=False))
        saved = self._store.save()
        self._wake()
        return changes, saved

    def _account_report(
        self,
        account_id: str,
        verb: str,
        changes: list[Applied],
        saved: bool,
    ) -> list[AccountChange]:
        report = []
        for applied in changes:
            after = applied.record
            report.append(AccountChange(after.task_id, after.status, after is not applied.before))
        logger.info(
            "account %s: %d of %d task(s) %s",
            account_id,
            sum(change.changed for change in report),
            len(report),
            verb,
        )
        self._failures.check(saved, (change.task_id for change in report))
        return report
