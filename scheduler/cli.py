"""``task-dispatcher``: see and steer a dispatcher directory from the shell.

Every command goes through the library's public API. When a dispatcher runs on the directory
(its ``control.sock`` answers), or ``--url`` names a remote one, commands go through its control
API and see live state. Otherwise modifying commands open a :class:`TaskDispatcher` (and so take
the directory's lock) and read-only ones read the state file without owning it. Either way a
command prints the same lines and exits with the same status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import re
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import click
import orjson
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from jobstores.format import CorruptFileError
from jobstores.loading import describe_validation_error
from jobstores.snapshot import StateSnapshot, read_snapshot, validate_state_file
from scheduler.cli_fleet import FLEET_MAX_CONCURRENT_RUNS, broker_options, make_backend, worker
from scheduler.dispatcher import CONTROL_SOCKET, DIR_ENV_VAR, TaskDispatcher, default_directory
from scheduler.errors import (
    ControlError,
    DispatcherError,
    HistoryUnavailableError,
    NewerFormatError,
    SaveFailedError,
    UnknownTaskTypeError,
)
from scheduler.history import HISTORY_FILENAME, MAX_QUERY_LIMIT, RunEntry, read_runs
from scheduler.listeners import WebhookListener
from scheduler.triggers import RunPreview, TaskTrigger, may_start, preview_runs
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.model import RESERVED_KWARGS, TaskRecord, TaskStatus, parse_end_time
from tasks.policy import jitter_bounds
from tasks.registry import default_registry
from tasks.shell import OUTPUT_LOGGER
from tasks.zones import resolve_timezone

if TYPE_CHECKING:
    from scheduler.control.client import ControlClient

__all__ = ["main", "parse_hours", "parse_interval", "parse_since"]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

URL_ENV_VAR = "TASK_DISPATCHER_URL"
"""Environment variable naming a remote dispatcher's control API (``http://host:port``)."""
TOKEN_ENV_VAR = "TASK_DISPATCHER_TOKEN"
"""Environment variable holding the control API's token (server and client side)."""
CONTROL_EXTRA_HINT = "pip install 'task-dispatcher[control]'"
LIST_PAGE = 5_000
"""Tasks per request when ``list`` reads a running dispatcher's listing."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A number starts only where no digit or '.' precedes, and is read possessively: a long run
# of digits without a unit is scanned once, not again from each of its digits.
_INTERVAL = re.compile(r"(?<![\d.])(\d++(?:\.\d++)?+)([smhd])")


def parse_interval(text: str) -> float:
    """``3600``, ``90s``, ``30m``, ``1h``, ``1d`` or combinations such as ``1h30m``, in seconds."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _INTERVAL.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise click.BadParameter(f"{text!r} is not an interval such as 3600, 90s, 30m, 1h or 1d")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def parse_hours(text: str) -> tuple[int, int]:
    """``8-22`` (or the wrap-around ``22-6``) as a window pair."""
    match = re.fullmatch(r"\s*(\d{1,2})\s*-\s*(\d{1,2})\s*", text)
    if not match:
        raise click.BadParameter(f"{text!r} is not an hour window such as 8-22 or 22-6")
    return int(match[1]), int(match[2])


def _parse_until(text: str) -> date | datetime:
    try:
        return parse_end_time(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--until") from None


def _parse_kw(pairs: tuple[str, ...], *, as_json: bool = False) -> dict[str, Any]:
    """``key=value`` pairs: the value is a string (``--kw``) or parsed JSON (``--kw-json``)."""
    hint = "--kw-json" if as_json else "--kw"
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint=hint)
        if not as_json:
            values[key] = raw
            continue
        try:
            values[key] = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise click.BadParameter(
                f"{key}: {raw!r} is not JSON ({exc})", param_hint=hint
            ) from None
    return values


_POLICY_HELP = (
    "Run policy field=value (jitter, retries, retry_delay, retry_backoff, retry_max_delay, "
    "run_timeout: seconds or counts; pause_after_failures); repeatable."
)

_OPTION_FOR = {
    "sys_type": "--sys-type",
    "task_type": "--type",
    "account_id": "--account",
    "account_name": "--account-name",
    "interval": "--interval",
    "valid_time_range": "--hours",
    "valid_time_rage": "--hours",
    "task_end_time": "--until",
    "task_id": "--id",
}


def _check_keywords(keywords: dict[str, Any], source: str) -> None:
    """Task keywords must not name what an option or the dispatcher sets."""
    for key in keywords:
        if key in _OPTION_FOR:
            raise click.BadParameter(
                f"{key!r} is set with {_OPTION_FOR[key]}, not as a task keyword", param_hint=source
            )
        if key in RESERVED_KWARGS:
            raise click.BadParameter(
                f"{key!r} is a task record field the dispatcher keeps, not a task keyword",
                param_hint=source,
            )


# ---------------------------------------------------------------------- shared options


@dataclass
class Options:
    """What the global options chose."""

    directory: Path | None = None
    factory: str | None = None
    timezone: str | None = None
    convert_timezone: bool = False
    url: str | None = None
    token: str | None = None

    @property
    def dir(self) -> Path:
        return self.directory or default_directory()

    def zone(self) -> tzinfo | None:
        return resolve_timezone(self.timezone) if self.timezone else None


def _fail(message: str, status: int = 2) -> NoReturn:
    click.echo(f"task-dispatcher: error: {message}", err=True)
    sys.exit(status)


class _OneLineUsageError(click.UsageError):
    """A usage error shown as the other errors are: one line on stderr (exit status 2)."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"task-dispatcher: error: {self.format_message()}{hint}", err=True)


class _Commands(click.Group):
    """The command group; turns click's usage errors into one-line errors."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise _OneLineUsageError(exc.format_message(), exc.ctx) from exc


def _import_factory(spec: str) -> TaskManagerFactory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        _fail(f"--factory {spec!r}: expected module:attr, e.g. myapp.tasks:TaskManager")
    try:
        module = importlib.import_module(module_name)
        factory = functools.reduce(getattr, attr.split("."), module)
    except (ImportError, AttributeError) as exc:
        _fail(f"--factory {spec!r}: {exc}")
    if not callable(factory):
        _fail(f"--factory {spec!r} is not callable")
    result: TaskManagerFactory = factory
    return result


class _Inert:
    """Stands in for a task manager in commands that never run anything."""

    def run(self) -> None:  # pragma: no cover - never called
        raise RuntimeError("inert task manager")


def _running_factory(options: Options) -> TaskManagerFactory:
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


def _dir_option(command: F) -> F:
    """Accept --dir/--factory/--timezone after the command name as well."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            setattr(ctx.ensure_object(Options), param.name or "", value)
        return value

    for name, help_text in (
        ("--token", f"The control API's token (prefer ${TOKEN_ENV_VAR})."),
        ("--url", "A remote dispatcher's control API, http://host:port."),
        ("--timezone", "IANA zone of the hour windows (default: the file's, else local)."),
        ("--factory", "module:attr of the host's TaskManager class or factory."),
    ):
        command = click.option(
            name, default=None, expose_value=False, callback=remember, help=help_text
        )(command)
    command = click.option(
        "--convert-timezone",
        is_flag=True,
        default=None,
        expose_value=False,
        callback=remember,
        help="Read the hour windows in --timezone from now on, though the file records another.",
    )(command)
    return click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        expose_value=False,
        callback=remember,
        help="Dispatcher directory (overrides the global --dir).",
    )(command)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Bad input and unknown ids: one line on stderr, exit status 2, nothing changed."""
    try:
        yield
    except SaveFailedError:
        raise  # reported by _dispatcher, once it gave up the directory
    except ValidationError as exc:
        # An answer of a shape this command does not know (another version's server): one
        # line naming the field, not pydantic's report.
        field, message = describe_validation_error(exc)
        _fail(f"unexpected data: {field}: {message}")
    except (DispatcherError, ValueError, TypeError) as exc:
        _fail(str(exc))


class _ReportedHere(logging.Filter):
    """Drops the log line of a failed save: the command reports it itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "unsaved_task_ids")


@contextlib.contextmanager
def _library_warnings() -> Iterator[None]:
    """Show the library's warnings (a file set aside, a task not restored) as lines of ours."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("task-dispatcher: %(levelname)s: %(message)s"))
    handler.addFilter(_ReportedHere())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


@contextlib.contextmanager
def _dispatcher(
    options: Options, factory: TaskManagerFactory | None = None
) -> Iterator[TaskDispatcher]:
    with _errors(), _library_warnings():
        dispatcher = TaskDispatcher(
            options.dir,
            task_manager_factory=factory or _editing_factory(options),
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
            _fail(
                f"{command} {' '.join(exc.task_ids)}: not saved to {exc.path} ({exc.cause}); "
                "nothing was changed",
                status=1,
            )
        finally:
            dispatcher.close()


def _snapshot(options: Options) -> StateSnapshot:
    with _errors():
        try:
            return read_snapshot(options.dir, options.zone(), convert=options.convert_timezone)
        except (CorruptFileError, NewerFormatError) as exc:
            _fail(str(exc))


def _remote(options: Options) -> ControlClient | None:
    """A client of the dispatcher to go through: ``--url``'s, else the one serving the
    directory's socket; None when no dispatcher answers (commands then use the file)."""
    if options.url is None and not (options.dir / CONTROL_SOCKET).exists():
        return None  # the common case costs no import
    try:
        from scheduler.control.client import ControlClient
    except ImportError:
        if options.url is not None:
            _fail(f"--url needs the control extra: {CONTROL_EXTRA_HINT}")
        return None
    if options.url is not None:
        return ControlClient(url=options.url, token=options.token)
    return ControlClient.probe(options.dir / CONTROL_SOCKET)


def _remote_zone(options: Options, client: ControlClient) -> tzinfo:
    return options.zone() or client.zone()


def _change(
    options: Options,
    local: Callable[[TaskDispatcher], R],
    remote: Callable[[ControlClient], R],
    factory: TaskManagerFactory | None = None,
    *,
    creates: bool = False,
) -> tuple[R, tzinfo]:
    """Apply a change through the running dispatcher if there is one, else on the file;
    the result and the zone to show times in. Only a change that ``creates`` a task may
    start a new store."""
    client = _remote(options)
    if client is not None:
        with client, _errors():
            return remote(client), _remote_zone(options, client)
    if not creates and not options.dir.is_dir():
        # A mistyped --dir must not leave a new, empty store behind.
        _fail(f"no dispatcher directory {str(options.dir)!r}")
    with _dispatcher(options, factory) as dispatcher, _errors():
        return local(dispatcher), dispatcher.timezone


# ---------------------------------------------------------------------- output
# One formatter per command, fed alike from the file and from the control API.


def _when(value: datetime | None, zone: tzinfo) -> str:
    return "-" if value is None else value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def _interval(seconds: float) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400:g}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds // 60:g}m"
    return f"{seconds:g}s"


_STATUS_STYLE = {
    TaskStatus.PENDING: "cyan",
    TaskStatus.RUNNING: "bold green",
    TaskStatus.PAUSED: "yellow",
    TaskStatus.COMPLETED: "dim",
    TaskStatus.ERROR: "bold red",
}


def _overdue(record: TaskRecord, zone: tzinfo, now: datetime) -> str | None:
    """What happens to a next run already past (the store stopped, or its loop is stuck);
    a jittered run whose drawn start is still ahead waits for it, and says when."""
    planned = record.next_execution_time
    if planned is None or planned >= now:
        return None
    start = record.start_time
    if start is not None and start > now:
        return f"jittered: starts {_when(start, zone)}"
    trigger = TaskTrigger.for_record(record, zone)
    if may_start(now, record.valid_time_range, trigger.end, zone):
        return "overdue: runs as soon as the dispatcher runs"
    later = trigger.get_next_fire_time(planned, now)
    if later is None:
        return "overdue: past its end, completed when the dispatcher runs"
    return f"overdue: outside its hours now, next run {_when(later, zone)}"


def _table(
    records: list[TaskRecord],
    zone: tzinfo,
    *,
    title: str | None = None,
    queued: frozenset[str] = frozenset(),
) -> Table:
    table = Table(title=title, expand=False)
    for column in (
        "task",
        "account",
        "type",
        "status",
        "every",
        "hours",
        "last run",
        "next run",
        "runs",
        "failures",
        "last error",
    ):
        table.add_column(column, overflow="fold", no_wrap=column in ("status", "every", "runs"))
    now = datetime.now(zone)
    for record in records:
        start, end = record.valid_time_range
        overdue = _overdue(record, zone, now)
        status = f"[{_STATUS_STYLE[record.status]}]{record.status.value}[/]"
        table.add_row(
            record.task_id,
            record.account_id,
            record.task_type,
            (status + " (queued)" if record.task_id in queued else status) + _queued(record),
            _interval(record.interval),
            f"{start}-{end}",
            _when(record.last_execution_time, zone),
            _when(record.next_execution_time, zone) + (f" ({overdue})" if overdue else ""),
            str(record.run_count),
            str(record.failure_count),
            (record.last_error or "")[:80],
        )
    return table


def _queued(record: TaskRecord) -> str:
    """`` (queued)`` for a run sent to the workers and not started yet."""
    run = record.active_run
    return " (queued)" if run is not None and run.queued else ""


def _console() -> Console:
    console = Console(highlight=False)
    # Piped output is read by people and scripts alike: don't fold it into 80 columns.
    return console if console.is_terminal else Console(highlight=False, width=220)


@dataclass
class _Listing:
    """What ``list`` shows, from either source."""

    records: list[TaskRecord]
    """The chosen tasks, by account then priority."""
    store_empty: bool
    zone: tzinfo
    state_file: str
    queued: frozenset[str] = frozenset()
    unreadable: int = 0


def _print_listing(listing: _Listing, options: Options, as_json: bool, show_secrets: bool) -> None:
    if as_json:
        click.echo(
            orjson.dumps(
                [r.to_json_dict(masked=not show_secrets) for r in listing.records],
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return
    if listing.store_empty:
        click.echo(
            f"No tasks in {listing.state_file}. Add one with: task-dispatcher --dir "
            f"{options.dir} add --type shell --account me --interval 1h --kw command=date"
        )
        return
    _console().print(_table(listing.records, listing.zone, queued=listing.queued))
    if listing.unreadable:
        click.echo(
            f"{listing.unreadable} unreadable task record(s) kept in the file; "
            "run 'task-dispatcher validate' for details",
            err=True,
        )


def _print_task(
    record: TaskRecord,
    position: int,
    preview: RunPreview,
    zone: tzinfo,
    show_secrets: bool,
    waiting: Mapping[str, Any] | None = None,
) -> None:
    """``waiting``: the fleet's runs not taken yet by sys_type, with the workers registered
    (from a running dispatcher's health), to say why a queued run waits."""
    for key, value in record.to_json_dict(masked=not show_secrets).items():
        if key == "kwargs":
            value = orjson.dumps(value).decode()
        click.echo(f"{key:>22}: {'-' if value is None else value}")
    click.echo(f"{'position':>22}: {position}")
    overdue = _overdue(record, zone, datetime.now(zone))
    if overdue:
        click.echo(f"{'':>22}  {overdue}")
    if record.active_run is not None:
        run = record.active_run
        state = (
            f"queued since {_when(run.submitted_at, zone)}, waiting for a {record.sys_type} worker"
            + _workers_note(record.sys_type, waiting)
            if run.queued
            else f"executing since {_when(run.started_at, zone)}"
        )
        click.echo(f"{'run out':>22}: {run.run_id} {state}")
    if preview.status == TaskStatus.COMPLETED:
        click.echo("             next runs: none (completed)")
        return
    label = "if resumed now" if preview.if_resumed else "next runs"
    trigger = TaskTrigger.for_record(record, zone)
    runs = [_jittered_when(record, trigger, t, zone) for t in preview.runs]
    if runs and record.next_start_time is not None and not preview.if_resumed:
        runs[0] = f"{_when(record.start_time, zone)} (jittered from {_when(preview.runs[0], zone)})"
    click.echo(f"{label:>22}: {runs[0] if runs else 'none before the end time'}")
    for line in runs[1:]:
        click.echo(f"{'':>22}  {line}")


# ---------------------------------------------------------------------- commands


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=DIR_ENV_VAR,
    default=None,
    help=f"Directory of dispatch_config.json [env {DIR_ENV_VAR}; default ./dispatcher].",
)
@click.option(
    "--factory", default=None, help="module:attr of the host's TaskManager class or factory."
)
@click.option(
    "--timezone",
    default=None,
    help="IANA zone of the hour windows (default: the one the file records, else local).",
)
@click.option(
    "--convert-timezone",
    is_flag=True,
    help="Read the hour windows in --timezone from now on, though the file records another.",
)
@click.option(
    "--url",
    envvar=URL_ENV_VAR,
    default=None,
    help=f"A remote dispatcher's control API, http://host:port [env {URL_ENV_VAR}].",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV_VAR,
    default=None,
    help=f"The control API's token: sent with --url, required by run --listen off loopback "
    f"[env {TOKEN_ENV_VAR}, preferred: arguments are visible to other users].",
)
@click.version_option(package_name="task-dispatcher")
@click.pass_context
def main(
    ctx: click.Context,
    directory: Path | None,
    factory: str | None,
    timezone: str | None,
    convert_timezone: bool,
    url: str | None,
    token: str | None,
) -> None:
    """Run recurring per-account tasks with hour windows, end dates and a durable state file."""
    options = ctx.ensure_object(Options)
    options.directory = options.directory or directory
    options.factory = options.factory or factory
    options.timezone = options.timezone or timezone
    options.url = options.url or url
    options.token = options.token or token or None
    options.convert_timezone = options.convert_timezone or convert_timezone


main.add_command(worker)


@main.command()
@_dir_option
@click.option(
    "--sys-type", default="local", show_default=True, help="Machine type the task runs on."
)
@click.option("--type", "task_type", required=True, help="Task type (e.g. shell).")
@click.option("--account", "account_id", required=True, help="Account id.")
@click.option("--account-name", default=None, help="Account display name.")
@click.option("--interval", required=True, help="3600, 90s, 30m, 1h, 1d.")
@click.option("--hours", default="0-24", show_default=True, help="Hour window, e.g. 8-22 or 22-6.")
@click.option(
    "--until", default=None, help="Last day (YYYY-MM-DD) or exact cut-off (ISO datetime)."
)
@click.option("--id", "task_id", default=None, help="Task id (default: generated).")
@click.option("--kw", multiple=True, help="Task keyword key=value, a string; repeatable.")
@click.option(
    "--kw-json", multiple=True, help="Task keyword key=JSON (5, true, [1, 2], ...); repeatable."
)
@click.option("--kwargs-json", default=None, help="Task keywords as a JSON object.")
@click.option("--policy", multiple=True, help=_POLICY_HELP)
@click.pass_obj
def add(
    options: Options,
    sys_type: str,
    task_type: str,
    account_id: str,
    account_name: str | None,
    interval: str,
    hours: str,
    until: str | None,
    task_id: str | None,
    kw: tuple[str, ...],
    kw_json: tuple[str, ...],
    kwargs_json: str | None,
    policy: tuple[str, ...],
) -> None:
    """Add a task and print its id."""
    keywords: dict[str, Any] = {}
    if kwargs_json:
        try:
            loaded = orjson.loads(kwargs_json)
        except orjson.JSONDecodeError as exc:
            _fail(f"--kwargs-json: {exc}")
        if not isinstance(loaded, dict):
            _fail("--kwargs-json: must be a JSON object")
        _check_keywords(loaded, "--kwargs-json")
        keywords.update(loaded)
    for source, given in (("--kw", _parse_kw(kw)), ("--kw-json", _parse_kw(kw_json, as_json=True))):
        _check_keywords(given, source)
        keywords.update(given)
    with _errors():
        keywords.update(
            interval=parse_interval(interval),
            valid_time_range=parse_hours(hours),
            task_end_time=_parse_until(until) if until else None,
        )
    if account_name is not None:
        keywords["account_name"] = account_name
    keywords.update(sys_type=sys_type, task_type=task_type, account_id=account_id, task_id=task_id)
    run_policy = _parse_policy(policy)
    if run_policy is not None:
        keywords["run_policy"] = run_policy
    new_id, _ = _change(
        options,
        lambda d: asyncio.run(d.add_task(**keywords)),
        lambda client: client.add_task(keywords),
        _running_factory(options),
        creates=True,
    )
    click.echo(new_id)


@main.command(name="list")
@_dir_option
@click.option("--account", default=None, help="Only this account's tasks.")
@click.option("--status", type=click.Choice([s.value for s in TaskStatus]), default=None)
@click.option("--json", "as_json", is_flag=True, help="A JSON array of task records.")
@click.option("--show-secrets", is_flag=True, help="Do not mask secret-looking kwargs.")
@click.pass_obj
def list_(
    options: Options, account: str | None, status: str | None, as_json: bool, show_secrets: bool
) -> None:
    """List tasks: live from a running dispatcher, else from the file (works while the
    directory is in use)."""
    client = _remote(options)
    if client is not None:
        with client, _errors():
            live = client.list_tasks(
                account=account, status=status, show_secrets=show_secrets, limit=LIST_PAGE
            )
            while live.get("next"):  # the rest, a page at a time (None from an older server)
                more = client.list_tasks(
                    account=account,
                    status=status,
                    show_secrets=show_secrets,
                    limit=LIST_PAGE,
                    after=live["next"],
                )
                live["tasks"] += more["tasks"]
                live["next"] = more["next"]
            listing = _Listing(
                records=live["tasks"],
                store_empty=live["total"] == 0,
                zone=options.zone() or ZoneInfo(live["timezone"]),
                state_file=live["state_file"],
                queued=frozenset(tid for ids in live["queued"].values() for tid in ids),
            )
    else:
        snapshot = _snapshot(options)
        order = {tid: i for ids in snapshot.account_tasks.values() for i, tid in enumerate(ids)}
        records = [
            r
            for r in snapshot.records
            if (account is None or r.account_id == account)
            and (status is None or r.status == status)
        ]
        records.sort(key=lambda r: (r.account_id, order.get(r.task_id, 0)))
        listing = _Listing(
            records=records,
            store_empty=not snapshot.records,
            zone=snapshot.timezone,
            state_file=str(snapshot.path),
            unreadable=len(snapshot.unreadable),
        )
    _print_listing(listing, options, as_json, show_secrets)


@main.command()
@_dir_option
@click.argument("task_id")
@click.option(
    "--runs", "count", default=5, show_default=True, help="How many upcoming runs to show."
)
@click.option("--show-secrets", is_flag=True, help="Do not mask secret-looking kwargs.")
@click.pass_obj
def show(options: Options, task_id: str, count: int, show_secrets: bool) -> None:
    """Show every field of a task and its next runs (read-only)."""
    client = _remote(options)
    if client is not None:
        with client, _errors():
            try:
                record = client.get_task(task_id, show_secrets=show_secrets)
            except ControlError as exc:
                if exc.status == 404:
                    _fail(f"{exc} in {client.state_file()}")
                raise
            preview = client.next_runs(task_id, count)
            position = client.account_tasks(record.account_id).index(task_id)
            zone = _remote_zone(options, client)
            backend = (client.health().get("backend") or {}).get("health") or {}
            waiting = backend.get("waiting_for_workers")
    else:
        snapshot = _snapshot(options)
        found = snapshot.get(task_id)
        if found is None:
            _fail(f"no task with id {task_id!r} in {snapshot.path}")
        record, zone = found, snapshot.timezone
        position = snapshot.account_tasks[record.account_id].index(task_id)
        preview = preview_runs(record, zone, datetime.now(zone), count)
        waiting = None
    _print_task(record, position, preview, zone, show_secrets, waiting)


def _workers_note(sys_type: str, waiting: Mapping[str, Any] | None) -> str:
    """Why a queued run waits, when a running dispatcher told which workers there are."""
    if waiting is None:
        return ""
    workers = (waiting.get(sys_type) or {}).get("workers") or []
    if not workers:
        return f": none is registered (start one: task-dispatcher worker --sys-type {sys_type})"
    return f": registered {', '.join(workers)} (busy, or its message waits its turn)"


def _jittered_when(
    record: TaskRecord, trigger: TaskTrigger, planned: datetime, zone: tzinfo
) -> str:
    """A planned run as shown: with jitter, the span its start is drawn from."""
    jitter = record.policy.jitter
    if not jitter:
        return _when(planned, zone)
    _, latest = jitter_bounds(planned, jitter, trigger.schedule)
    return f"between {_when(planned, zone)} and {_when(latest.replace(microsecond=0), zone)}"


def parse_since(text: str, zone: tzinfo, now: datetime) -> datetime:
    """An age before ``now`` (``90m``, ``2h``, ``7d``), a date or an ISO datetime.

    Dates and datetimes without an offset are read in ``zone``.
    """
    try:
        return now - timedelta(seconds=parse_interval(text))
    except click.BadParameter:
        pass
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not an age (90m, 2h, 7d), a date or an ISO datetime",
            param_hint="--since",
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=zone)


def _history(options: Options, **filters: Any) -> list[RunEntry]:
    """The runs matching ``filters``, read from the directory's history file."""
    if not (options.dir / HISTORY_FILENAME).exists():
        return []
    try:
        return read_runs(options.dir, options.zone() or resolve_timezone(None), **filters)
    except (HistoryUnavailableError, ValueError) as exc:
        _fail(str(exc))


def _runs_table(entries: list[RunEntry], zone: tzinfo) -> Table:
    table = Table(expand=False)
    for column in (
        "run",
        "task",
        "account",
        "type",
        "trigger",
        "planned",
        "started",
        "took",
        "outcome",
    ):
        table.add_column(column, no_wrap=column in ("run", "planned", "started", "outcome"))
    table.add_column("error", overflow="fold")
    styles = {"succeeded": "green", "running": "bold cyan"}
    for entry in entries:
        table.add_row(
            entry.run_id,
            entry.task_id,
            entry.account_id,
            entry.task_type,
            entry.trigger,
            _when(entry.scheduled_at, zone),
            _when(entry.started_at, zone),
            "-" if entry.duration is None else f"{entry.duration:.1f}s",
            f"[{styles.get(entry.outcome, 'bold red')}]{entry.outcome}[/]",
            (entry.error or "")[:80],
        )
    return table


@main.command()
@_dir_option
@click.argument("task_id", required=False)
@click.option("--account", default=None, help="Only this account's runs.")
@click.option("--failed", is_flag=True, help="Only failed, lost and expired runs.")
@click.option("--since", default=None, help="An age (90m, 2h, 7d), a date or an ISO datetime.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, MAX_QUERY_LIMIT))
@click.option("--json", "as_json", is_flag=True, help="A JSON array of runs.")
@click.pass_obj
def runs(
    options: Options,
    task_id: str | None,
    account: str | None,
    failed: bool,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show the run history, newest first (read-only; works while the directory is in use)."""
    zone = options.zone() or resolve_timezone(None)
    filters: dict[str, Any] = {
        "failed": True if failed else None,
        "since": None if since is None else parse_since(since, zone, datetime.now(zone)),
        "limit": limit,
    }
    client = _remote(options)
    if client is not None:
        with client, _errors():
            found = client.runs(task_id, account=account, **filters)
            entries = [RunEntry.model_validate(data) for data in found]
    else:
        entries = _history(options, task_id=task_id, account_id=account, **filters)
    if as_json:
        click.echo(
            orjson.dumps([e.to_json() for e in entries], option=orjson.OPT_INDENT_2).decode()
        )
    elif not entries:
        click.echo("No runs recorded.")
    else:
        _console().print(_runs_table(entries, zone))


# ---------------------------------------------------------------------- run policies, update


def _parse_policy(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``--policy field=value`` pairs (values as JSON: 300, 2.5, null)."""
    return _parse_kw(pairs, as_json=True) if pairs else None


@main.command()
@_dir_option
@click.argument("task_id")
@click.option("--interval", default=None, help="3600, 90s, 30m, 1h, 1d.")
@click.option("--hours", default=None, help="Hour window, e.g. 8-22 or 22-6.")
@click.option("--until", default=None, help="Last day (YYYY-MM-DD) or exact cut-off.")
@click.option("--no-end", is_flag=True, help="Remove the end date.")
@click.option("--kw", multiple=True, help="Set a task keyword key=value (a string); repeatable.")
@click.option("--kw-json", multiple=True, help="Set a task keyword key=JSON; repeatable.")
@click.option("--policy", multiple=True, help=_POLICY_HELP)
@click.pass_obj
def update(
    options: Options,
    task_id: str,
    interval: str | None,
    hours: str | None,
    until: str | None,
    no_end: bool,
    kw: tuple[str, ...],
    kw_json: tuple[str, ...],
    policy: tuple[str, ...],
) -> None:
    """Change a task in place (id, counters and history kept); its next run is planned again."""
    if until and no_end:
        _fail("give --until or --no-end, not both")
    changes: dict[str, Any] = {}
    with _errors():
        if interval is not None:
            changes["interval"] = parse_interval(interval)
        if hours is not None:
            changes["valid_time_range"] = parse_hours(hours)
        if until is not None:
            changes["task_end_time"] = _parse_until(until)
    if no_end:
        changes["task_end_time"] = None
    given: dict[str, Any] = {}
    for source, values in (
        ("--kw", _parse_kw(kw)),
        ("--kw-json", _parse_kw(kw_json, as_json=True)),
    ):
        _check_keywords(values, source)
        given.update(values)
    if policy:
        changes["run_policy"] = _parse_policy(policy)
    if not changes and not given:
        _fail("nothing to change: give --interval, --hours, --until, --no-end, --kw or --policy")

    def local(d: TaskDispatcher) -> TaskRecord:
        if given:
            current = d.get_task(task_id).kwargs
            kept = {k: v for k, v in current.items() if k not in ("task_id", "task_type")}
            changes["kwargs"] = {**kept, **given}
        return d.update_task(task_id, **changes)

    def remote(client: ControlClient) -> TaskRecord:
        if given:
            current = client.get_task(task_id, show_secrets=True).kwargs
            kept = {k: v for k, v in current.items() if k not in ("task_id", "task_type")}
            changes["kwargs"] = {**kept, **given}
        return client.update_task(task_id, changes)

    record, zone = _change(options, local, remote)
    click.echo(f"{task_id}: {record.status}, next run {_when(record.start_time, zone)}")


def _task_or_account(task_id: str | None, account: str | None) -> None:
    if (task_id is None) == (account is None):
        _fail("give a TASK_ID or --account ACCOUNT_ID (not both)")


def _account_change(options: Options, account: str, verb: str) -> None:
    """Pause or resume every task of ``account`` in one commit; print each task's status."""

    def local(d: TaskDispatcher) -> list[tuple[str, str, bool]]:
        change = d.pause_account if verb == "pause" else d.resume_account
        return [(c.task_id, c.status.value, c.changed) for c in change(account)]

    def remote(client: ControlClient) -> list[tuple[str, str, bool]]:
        change = client.pause_account if verb == "pause" else client.resume_account
        return [(t["task_id"], t["status"], t["changed"]) for t in change(account)]

    report, _ = _change(options, local, remote)
    changed = sum(item[2] for item in report)
    past = "paused" if verb == "pause" else "resumed"
    click.echo(f"{account}: {changed} of {len(report)} task(s) {past}")
    for task_id, status, was_changed in report:
        click.echo(f"  {task_id}: {status}{'' if was_changed else ' (unchanged)'}")


@main.command()
@_dir_option
@click.argument("task_id", required=False)
@click.option("--account", default=None, help="Pause every task of this account (one commit).")
@click.pass_obj
def pause(options: Options, task_id: str | None, account: str | None) -> None:
    """Pause a task, or every task of an account (saved before the command returns)."""
    _task_or_account(task_id, account)
    if account is not None:
        _account_change(options, account, "pause")
        return
    assert task_id is not None

    def local(d: TaskDispatcher) -> TaskRecord:
        d.pause_task(task_id)
        return d.get_task(task_id)

    record, _ = _change(options, local, lambda client: client.pause_task(task_id))
    click.echo(f"{task_id}: {record.status}")


@main.command()
@_dir_option
@click.argument("task_id", required=False)
@click.option("--account", default=None, help="Resume every paused task of this account.")
@click.pass_obj
def resume(options: Options, task_id: str | None, account: str | None) -> None:
    """Resume a paused task, or every paused task of an account."""
    _task_or_account(task_id, account)
    if account is not None:
        _account_change(options, account, "resume")
        return
    assert task_id is not None

    def local(d: TaskDispatcher) -> TaskRecord:
        d.resume_task(task_id)
        return d.get_task(task_id)

    record, zone = _change(options, local, lambda client: client.resume_task(task_id))
    click.echo(f"{task_id}: {record.status}, next run {_when(record.next_execution_time, zone)}")


@main.command("run-now")
@_dir_option
@click.argument("task_id")
@click.pass_obj
def run_now(options: Options, task_id: str) -> None:
    """Run a task once, as soon as its account is free, whatever its hours or status.

    Goes through the running dispatcher (its socket, or --url); the request is saved before
    the command returns. Its planned runs stay as they are.
    """
    client = _remote(options)
    if client is None:
        _fail(
            f"no dispatcher is running on {str(options.dir)!r} (nothing answers on its "
            f"{CONTROL_SOCKET}): run-now needs one (start it with 'task-dispatcher run', "
            "or give --url)",
            status=1,
        )
    with client, _errors():
        record = client.run_now(task_id)
        zone = _remote_zone(options, client)
    click.echo(
        f"{task_id}: run asked for at {_when(record.run_requested, zone)}; it starts as soon "
        f"as account {record.account_id} is free (next planned run "
        f"{_when(record.next_execution_time, zone)}, unchanged)"
    )


@main.command()
@_dir_option
@click.argument("task_id")
@click.pass_obj
def remove(options: Options, task_id: str) -> None:
    """Delete a task for good."""
    _change(options, lambda d: d.remove_task(task_id), lambda client: client.remove_task(task_id))
    click.echo(f"{task_id}: removed")


@main.command(context_settings={"ignore_unknown_options": True})  # "-1" is a position
@_dir_option
@click.argument("task_id")
@click.argument("position", type=int)
@click.pass_obj
def reorder(options: Options, task_id: str, position: int) -> None:
    """Move a task to POSITION (0-based) in its account's priority order."""

    def local(d: TaskDispatcher) -> tuple[str, list[str]]:
        d.reorder_task(task_id, position)
        account = d.get_task(task_id).account_id
        return account, d.account_tasks[account]

    (account, ids), _ = _change(
        options, local, lambda client: client.reorder_task(task_id, position)
    )
    click.echo(f"{account}: {' '.join(ids)}")


@main.command()
@_dir_option
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def validate(options: Options, path: Path | None) -> None:
    """Check a state file; list every problem; exit 1 if there is any. Never modifies it."""
    if options.url is not None and path is None and options.directory is None:
        # The file is on the dispatcher's machine; checking ./dispatcher here instead would
        # report on some other store.
        raise click.UsageError(
            "validate checks a state file on this machine, not the dispatcher at --url: "
            "run it where the dispatcher runs, or name the file (validate PATH) or the "
            "directory (--dir DIR)"
        )
    target = path or options.dir / "dispatch_config.json"
    with _errors():
        problems = validate_state_file(target, options.zone())
    for problem in problems:
        click.echo(str(problem))
    if problems:
        click.echo(f"{target}: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"{target}: ok")


DEMO_TASKS: list[dict[str, Any]] = [
    {
        "task_id": "demo-clock",
        "account_id": "demo-a",
        "account_name": "Demo A",
        "task_type": "shell",
        "interval": 2,
        "command": "date",
    },
    {
        "task_id": "demo-second",
        "account_id": "demo-a",
        "account_name": "Demo A",
        "task_type": "shell",
        "interval": 5,
        "command": "echo second task of demo-a",
    },
    {
        "task_id": "demo-flaky",
        "account_id": "demo-b",
        "account_name": "Demo B",
        "task_type": "shell",
        "interval": 3,
        "shell": True,
        "command": "echo working; test $(( $(date +%s) % 2 )) -eq 0",
    },
]


@main.command()
@_dir_option
@click.option(
    "--grace", default=30.0, show_default=True, help="Seconds runs get to finish on stop."
)
@click.option(
    "--max-concurrent-runs",
    type=click.IntRange(min=1),
    default=None,
    help="Runs in flight at once (default: 10 here, 100 with --broker, where the workers' "
    "--concurrency bounds execution).",
)
@click.option(
    "--demo", is_flag=True, help="Add a few short-interval shell tasks if the store is empty."
)
@click.option("--live/--no-live", default=None, help="Live table (default: on a terminal).")
@broker_options
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Also serve the control API (and the dashboard) on TCP, with a token: --token, "
    f"${TOKEN_ENV_VAR}, or one drawn and stored in <dir>/control.token (loopback only).",
)
@click.option(
    "--notify-url",
    multiple=True,
    help="POST failed runs and pauses as JSON to this URL; repeatable.",
)
@click.pass_obj
def run(
    options: Options,
    grace: float,
    max_concurrent_runs: int | None,
    demo: bool,
    live: bool | None,
    broker: str | None,
    start_timeout: float | None,
    lost_after: float,
    listen: str | None,
    notify_url: tuple[str, ...],
) -> None:
    """Run the dispatcher in the foreground until SIGINT or SIGTERM.

    The control API is served on <dir>/control.sock (owner only), through which the other
    commands steer it, and with --listen on TCP.
    """
    control = _control_available(listen)
    if control and listen is not None:
        from scheduler.control.server import check_listen

        with _errors():
            check_listen(listen, options.token)
    with _errors():  # webhooks for failed runs and pauses, checked before anything starts
        webhooks = [WebhookListener(url) for url in notify_url]
    console = _console()
    live = console.is_terminal if live is None else live
    handler: logging.Handler = (
        RichHandler(console=console, show_path=False) if live else logging.StreamHandler()
    )
    handler.setFormatter(
        logging.Formatter("%(message)s" if live else "%(asctime)s %(levelname)s %(message)s")
    )
    # On a terminal the table shows progress; only problems are logged above it.
    level = logging.WARNING if live else logging.INFO
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    if demo:  # watching the demo is watching what its shell tasks print
        logging.getLogger(OUTPUT_LOGGER).setLevel(logging.DEBUG)
    if not control:
        logging.getLogger(__name__).warning(
            "the control API is not installed, so other commands cannot steer this dispatcher "
            "while it runs: %s",
            CONTROL_EXTRA_HINT,
        )
    backend = make_backend(broker, start_timeout, lost_after)
    if max_concurrent_runs is None:
        max_concurrent_runs = FLEET_MAX_CONCURRENT_RUNS if backend else 10
    # With workers, a --factory only checks tasks early; the workers create the managers.
    factory = _running_factory(options) if backend is None or options.factory else None
    with _errors():
        dispatcher = TaskDispatcher(
            options.dir,
            task_manager_factory=factory,
            timezone=options.zone(),
            max_concurrent_runs=max_concurrent_runs,
            convert_timezone=options.convert_timezone,
            run_backend=backend,
        )
    for webhook in webhooks:
        dispatcher.add_listener(webhook)
    try:
        with _errors():
            asyncio.run(
                _serve(
                    dispatcher,
                    console,
                    grace=grace,
                    demo=demo,
                    live=live,
                    control=control,
                    listen=listen,
                    token=options.token,
                )
            )
    finally:
        if not dispatcher.closed:
            dispatcher.close()


def _control_available(listen: str | None) -> bool:
    """Whether the control extra is installed; ``--listen`` without it is an error.

    Without it ``run`` still runs the tasks (an optional extra must not stop a service from
    starting) and says what it cannot do; asking for TCP explicitly fails instead.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        if listen is not None:
            _fail(f"--listen needs the control API: {CONTROL_EXTRA_HINT}")
        return False
    return True


def _dashboard_available() -> bool:
    """Whether the web extra is installed; without it ``--listen`` serves the API alone."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        logging.getLogger(__name__).warning(
            "the web dashboard is not installed, so --listen serves the JSON API only: "
            "pip install 'task-dispatcher[web]'"
        )
        return False
    return True


async def _serve(
    dispatcher: TaskDispatcher,
    console: Console,
    *,
    grace: float,
    demo: bool,
    live: bool,
    control: bool = False,
    listen: str | None = None,
    token: str | None = None,
) -> None:
    if demo and not dispatcher.peek_tasks():
        await dispatcher.add_tasks({"sys_type": "local", **task} for task in DEMO_TASKS)
    if not dispatcher.peek_tasks():
        # Other commands steer a running dispatcher through its control socket; without the
        # control extra there is none, and they must wait for the directory to be free.
        when = "from another terminal while this runs" if control else "after stopping (Ctrl-C)"
        logging.getLogger(__name__).warning(
            "no tasks in %s yet; add one %s: task-dispatcher --dir %s add --type shell "
            "--account me --interval 1m --kw command=date  (or try: run --demo)",
            dispatcher.state_file,
            when,
            dispatcher.directory,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await dispatcher.start()
    try:
        if control:
            dashboard = listen is not None and _dashboard_available()
            server = await dispatcher.serve_control(
                socket=True, listen=listen, token=token, dashboard=dashboard
            )
            if dashboard and server.url is not None:
                logging.getLogger(__name__).info("dashboard on %s/", server.url)
                if live:  # the log shows only problems above the live table
                    console.print(f"dashboard on {server.url}/")
            if server.url is not None and token is None:
                _announce_token(dispatcher, server.login_url)
        logging.getLogger(__name__).info(
            "running %d task(s) from %s; Ctrl-C to stop",
            len(dispatcher.peek_tasks()),
            dispatcher.state_file,
        )
        if live:
            title = f"task-dispatcher: {dispatcher.state_file}"
            with Live(
                _live_table(dispatcher, title), console=console, refresh_per_second=2
            ) as screen:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1)
                    screen.update(_live_table(dispatcher, title))
        else:
            await stop.wait()
    finally:
        logging.getLogger(__name__).info("stopping: letting runs finish (up to %gs)", grace)
        await dispatcher.stop(grace_period=grace)
        logging.getLogger(__name__).info("stopped; state saved to %s", dispatcher.state_file)


def _announce_token(dispatcher: TaskDispatcher, login_url: str | None) -> None:
    """Say where the token drawn for the TCP listener is, and print the login URL once.

    The URL goes to standard output only, never to the log: it carries the token.
    """
    from scheduler.control.guard import TOKEN_FILE

    where = dispatcher.directory / TOKEN_FILE
    logging.getLogger(__name__).info(
        "TCP requests need the token in %s (Authorization: Bearer, or $%s for --url)",
        where,
        TOKEN_ENV_VAR,
    )
    if login_url is not None:
        click.echo(f"log in to the dashboard (this URL carries the token): {login_url}")


def _live_table(dispatcher: TaskDispatcher, title: str) -> Table:
    queued = frozenset(tid for ids in dispatcher.queued_runs().values() for tid in ids)
    return _table(dispatcher.peek_tasks(), dispatcher.timezone, title=title, queued=queued)
