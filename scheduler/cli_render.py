"""The command line's output side: one-line errors, the task and run tables, ``show``'s field
list and JSON output. Every formatter is fed alike by either gateway (the stopped store or a
running dispatcher), so a command prints the same lines whichever answered."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, NoReturn

import click
import orjson
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from jobstores.loading import describe_validation_error
from scheduler.control import NOT_SAVED
from scheduler.errors import ControlError, DispatcherError, SaveFailedError
from scheduler.history import RunEntry
from scheduler.triggers import RunPreview, TaskTrigger
from tasks.display import format_interval, format_time, preview_label
from tasks.model import TaskRecord, TaskStatus
from tasks.policy import jitter_bounds
from tasks.waiting import Waiting, why_waiting

__all__ = [
    "Listing",
    "console",
    "errors",
    "fail",
    "library_warnings",
    "print_json",
    "print_listing",
    "print_runs",
    "print_task",
    "task_table",
]


def fail(message: str, status: int = 2) -> NoReturn:
    """Say what went wrong in one line on stderr and exit with ``status``."""
    click.echo(f"task-dispatcher: error: {message}", err=True)
    sys.exit(status)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Bad input and unknown ids: one line on stderr, exit status 2, nothing changed."""
    try:
        yield
    except SaveFailedError:
        raise  # reported by the local gateway, once it gave up the directory
    except ValidationError as exc:
        # An answer of a shape this command does not know (another version's server): one
        # line naming the field, not pydantic's report.
        field, message = describe_validation_error(exc)
        fail(f"unexpected data: {field}: {message}")
    except ControlError as exc:
        if exc.status == NOT_SAVED:
            # A running dispatcher applied the change but could not save it: it stays in
            # effect there and is retried, as a failed save in the library is (exit 1).
            fail(f"{click.get_current_context().info_name}: {exc}", status=1)
        fail(str(exc))
    except (DispatcherError, ValueError, TypeError) as exc:
        fail(str(exc))


class _ReportedHere(logging.Filter):
    """Drops the log line of a failed save: the command reports it itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "unsaved_task_ids")


@contextlib.contextmanager
def library_warnings() -> Iterator[None]:
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


def console() -> Console:
    """A console for tables; piped output is not folded into 80 columns."""
    screen = Console(highlight=False)
    # Piped output is read by people and scripts alike: don't fold it into 80 columns.
    return screen if screen.is_terminal else Console(highlight=False, width=220)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout."""
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


# ---------------------------------------------------------------------- tasks

_STATUS_STYLE = {
    TaskStatus.PENDING: "cyan",
    TaskStatus.RUNNING: "bold green",
    TaskStatus.PAUSED: "yellow",
    TaskStatus.COMPLETED: "dim",
    TaskStatus.ERROR: "bold red",
}


_LATE = frozenset({"jitter", "due", "past_end", "outside_hours"})
"""The kinds of :class:`Waiting` ``list`` adds to a next run already past."""


def _overdue(record: TaskRecord, zone: tzinfo, now: datetime) -> str | None:
    """What happens to a next run already past (the store stopped, or its loop is stuck);
    a jittered run whose drawn start is still ahead waits for it, and says when (the words
    of :func:`~tasks.waiting.why_waiting` on a stopped store)."""
    waiting = why_waiting(record, now, zone)
    if waiting is None or waiting.kind not in _LATE or waiting.since is None:
        return None
    return waiting.message


def _queued(record: TaskRecord) -> str:
    """`` (queued)`` for a run sent to the workers and not started yet."""
    run = record.active_run
    return " (queued)" if run is not None and run.queued else ""


def task_table(
    records: Sequence[TaskRecord],
    zone: tzinfo,
    *,
    title: str | None = None,
    queued: frozenset[str] = frozenset(),
) -> Table:
    """The task table of ``list`` and of ``run``'s live screen; ``queued``: tasks whose run
    waits for its account's lane."""
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
            format_interval(record.interval),
            f"{start}-{end}",
            format_time(record.last_execution_time, zone),
            format_time(record.next_execution_time, zone) + (f" ({overdue})" if overdue else ""),
            str(record.run_count),
            str(record.failure_count),
            (record.last_error or "")[:80],
        )
    return table


@dataclass
class Listing:
    """What ``list`` shows, from either gateway."""

    records: list[TaskRecord]
    """The chosen tasks, by account then priority."""
    store_empty: bool
    zone: tzinfo
    state_file: str
    queued: frozenset[str] = frozenset()
    unreadable: int = 0


def print_listing(listing: Listing, directory: str, as_json: bool, show_secrets: bool) -> None:
    """``list``'s output: JSON records, a hint on an empty store, or the table."""
    if as_json:
        print_json([r.to_json_dict(masked=not show_secrets) for r in listing.records])
        return
    if listing.store_empty:
        click.echo(
            f"No tasks in {listing.state_file}. Add one with: task-dispatcher --dir "
            f"{directory} add --type shell --account me --interval 1h --kw command=date"
        )
        return
    console().print(task_table(listing.records, listing.zone, queued=listing.queued))
    if listing.unreadable:
        click.echo(
            f"{listing.unreadable} unreadable task record(s) kept in the file; "
            "run 'task-dispatcher validate' for details",
            err=True,
        )


def _jittered_when(
    record: TaskRecord, trigger: TaskTrigger, planned: datetime, zone: tzinfo
) -> str:
    """A planned run as shown: with jitter, the span its start is drawn from."""
    jitter = record.policy.jitter
    if not jitter:
        return format_time(planned, zone)
    _, latest = jitter_bounds(planned, jitter, trigger.schedule)
    return (
        f"between {format_time(planned, zone)} and "
        f"{format_time(latest.replace(microsecond=0), zone)}"
    )


def print_task(
    record: TaskRecord,
    position: int,
    preview: RunPreview,
    zone: tzinfo,
    show_secrets: bool,
    waiting: Waiting | None = None,
) -> None:
    """``show``'s field list; ``waiting``: why the task waits (the gateway's
    :func:`~tasks.waiting.why_waiting`, a running dispatcher's when one runs)."""
    for key, value in record.to_json_dict(masked=not show_secrets).items():
        if key == "kwargs":
            value = orjson.dumps(value).decode()
        click.echo(f"{key:>22}: {'-' if value is None else value}")
    click.echo(f"{'position':>22}: {position}")
    if waiting is not None:
        click.echo(f"{'waiting':>22}: {waiting.message} [{waiting.kind}]")
    label = preview_label(preview)
    if preview.status == TaskStatus.COMPLETED:
        click.echo(f"{'next runs':>22}: {label}")
        return
    trigger = TaskTrigger.for_record(record, zone)
    runs = [_jittered_when(record, trigger, t, zone) for t in preview.runs]
    if runs and record.next_start_time is not None and not preview.if_resumed:
        runs[0] = (
            f"{format_time(record.start_time, zone)} "
            f"(jittered from {format_time(preview.runs[0], zone)})"
        )
    click.echo(f"{label:>22}: {runs[0] if runs else 'none before the end time'}")
    for line in runs[1:]:
        click.echo(f"{'':>22}  {line}")


# ---------------------------------------------------------------------- runs


def _runs_table(entries: Sequence[RunEntry], zone: tzinfo) -> Table:
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
            format_time(entry.scheduled_at, zone),
            format_time(entry.started_at, zone),
            "-" if entry.duration is None else f"{entry.duration:.1f}s",
            f"[{styles.get(entry.outcome, 'bold red')}]{entry.outcome}[/]",
            (entry.error or "")[:80],
        )
    return table


def print_runs(entries: Sequence[RunEntry], zone: tzinfo, as_json: bool) -> None:
    """``runs``' output: JSON entries, a line when there are none, or the table."""
    if as_json:
        print_json([e.to_json() for e in entries])
    elif not entries:
        click.echo("No runs recorded.")
    else:
        console().print(_runs_table(entries, zone))
