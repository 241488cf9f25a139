"""The one way the command line reaches a dispatcher's tasks: the :class:`Gateway` protocol.

Two implementations answer it: :class:`RemoteGateway` goes through a running dispatcher's
control API (its ``control.sock``, or ``--url``) and sees live state; :class:`LocalGateway`
works on a stopped store: it reads through the store's read-only open, without owning it
(:meth:`jobstores.state.StateStore.read`), or (for a command that changes something) opens a
:class:`TaskDispatcher` that owns the directory until the command ends. :func:`open_gateway`
picks one; each command is written once against the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
from collections.abc import Iterator, Mapping
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

import click

from jobstores.format import CorruptFileError
from jobstores.snapshot import StateSnapshot, read_snapshot
from jobstores.stores import resolve_store
from scheduler.cli_parse import Options
from scheduler.cli_render import Listing, errors, fail, library_warnings
from scheduler.dispatcher import CONTROL_SOCKET
from scheduler.errors import (
    ControlError,
    HistoryUnavailableError,
    NewerFormatError,
    SaveFailedError,
    TaskNotFoundError,
    UnknownTaskTypeError,
)
from scheduler.history import HISTORY_FILENAME, RunEntry, read_runs
from scheduler.serve import TaskDispatcher
from scheduler.triggers import RunPreview, preview_runs
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.model import TaskRecord
from tasks.registry import default_registry
from tasks.secrets import mask_secrets
from tasks.zones import resolve_timezone

if TYPE_CHECKING:
    from scheduler.control.client import ControlClient

__all__ = [
    "CONTROL_EXTRA_HINT",
    "AccountReport",
    "Gateway",
    "LocalGateway",
    "RemoteGateway",
    "control_client",
    "open_gateway",
    "running_factory",
]

CONTROL_EXTRA_HINT = "pip install 'task-dispatcher[control]'"

AccountReport = list[tuple[str, str, bool]]
"""Per task of an account paused or resumed: its id, status and whether it changed."""


class Gateway(Protocol):
    """What the commands ask of a dispatcher's tasks, wherever they are."""

    def zone(self) -> tzinfo:
        """The zone to show times in: ``--timezone``, else the dispatcher's."""
        ...

    def list_tasks(
        self, *, account: str | None, status: str | None, show_secrets: bool, page: int
    ) -> Listing:
        """The tasks (of ``account``, in ``status``), by account then priority, masked as
        :meth:`get_task`'s; a running dispatcher is read ``page`` tasks per request."""
        ...

    def state_file(self) -> str:
        """The state file, as the dispatcher names it."""
        ...

    def get_task(self, task_id: str, *, show_secrets: bool = False) -> TaskRecord:
        """One task's record (secret-looking kwargs masked unless ``show_secrets``); raises
        :class:`TaskNotFoundError` for an unknown id."""
        ...

    def next_runs(self, task_id: str, count: int) -> RunPreview:
        """The task's next ``count`` planned runs (``if resumed now`` for a paused one)."""
        ...

    def account_tasks(self, account_id: str) -> list[str]:
        """The account's task ids in priority order."""
        ...

    def waiting_for_workers(self) -> Mapping[str, Any] | None:
        """The fleet's queued runs by sys_type, with the workers registered; None when
        nothing runs (a stopped store has no fleet to ask)."""
        ...

    def add_task(self, keywords: Mapping[str, Any]) -> str:
        """Add one task (``add_task``'s keywords); its id once saved."""
        ...

    def pause_task(self, task_id: str) -> TaskRecord:
        """Pause; the record once saved."""
        ...

    def resume_task(self, task_id: str) -> TaskRecord:
        """Resume; the record once saved."""
        ...

    def run_now(self, task_id: str) -> TaskRecord:
        """Ask for one run now; the record once the request is saved."""
        ...

    def remove_task(self, task_id: str) -> None:
        """Remove for good (saved when this returns)."""
        ...

    def reorder_task(self, task_id: str, position: int) -> tuple[str, list[str]]:
        """Move within the account's order; the account and its ids in the new order."""
        ...

    def update_task(self, task_id: str, changes: Mapping[str, Any]) -> TaskRecord:
        """Edit in place (only the fields given); the record once saved."""
        ...

    def pause_account(self, account_id: str) -> AccountReport:
        """Pause every task of the account in one commit."""
        ...

    def resume_account(self, account_id: str) -> AccountReport:
        """Resume every paused task of the account in one commit."""
        ...

    def runs(
        self,
        task_id: str | None,
        *,
        account: str | None,
        failed: bool | None,
        since: datetime | None,
        limit: int,
    ) -> list[RunEntry]:
        """Run history entries, newest first."""
        ...


# ---------------------------------------------------------------------- a running dispatcher


class RemoteGateway:
    """The gateway through a running dispatcher's control API (:class:`ControlClient`)."""

    def __init__(self, client: ControlClient, options: Options) -> None:
        self._client = client
        self._options = options

    def zone(self) -> tzinfo:
        return self._options.zone() or self._client.zone()

    def list_tasks(
        self, *, account: str | None, status: str | None, show_secrets: bool, page: int
    ) -> Listing:
        query: dict[str, Any] = {
            "account": account,
            "status": status,
            "show_secrets": show_secrets,
            "limit": page,
        }
        live = self._client.list_tasks(**query)
        while live.get("next"):  # the rest, a page at a time (None from an older server)
            more = self._client.list_tasks(**query, after=live["next"])
            live["tasks"] += more["tasks"]
            live["next"] = more["next"]
        return Listing(
            records=live["tasks"],
            store_empty=live["total"] == 0,
            zone=self._options.zone() or ZoneInfo(live["timezone"]),
            state_file=live["state_file"],
            queued=frozenset(tid for ids in live["queued"].values() for tid in ids),
        )

    def state_file(self) -> str:
        return self._client.state_file()

    def get_task(self, task_id: str, *, show_secrets: bool = False) -> TaskRecord:
        try:
            return self._client.get_task(task_id, show_secrets=show_secrets)
        except ControlError as exc:
            if exc.status == 404 and exc.field == "task_id":
                raise TaskNotFoundError(task_id) from exc
            raise

    def next_runs(self, task_id: str, count: int) -> RunPreview:
        return self._client.next_runs(task_id, count)

    def account_tasks(self, account_id: str) -> list[str]:
        return self._client.account_tasks(account_id)

    def waiting_for_workers(self) -> Mapping[str, Any] | None:
        backend = (self._client.health().get("backend") or {}).get("health") or {}
        waiting: Mapping[str, Any] | None = backend.get("waiting_for_workers")
        return waiting

    def add_task(self, keywords: Mapping[str, Any]) -> str:
        return self._client.add_task(keywords)

    def pause_task(self, task_id: str) -> TaskRecord:
        return self._client.pause_task(task_id)

    def resume_task(self, task_id: str) -> TaskRecord:
        return self._client.resume_task(task_id)

    def run_now(self, task_id: str) -> TaskRecord:
        return self._client.run_now(task_id)

    def remove_task(self, task_id: str) -> None:
        self._client.remove_task(task_id)

    def reorder_task(self, task_id: str, position: int) -> tuple[str, list[str]]:
        return self._client.reorder_task(task_id, position)

    def update_task(self, task_id: str, changes: Mapping[str, Any]) -> TaskRecord:
        return self._client.update_task(task_id, changes)

    def pause_account(self, account_id: str) -> AccountReport:
        return _report(self._client.pause_account(account_id))

    def resume_account(self, account_id: str) -> AccountReport:
        return _report(self._client.resume_account(account_id))

    def runs(
        self,
        task_id: str | None,
        *,
        account: str | None,
        failed: bool | None,
        since: datetime | None,
        limit: int,
    ) -> list[RunEntry]:
        found = self._client.runs(task_id, account=account, failed=failed, since=since, limit=limit)
        return [RunEntry.model_validate(data) for data in found]


def _report(tasks: list[dict[str, Any]]) -> AccountReport:
    return [(t["task_id"], t["status"], t["changed"]) for t in tasks]


def control_client(options: Options) -> ControlClient | None:
    """A client of the dispatcher to go through: ``--url``'s, else the one serving the
    directory's socket; None when no dispatcher answers (commands then use the file)."""
    if options.url is None and not (options.dir / CONTROL_SOCKET).exists():
        return None  # the common case costs no import
    try:
        from scheduler.control.client import ControlClient
    except ImportError:
        if options.url is not None:
            fail(f"--url needs the control extra: {CONTROL_EXTRA_HINT}")
        return None
    if options.url is not None:
        return ControlClient(url=options.url, token=options.token)
    return ControlClient.probe(options.dir / CONTROL_SOCKET, options.token)


# ---------------------------------------------------------------------- a stopped store


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


class _Inert:
    """Stands in for a task manager in commands that never run anything."""

    def run(self) -> None:  # pragma: no cover - never called
        raise RuntimeError("inert task manager")


def running_factory(options: Options) -> TaskManagerFactory:
    """For commands that create real managers: the host's factory, else the task types."""
    return _import_factory(options.factory) if options.factory else default_registry


def _editing_factory(options: Options) -> TaskManagerFactory:
    """For pause/resume/remove/reorder: managers are re-created on load but never run."""
    if options.factory:
        return _import_factory(options.factory)

    def factory(**kwargs: Any) -> TaskManager:
        try:
            return default_registry(**kwargs)
        except (UnknownTaskTypeError, ValueError, TypeError):
            return _Inert()

    return factory


@contextlib.contextmanager
def _owned(options: Options, factory: TaskManagerFactory) -> Iterator[TaskDispatcher]:
    """A dispatcher owning the directory for one command; a failed save gives it up unsaved
    and is reported in one line (exit status 1)."""
    with errors(), library_warnings():
        dispatcher = TaskDispatcher(
            options.dir,
            task_manager_factory=factory,
            timezone=options.zone(),
            history=False,  # editing commands run nothing
            convert_timezone=options.convert_timezone,
        )
        try:
            yield dispatcher
        except SaveFailedError as exc:
            # A one-shot command has no background to retry in: nothing is left pending.
            dispatcher.close(save=False)
            command = click.get_current_context().info_name
            fail(
                f"{command} {' '.join(exc.task_ids)}: not saved to {exc.path} ({exc.cause}); "
                "nothing was changed",
                status=1,
            )
        finally:
            dispatcher.close()


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
    """The gateway of a stopped store: reads go to the state file without owning it (they work
    while the directory is in use); changes go through a dispatcher owning the directory,
    opened by :func:`open_gateway` for a command that changes something."""

    def __init__(self, options: Options, dispatcher: TaskDispatcher | None = None) -> None:
        self._options = options
        self._dispatcher = dispatcher
        self._read: StateSnapshot | None = None

    def _owner(self) -> TaskDispatcher:
        assert self._dispatcher is not None, "a change needs open_gateway(change=True)"
        return self._dispatcher

    def _snapshot(self) -> StateSnapshot:
        if self._read is None:
            options = self._options
            try:
                # The stopped store's read-only open: no lock, no write, no task manager.
                self._read = read_snapshot(
                    options.dir,
                    options.zone(),
                    convert=options.convert_timezone,
                    store=resolve_store(None, options.dir),
                )
            except (CorruptFileError, NewerFormatError) as exc:
                fail(str(exc))
        return self._read

    def zone(self) -> tzinfo:
        if self._dispatcher is not None:
            return self._dispatcher.timezone
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
        if self._dispatcher is not None:
            return str(self._dispatcher.state_file)
        return str(self._snapshot().path)

    def get_task(self, task_id: str, *, show_secrets: bool = False) -> TaskRecord:
        if self._dispatcher is not None:
            return _shown(self._dispatcher.get_task(task_id), show_secrets)
        found = self._snapshot().get(task_id)
        if found is None:
            raise TaskNotFoundError(task_id)
        return _shown(found, show_secrets)

    def next_runs(self, task_id: str, count: int) -> RunPreview:
        record, zone = self.get_task(task_id), self.zone()
        return preview_runs(record, zone, datetime.now(zone), count)

    def account_tasks(self, account_id: str) -> list[str]:
        if self._dispatcher is not None:
            return list(self._dispatcher.account_tasks[account_id])
        return list(self._snapshot().account_tasks[account_id])

    def waiting_for_workers(self) -> Mapping[str, Any] | None:
        return None

    def add_task(self, keywords: Mapping[str, Any]) -> str:
        return asyncio.run(self._owner().add_task(**keywords))

    def pause_task(self, task_id: str) -> TaskRecord:
        self._owner().pause_task(task_id)
        return self._owner().get_task(task_id)

    def resume_task(self, task_id: str) -> TaskRecord:
        self._owner().resume_task(task_id)
        return self._owner().get_task(task_id)

    def run_now(self, task_id: str) -> TaskRecord:
        # A manual run is carried out by a running dispatcher's lanes; a stopped store has none.
        fail(
            f"no dispatcher is running on {str(self._options.dir)!r} (nothing answers on its "
            f"{CONTROL_SOCKET}): run-now needs one (start it with 'task-dispatcher run', "
            "or give --url)",
            status=1,
        )

    def remove_task(self, task_id: str) -> None:
        self._owner().remove_task(task_id)

    def reorder_task(self, task_id: str, position: int) -> tuple[str, list[str]]:
        dispatcher = self._owner()
        dispatcher.reorder_task(task_id, position)
        account = dispatcher.get_task(task_id).account_id
        return account, list(dispatcher.account_tasks[account])

    def update_task(self, task_id: str, changes: Mapping[str, Any]) -> TaskRecord:
        return self._owner().update_task(task_id, **changes)

    def pause_account(self, account_id: str) -> AccountReport:
        changes = self._owner().pause_account(account_id)
        return [(c.task_id, c.status.value, c.changed) for c in changes]

    def resume_account(self, account_id: str) -> AccountReport:
        changes = self._owner().resume_account(account_id)
        return [(c.task_id, c.status.value, c.changed) for c in changes]

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
        if not (options.dir / HISTORY_FILENAME).exists():
            return []
        try:
            return read_runs(
                options.dir,
                options.zone() or resolve_timezone(None),
                task_id=task_id,
                account_id=account,
                failed=failed,
                since=since,
                limit=limit,
            )
        except (HistoryUnavailableError, ValueError) as exc:
            fail(str(exc))


@contextlib.contextmanager
def open_gateway(
    options: Options, *, change: bool = False, creates: bool = False, runs_tasks: bool = False
) -> Iterator[Gateway]:
    """The running dispatcher's gateway if one answers, else the stopped store's.

    ``change``: the command changes something, so a stopped store is opened owning the
    directory (it must exist unless the change ``creates`` a task: a mistyped --dir must not
    leave a new, empty store behind). ``runs_tasks``: the tasks' managers are created as for
    running them (an added task is checked by its type), not stood in for.
    Errors inside read as one line (exit status 2); a failed save as one line (status 1).
    """
    client = control_client(options)
    if client is not None:
        with client, errors():
            yield RemoteGateway(client, options)
        return
    if not change:
        with errors():
            yield LocalGateway(options)
        return
    if not creates and not options.dir.is_dir():
        fail(f"no dispatcher directory {str(options.dir)!r}")
    factory = running_factory(options) if runs_tasks else _editing_factory(options)
    with _owned(options, factory) as dispatcher, errors():
        yield LocalGateway(options, dispatcher)
