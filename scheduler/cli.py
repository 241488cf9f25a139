"""``task-dispatcher``: see and steer a dispatcher directory from the shell.

Every command goes through one :class:`~scheduler.cli_gateway.Gateway`. When a dispatcher runs
on the directory (its ``control.sock`` answers), or ``--url`` names a remote one, that is its
control API and commands see live state. Otherwise it is the stopped store
(:mod:`scheduler.cli_local`): modifying commands own it for the command (its lock, the core's
commands, a durable commit: no dispatcher, no task manager) and read-only ones read the state
file without owning it. Either way a command prints the same
lines and exits with the same status. Parsing lives in :mod:`scheduler.cli_parse`, output in
:mod:`scheduler.cli_render`, the ``run`` service in :mod:`scheduler.cli_run`.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from jobstores.snapshot import validate_state_file
from scheduler.cli_gateway import open_gateway
from scheduler.cli_parse import (
    POLICY_HELP,
    STORE_ENV_VAR,
    TOKEN_ENV_VAR,
    URL_ENV_VAR,
    Commands,
    Options,
    dir_option,
    parse_hours,
    parse_interval,
    parse_policy,
    parse_since,
    parse_until,
    task_keywords,
)
from scheduler.cli_render import errors, fail, print_listing, print_runs, print_task
from scheduler.cli_run import run
from scheduler.cli_store import export, import_
from scheduler.dispatcher import DIR_ENV_VAR
from scheduler.errors import TaskNotFoundError
from scheduler.fleet.cli import worker
from scheduler.history import MAX_QUERY_LIMIT
from tasks.display import format_time
from tasks.model import TaskStatus
from tasks.zones import resolve_timezone

__all__ = ["main", "parse_hours", "parse_interval", "parse_since"]

LIST_PAGE = 5_000
"""Tasks per request when ``list`` reads a running dispatcher's listing."""


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--store",
    envvar=STORE_ENV_VAR,
    default=None,
    help=f"A PostgreSQL store, postgresql://user@host/db, for run (a cluster of dispatchers: "
    f"one leads, the others stand by), import, export, and the commands that read or change "
    f"a store no dispatcher serves [env {STORE_ENV_VAR}].",
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
    store: str | None,
) -> None:
    """Run recurring per-account tasks with hour windows, end dates and a durable state file."""
    options = ctx.ensure_object(Options)
    options.directory = options.directory or directory
    options.factory = options.factory or factory
    options.timezone = options.timezone or timezone
    options.url = options.url or url
    options.token = options.token or token or None
    options.convert_timezone = options.convert_timezone or convert_timezone
    options.store = store


main.add_command(worker)
main.add_command(run)
main.add_command(import_)
main.add_command(export)


@main.command()
@dir_option
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
@click.option("--policy", multiple=True, help=POLICY_HELP)
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
    keywords = task_keywords(kw, kw_json, kwargs_json)
    with errors():
        keywords.update(
            interval=parse_interval(interval),
            valid_time_range=parse_hours(hours),
            task_end_time=parse_until(until) if until else None,
        )
    if account_name is not None:
        keywords["account_name"] = account_name
    keywords.update(sys_type=sys_type, task_type=task_type, account_id=account_id, task_id=task_id)
    run_policy = parse_policy(policy)
    if run_policy is not None:
        keywords["run_policy"] = run_policy
    with open_gateway(options, change=True, creates=True, runs_tasks=True) as gateway:
        new_id = gateway.add_task(keywords)
    click.echo(new_id)


@main.command(name="list")
@dir_option
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
    with open_gateway(options) as gateway:
        listing = gateway.list_tasks(
            account=account, status=status, show_secrets=show_secrets, page=LIST_PAGE
        )
    print_listing(listing, str(options.dir), as_json, show_secrets)


@main.command()
@dir_option
@click.argument("task_id")
@click.option(
    "--runs", "count", default=5, show_default=True, help="How many upcoming runs to show."
)
@click.option("--show-secrets", is_flag=True, help="Do not mask secret-looking kwargs.")
@click.pass_obj
def show(options: Options, task_id: str, count: int, show_secrets: bool) -> None:
    """Show every field of a task and its next runs (read-only)."""
    with open_gateway(options) as gateway:
        try:
            record, waiting = gateway.get_task_view(task_id, show_secrets=show_secrets)
        except TaskNotFoundError as exc:
            fail(f"{exc} in {gateway.state_file()}")
        preview = gateway.next_runs(task_id, count)
        position = gateway.account_tasks(record.account_id).index(task_id)
        zone = gateway.zone()
    print_task(record, position, preview, zone, show_secrets, waiting)


@main.command()
@dir_option
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
    start = None if since is None else parse_since(since, zone, datetime.now(zone))
    with open_gateway(options) as gateway:
        entries = gateway.runs(
            task_id, account=account, failed=True if failed else None, since=start, limit=limit
        )
    print_runs(entries, zone, as_json)


@main.command()
@dir_option
@click.argument("task_id")
@click.option("--interval", default=None, help="3600, 90s, 30m, 1h, 1d.")
@click.option("--hours", default=None, help="Hour window, e.g. 8-22 or 22-6.")
@click.option("--until", default=None, help="Last day (YYYY-MM-DD) or exact cut-off.")
@click.option("--no-end", is_flag=True, help="Remove the end date.")
@click.option("--kw", multiple=True, help="Set a task keyword key=value (a string); repeatable.")
@click.option("--kw-json", multiple=True, help="Set a task keyword key=JSON; repeatable.")
@click.option("--policy", multiple=True, help=POLICY_HELP)
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
        fail("give --until or --no-end, not both")
    changes: dict[str, Any] = {}
    with errors():
        if interval is not None:
            changes["interval"] = parse_interval(interval)
        if hours is not None:
            changes["valid_time_range"] = parse_hours(hours)
        if until is not None:
            changes["task_end_time"] = parse_until(until)
    if no_end:
        changes["task_end_time"] = None
    given = task_keywords(kw, kw_json)
    if policy:
        changes["run_policy"] = parse_policy(policy)
    if not changes and not given:
        fail("nothing to change: give --interval, --hours, --until, --no-end, --kw or --policy")
    with open_gateway(options, change=True) as gateway:
        if given:  # the keywords given replace those named, the others are kept
            current = gateway.get_task(task_id, show_secrets=True).kwargs
            kept = {k: v for k, v in current.items() if k not in ("task_id", "task_type")}
            changes["kwargs"] = {**kept, **given}
        record = gateway.update_task(task_id, changes)
        zone = gateway.zone()
    click.echo(f"{task_id}: {record.status}, next run {format_time(record.start_time, zone)}")


def _task_or_account(task_id: str | None, account: str | None) -> None:
    if (task_id is None) == (account is None):
        fail("give a TASK_ID or --account ACCOUNT_ID (not both)")


def _account_change(options: Options, account: str, verb: str) -> None:
    """Pause or resume every task of ``account`` in one commit; print each task's status."""
    with open_gateway(options, change=True) as gateway:
        change = gateway.pause_account if verb == "pause" else gateway.resume_account
        report = change(account)
    changed = sum(item[2] for item in report)
    past = "paused" if verb == "pause" else "resumed"
    click.echo(f"{account}: {changed} of {len(report)} task(s) {past}")
    for task_id, status, was_changed in report:
        click.echo(f"  {task_id}: {status}{'' if was_changed else ' (unchanged)'}")


@main.command()
@dir_option
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
    with open_gateway(options, change=True) as gateway:
        record = gateway.pause_task(task_id)
    click.echo(f"{task_id}: {record.status}")


@main.command()
@dir_option
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
    with open_gateway(options, change=True) as gateway:
        record = gateway.resume_task(task_id)
        zone = gateway.zone()
    click.echo(
        f"{task_id}: {record.status}, next run {format_time(record.next_execution_time, zone)}"
    )


@main.command("run-now")
@dir_option
@click.argument("task_id")
@click.pass_obj
def run_now(options: Options, task_id: str) -> None:
    """Run a task once, as soon as its account is free, whatever its hours or status.

    Goes through the running dispatcher (its socket, or --url); the request is saved before
    the command returns. Its planned runs stay as they are.
    """
    # Not a change of a stopped store: without a running dispatcher the gateway refuses.
    with open_gateway(options) as gateway:
        record = gateway.run_now(task_id)
        zone = gateway.zone()
    click.echo(
        f"{task_id}: run asked for at {format_time(record.run_requested, zone)}; it starts as "
        f"soon as account {record.account_id} is free (next planned run "
        f"{format_time(record.next_execution_time, zone)}, unchanged)"
    )


@main.command()
@dir_option
@click.argument("task_id")
@click.pass_obj
def remove(options: Options, task_id: str) -> None:
    """Delete a task for good."""
    with open_gateway(options, change=True) as gateway:
        gateway.remove_task(task_id)
    click.echo(f"{task_id}: removed")


@main.command(context_settings={"ignore_unknown_options": True})  # "-1" is a position
@dir_option
@click.argument("task_id")
@click.argument("position", type=int)
@click.pass_obj
def reorder(options: Options, task_id: str, position: int) -> None:
    """Move a task to POSITION (0-based) in its account's priority order."""
    with open_gateway(options, change=True) as gateway:
        account, ids = gateway.reorder_task(task_id, position)
    click.echo(f"{account}: {' '.join(ids)}")


@main.command()
@dir_option
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
    with errors():
        problems = validate_state_file(target, options.zone())
    for problem in problems:
        click.echo(str(problem))
    if problems:
        click.echo(f"{target}: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"{target}: ok")
