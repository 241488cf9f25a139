"""The command line's gateway to a stopped store: :class:`LocalGateway`.

Reads go to the state file without owning it (:meth:`jobstores.state.StateStore.read`: they
work while the directory is in use). A command that changes something owns the store for as
long as it runs (:class:`~jobstores.owned.OwnedStore`: the directory's lock, a load that
creates no task manager, the core's commands, a durable commit before the answer): the same
rules a running dispatcher applies, without a scheduler or a run backend. Only a task being
added (and an edit of its keywords, given ``--factory``) has its manager created, to refuse a
task that could not run, as a running dispatcher does.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from datetime import datetime, tzinfo
from typing import Any

from jobstores.commands import (
    AddTasks,
    EditTask,
    PauseTask,
    RemoveTask,
    ReorderTask,
    ResumeTask,
)
from jobstores.format import CorruptFileError
from jobstores.owned import OwnedStore
from jobstores.snapshot import StateSnapshot, read_snapshot
from jobstores.state import StateStore
from jobstores.stores import resolve_store
from scheduler.backends.execution import create_manager
from scheduler.cli_parse import Options
from scheduler.cli_render import Listing, fail
from scheduler.dispatcher import CONTROL_SOCKET
from scheduler.errors import (
    AccountNotFoundError,
    HistoryUnavailableError,
    NewerFormatError,
    SaveFailedError,
    TaskNotFoundError,
)
from scheduler.history import (
    HISTORY_FILENAME,
    RunEntry,
    SharedRunsStore,
    read_runs,
    read_shared_runs,
)
from scheduler.intake import UNSET, TaskIntake
from scheduler.triggers import RunPreview, preview_runs
from tasks.manager import TaskManagerFactory
from tasks.model import TaskRecord
from tasks.registry import default_registry
from tasks.secrets import mask_secrets
from tasks.waiting import Waiting, why_waiting
from tasks.zones import resolve_timezone

__all__ = [
    "AccountReport",
    "LocalGateway",
    "ManagerCheck",
    "manager_check",
    "options_store",
    "running_factory",
]

AccountReport = list[tuple[str, str, bool]]
"""Per task of an account paused or resumed: its id, status and whether it changed."""

ManagerCheck = Callable[[TaskRecord], None]
"""Creates a record's task manager to see that it can be: raises
:class:`~tasks.errors.InvalidTaskError` naming ``task_manager_factory`` if not."""


def _import_factory(spec: str) -> TaskManagerFactory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        fail(f"--factory {spec!r}: expected module:attr, e.g. myapp.tasks:TaskManager")
    try:
        module = importlib.import_module(module_name)
        factory = functools.reduce(getattr, attr.split("."), module)
    except (ImportError, AttributeError) as exc:
        fail(f"--factory {spec!r}: {exc}")
    if not callable(factory):
        fail(f"--factory {spec!r} is not callable")
    result: TaskManagerFactory = factory
    return result


def running_factory(options: Options) -> TaskManagerFactory:
    """For commands that create real managers: the host's factory, else the task types."""
    return _import_factory(options.factory) if options.factory else default_registry


def manager_check(options: Options, *, adds: bool) -> ManagerCheck | None:
    """How a change checks the managers of what it adds or edits: an added task (``adds``)
    with the host's factory or the task types, an edit of a task's keywords with the host's
    factory only when ``--factory`` names it (a task type this process does not know is
    edited without one); None: nothing to check."""
    if not adds and not options.factory:
        return None
    factory = running_factory(options)

    def check(record: TaskRecord) -> None:
        create_manager(factory, record.sys_type, record.kwargs)

    return check


def options_store(options: Options) -> StateStore:
    """The stopped store the options name: ``--store URL`` (``$TASK_DISPATCHER_STORE``) when
    given, else the journal on ``--dir``. Raises ``ValueError`` naming ``store`` for a URL no
    store is known for."""
    return resolve_store(options.store or None, options.dir)


def _shown(record: TaskRecord, show_secrets: bool) -> TaskRecord:
    """``record`` as the control API answers it: secret-looking kwargs masked unless
    ``show_secrets`` (the stored record is never changed)."""
    if show_secrets:
        return record
    masked = mask_secrets(record.kwargs)
    if masked == record.kwargs:
        return record
    return TaskRecord.model_validate(record.to_json_dict(masked=True))


class LocalGateway:
    """The gateway of a stopped store (see the module docstring). ``owned``: the store owned
    for a command that changes something (:func:`~scheduler.cli_gateway.open_gateway` opens
    it); ``check``: how added and edited tasks' managers are checked (:func:`manager_check`).

    A change answers with the record the core formed and committed, not a copy of it: do
    not change its ``kwargs``.
    """

    def __init__(
        self,
        options: Options,
        owned: OwnedStore | None = None,
        *,
        check: ManagerCheck | None = None,
    ) -> None:
        self._options = options
        self._owned = owned
        self._check = check
        self._read: StateSnapshot | None = None

    # ------------------------------------------------------------------ reading

    def _snapshot(self) -> StateSnapshot:
        if self._read is None:
            options = self._options
            try:
                # The stopped store's read-only open: no lock, no write, no task manager.
                self._read = read_snapshot(
                    options.dir,
                    options.zone(),
                    convert=options.convert_timezone,
                    store=options_store(options),
                )
            except (CorruptFileError, NewerFormatError) as exc:
                fail(str(exc))
        return self._read

    def zone(self) -> tzinfo:
        if self._owned is not None:
            return self._owned.timezone
        return self._snapshot().timezone

    def list_tasks(
        self, *, account: str | None, status: str | None, show_secrets: bool, page: int
    ) -> Listing:
        snapshot = self._snapshot()
        order = {tid: i for ids in snapshot.account_tasks.values() for i, tid in enumerate(ids)}
        records = [
            _shown(r, show_secrets)
            for r in snapshot.records
            if (account is None or r.account_id == account)
            and (status is None or r.status == status)
        ]
        records.sort(key=lambda r: (r.account_id, order.get(r.task_id, 0)))
        return Listing(
            records=records,
            store_empty=not snapshot.records,
            zone=snapshot.timezone,
            state_file=str(snapshot.path),
            unreadable=len(snapshot.unreadable),
        )

    def state_file(self) -> str:
        if self._owned is not None:
            return str(self._owned.path)
        return str(self._snapshot().path)

    def get_task(self, task_id: str, *, show_secrets: bool = False) -> TaskRecord:
        if self._owned is not None:
            return _shown(self._owned.table.get(task_id), show_secrets)
        found = self._snapshot().get(task_id)
        if found is None:
            raise TaskNotFoundError(task_id)
        return _shown(found, show_secrets)

    def next_runs(self, task_id: str, count: int) -> RunPreview:
        record, zone = self.get_task(task_id), self.zone()
        return preview_runs(record, zone, datetime.now(zone), count)

    def account_tasks(self, account_id: str) -> list[str]:
        if self._owned is not None:
            return self._owned.table.account_tasks()[account_id]
        return list(self._snapshot().account_tasks[account_id])

    def get_task_view(
        self, task_id: str, *, show_secrets: bool = False
    ) -> tuple[TaskRecord, Waiting | None]:
        record, zone = self.get_task(task_id, show_secrets=show_secrets), self.zone()
        return record, why_waiting(record, datetime.now(zone), zone)

    def runs(
        self,
        task_id: str | None,
        *,
        account: str | None,
        failed: bool | None,
        since: datetime | None,
        limit: int,
    ) -> list[RunEntry]:
        options = self._options
        filters: dict[str, Any] = {
            "task_id": task_id,
            "account_id": account,
            "failed": failed,
            "since": since,
            "limit": limit,
        }
        zone = options.zone() or resolve_timezone(None)
        try:
            store = options_store(options)
            if isinstance(store, SharedRunsStore):  # the cluster's history, in its store
                return read_shared_runs(store, zone, **filters)
            if not (options.dir / HISTORY_FILENAME).exists():
                return []
            return read_runs(options.dir, zone, **filters)
        except (HistoryUnavailableError, ValueError) as exc:
            fail(str(exc))

    # ------------------------------------------------------------------ changing

    def _owner(self) -> OwnedStore:
        assert self._owned is not None, "a change needs open_gateway(change=True)"
        return self._owned

    def _commit(self, task_ids: tuple[str, ...]) -> None:
        """Make the change durable before the command answers, or raise
        :class:`SaveFailedError` naming ``task_ids`` (reported by ``open_gateway``)."""
        owned = self._owner()
        if not owned.save():
            cause = owned.save_health.last_error or "unknown error"
            raise SaveFailedError(owned.path, task_ids, cause)

    def add_task(self, keywords: Mapping[str, Any]) -> str:
        owned = self._owner()
        now = owned.now()
        (record,) = TaskIntake(owned).new_records([keywords], now)
        if self._check is not None:
            self._check(record)
        owned.apply(AddTasks([record]), now)
        self._commit((record.task_id,))
        return record.task_id

    def pause_task(self, task_id: str) -> TaskRecord:
        record = self._owner().apply(PauseTask(task_id)).record
        self._commit((task_id,))
        return record

    def resume_task(self, task_id: str) -> TaskRecord:
        record = self._owner().apply(ResumeTask(task_id)).record
        self._commit((task_id,))
        return record

    def run_now(self, task_id: str) -> TaskRecord:
        # A manual run is carried out by a running dispatcher's lanes; a stopped store has none.
        fail(
            f"no dispatcher is running on {str(self._options.dir)!r} (nothing answers on its "
            f"{CONTROL_SOCKET}): run-now needs one (start it with 'task-dispatcher run', "
            "or give --url)",
            status=1,
        )

    def remove_task(self, task_id: str) -> None:
        self._owner().apply(RemoveTask(task_id))
        self._commit((task_id,))

    def reorder_task(self, task_id: str, position: int) -> tuple[str, list[str]]:
        owned = self._owner()
        account = owned.apply(ReorderTask(task_id, position)).record.account_id
        self._commit((task_id,))
        return account, owned.table.account_tasks()[account]

    def update_task(self, task_id: str, changes: Mapping[str, Any]) -> TaskRecord:
        owned = self._owner()
        current = owned.table.get(task_id)
        now = owned.now()
        rules = TaskIntake(owned).edited(
            current,
            now,
            interval=changes.get("interval", UNSET),
            valid_time_range=changes.get("valid_time_range", UNSET),
            task_end_time=changes.get("task_end_time", UNSET),
            run_policy=changes.get("run_policy", UNSET),
            kwargs=changes.get("kwargs", UNSET),
        )
        if self._check is not None and (rules.kwargs, rules.sys_type) != (
            current.kwargs,
            current.sys_type,
        ):
            self._check(rules)
        record = owned.apply(EditTask(task_id, rules), now).record
        self._commit((task_id,))
        return record

    def _change_account(
        self, account_id: str, command: Callable[[str], PauseTask | ResumeTask]
    ) -> AccountReport:
        """``command`` applied to every task of the account at one instant, one commit."""
        owned = self._owner()
        now = owned.now()
        with owned.table.lock:
            task_ids = owned.table.account_tasks().get(account_id)
            if not task_ids:
                raise AccountNotFoundError(account_id)
            changes = [owned.apply(command(task_id), now) for task_id in task_ids]
        self._commit(tuple(task_ids))
        return [
            (a.record.task_id, a.record.status.value, a.record is not a.before) for a in changes
        ]

    def pause_account(self, account_id: str) -> AccountReport:
        return self._change_account(account_id, PauseTask)

    def resume_account(self, account_id: str) -> AccountReport:
        return self._change_account(account_id, ResumeTask)
