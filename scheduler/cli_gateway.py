"""The one way the command line reaches a dispatcher's tasks: the :class:`Gateway` protocol.

Two implementations answer it: :class:`RemoteGateway` goes through a running dispatcher's
control API (its ``control.sock``, or ``--url``) and sees live state; :class:`LocalGateway`
(:mod:`scheduler.cli_local`) works on a stopped store: it reads through the store's read-only
open, without owning it (:meth:`jobstores.state.StateStore.read`), or (for a command that
changes something) owns the store until the command ends (:class:`jobstores.owned.OwnedStore`:
its lock, the core's commands, a durable commit; no task manager, no scheduler).
:func:`open_gateway` picks one; each command is written once against the protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol
from zoneinfo import ZoneInfo

import click

from jobstores.owned import OwnedStore
from scheduler.cli_local import (
    AccountReport,
    LocalGateway,
    manager_check,
    options_store,
    running_factory,
)
from scheduler.cli_parse import Options
from scheduler.cli_render import Listing, errors, fail, library_warnings
from scheduler.dispatcher import CONTROL_SOCKET
from scheduler.errors import ControlError, SaveFailedError, TaskNotFoundError
from scheduler.history import RunEntry
from scheduler.triggers import RunPreview
from tasks.model import TaskRecord
from tasks.waiting import Waiting

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

    def get_task_view(
        self, task_id: str, *, show_secrets: bool = False
    ) -> tuple[TaskRecord, Waiting | None]:
        """:meth:`get_task`, and why the task waits (:func:`tasks.waiting.why_waiting`: a
        running dispatcher's answer, with what it knows live; a stopped store's from the
        record alone)."""
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

    def get_task_view(
        self, task_id: str, *, show_secrets: bool = False
    ) -> tuple[TaskRecord, Waiting | None]:
        try:
            return self._client.get_task_view(task_id, show_secrets=show_secrets)
        except ControlError as exc:
            if exc.status == 404 and exc.field == "task_id":
                raise TaskNotFoundError(task_id) from exc
            raise

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


@contextlib.contextmanager
def open_gateway(
    options: Options, *, change: bool = False, creates: bool = False, runs_tasks: bool = False
) -> Iterator[Gateway]:
    """The running dispatcher's gateway if one answers, else the stopped store's.

    ``change``: the command changes something, so a stopped store is opened owning the
    directory (it must exist unless the change ``creates`` a task: a mistyped --dir must not
    leave a new, empty store behind); no task manager is created on opening it, and a
    dispatcher owning it makes the command refuse. ``runs_tasks``: the command adds a task,
    whose manager is created to check it (see :func:`~scheduler.cli_local.manager_check`).
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
    if not options.store and not creates and not options.dir.is_dir():
        fail(f"no dispatcher directory {str(options.dir)!r}")
    check = manager_check(options, adds=runs_tasks)
    with errors(), library_warnings():
        owned = _own(options)
        try:
            with errors():
                yield LocalGateway(options, owned, check=check)
        except SaveFailedError as exc:
            # A one-shot command has no background to retry in: nothing is left pending.
            owned.close()
            command = click.get_current_context().info_name
            fail(
                f"{command} {' '.join(exc.task_ids)}: not saved to {exc.path} ({exc.cause}); "
                "nothing was changed",
                status=1,
            )
        finally:
            owned.close()


def _own(options: Options) -> OwnedStore:
    """The directory's store, owned for one command (refused while a dispatcher owns it)."""
    return OwnedStore(options_store(options), options.zone(), convert=options.convert_timezone)
