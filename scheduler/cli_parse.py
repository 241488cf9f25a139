"""The command line's input side: the global options, the options every command also takes,
the one-line usage errors, and the parsers of intervals, hour windows, end times, ages and
``key=value`` keywords."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from scheduler.cli_render import fail
from scheduler.dispatcher import default_directory
from tasks.model import RESERVED_KWARGS, parse_end_time
from tasks.zones import resolve_timezone

__all__ = [
    "POLICY_HELP",
    "STORE_ENV_VAR",
    "TOKEN_ENV_VAR",
    "URL_ENV_VAR",
    "Commands",
    "Options",
    "check_keywords",
    "dir_option",
    "parse_hours",
    "parse_interval",
    "parse_kw",
    "parse_policy",
    "parse_since",
    "parse_until",
    "task_keywords",
]

F = TypeVar("F", bound=Callable[..., Any])

URL_ENV_VAR = "TASK_DISPATCHER_URL"
"""Environment variable naming a remote dispatcher's control API (``http://host:port``)."""
STORE_ENV_VAR = "TASK_DISPATCHER_STORE"
"""Environment variable naming a PostgreSQL store (``postgresql://user@host/db``)."""
TOKEN_ENV_VAR = "TASK_DISPATCHER_TOKEN"
"""Environment variable holding the control API's token (server and client side)."""

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


def parse_until(text: str) -> date | datetime:
    """``--until``: a last day (``YYYY-MM-DD``) or an exact cut-off (ISO datetime)."""
    try:
        return parse_end_time(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--until") from None


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


def parse_kw(pairs: tuple[str, ...], *, as_json: bool = False) -> dict[str, Any]:
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


def parse_policy(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``--policy field=value`` pairs (values as JSON: 300, 2.5, null)."""
    return parse_kw(pairs, as_json=True) if pairs else None


POLICY_HELP = (
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


def check_keywords(keywords: dict[str, Any], source: str) -> None:
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


def task_keywords(
    kw: tuple[str, ...], kw_json: tuple[str, ...], kwargs_json: str | None = None
) -> dict[str, Any]:
    """The task keywords of ``--kwargs-json`` (a JSON object), then ``--kw`` (strings), then
    ``--kw-json`` (JSON values), a later one replacing an earlier; each source checked by
    :func:`check_keywords`."""
    keywords: dict[str, Any] = {}
    if kwargs_json:
        try:
            loaded = orjson.loads(kwargs_json)
        except orjson.JSONDecodeError as exc:
            fail(f"--kwargs-json: {exc}")
        if not isinstance(loaded, dict):
            fail("--kwargs-json: must be a JSON object")
        check_keywords(loaded, "--kwargs-json")
        keywords.update(loaded)
    for source, given in (("--kw", parse_kw(kw)), ("--kw-json", parse_kw(kw_json, as_json=True))):
        check_keywords(given, source)
        keywords.update(given)
    return keywords


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
    store: str | None = None

    @property
    def dir(self) -> Path:
        """The dispatcher directory: ``--dir``, else the environment's, else ./dispatcher."""
        return self.directory or default_directory()

    def zone(self) -> tzinfo | None:
        """``--timezone`` resolved, or None when not given."""
        return resolve_timezone(self.timezone) if self.timezone else None


class OneLineUsageError(click.UsageError):
    """A usage error shown as the other errors are: one line on stderr (exit status 2)."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"task-dispatcher: error: {self.format_message()}{hint}", err=True)


class Commands(click.Group):
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
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise OneLineUsageError(exc.format_message(), exc.ctx) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:
            raise OneLineUsageError(exc.format_message(), exc.ctx) from exc


def dir_option(command: F) -> F:
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
