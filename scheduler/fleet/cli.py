"""The fleet's commands: ``task-dispatcher worker`` and the ``--broker`` options of ``run``.

Celery is imported only when a command needs it, so the CLI works without the celery extra.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from scheduler.cli_render import fail
from scheduler.fleet.wire import (
    ALLOW_NON_DURABLE_ENV_VAR,
    BROKER_ENV_VAR,
    FACTORY_ENV_VAR,
    check_broker_url,
    mask_url,
    queue_name,
)
from tasks.errors import BrokerNotDurableError

if TYPE_CHECKING:
    from scheduler.fleet.backend import CeleryRunBackend

__all__ = ["FLEET_MAX_CONCURRENT_RUNS", "broker_options", "make_backend", "worker"]

FLEET_MAX_CONCURRENT_RUNS = 100
"""``run --broker``'s default ``--max-concurrent-runs``: a run in flight on a fleet costs the
dispatcher a message, and a shallow pipeline leaves workers idle between runs."""

F = TypeVar("F", bound=Callable[..., Any])

_EXTRA_HINT = "the fleet needs the celery extra: pip install 'task-dispatcher[celery]'"


def broker_options(command: F) -> F:
    """``--broker``, ``--start-timeout``, ``--lost-after`` and ``--resend-after`` for the
    dispatcher's ``run``."""
    command = click.option(
        "--resend-after",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="With --broker: seconds before a run no worker has claimed, whose message left "
        "its queue (a broker that lost it), is sent again (default: --lost-after).",
    )(command)
    command = click.option(
        "--lost-after",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        help="With --broker: seconds without a worker's heartbeat before its run is lost.",
    )(command)
    command = click.option(
        "--start-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="With --broker: seconds a run may wait for a worker before it fails.",
    )(command)
    return click.option(
        "--broker",
        envvar=BROKER_ENV_VAR,
        default=None,
        help=f"Run tasks on workers through this Redis broker (default ${BROKER_ENV_VAR}).",
    )(command)


def make_backend(
    broker: str | None,
    start_timeout: float | None,
    lost_after: float,
    resend_after: float | None = None,
) -> CeleryRunBackend | None:
    """The run backend ``run``'s broker options ask for (None: run tasks locally)."""
    if not broker:
        return None
    try:
        from scheduler.fleet.backend import CeleryRunBackend
    except ImportError:
        fail(_EXTRA_HINT)
    try:
        return CeleryRunBackend(
            broker, start_timeout=start_timeout, lost_after=lost_after, resend_after=resend_after
        )
    except ValueError as exc:
        fail(f"--broker: {exc}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker",
    envvar=BROKER_ENV_VAR,
    required=True,
    help=f"The dispatcher's Redis broker URL (default ${BROKER_ENV_VAR}).",
)
@click.option(
    "--sys-type",
    "sys_types",
    multiple=True,
    required=True,
    help="Run tasks of this sys_type (queue td.sys.<S>); repeat for several.",
)
@click.option(
    "--factory",
    default=None,
    help="module:attr creating managers as factory(sys_type=..., **kwargs) "
    "(default: the registered task types, e.g. shell).",
)
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Parallel runs."
)
@click.option(
    "--hostname",
    default=None,
    help="This worker's name, unique in the fleet (default: worker-<pid>@<host name>).",
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "prefork"]),
    default="threads",
    show_default=True,
    help="Celery execution pool.",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Celery's log level.")
@click.option(
    "--visibility-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds before Redis redelivers an unacknowledged message (Celery's default: 1h).",
)
@click.option(
    "--allow-non-durable-broker",
    is_flag=True,
    envvar=ALLOW_NON_DURABLE_ENV_VAR,
    help="Start even if the broker's persistence cannot keep claims across a crash (or "
    "cannot be read): a broker crash may then execute runs twice.",
)
@click.pass_context
def worker(
    ctx: click.Context,
    broker: str,
    sys_types: tuple[str, ...],
    factory: str | None,
    concurrency: int,
    hostname: str | None,
    pool: str,
    loglevel: str,
    visibility_timeout: float | None,
    allow_non_durable_broker: bool,
) -> None:
    """Execute the runs of the given sys_types: a Celery worker on the dispatcher's broker."""
    try:
        check_broker_url(broker, "--broker")
        queues = [queue_name(sys_type) for sys_type in dict.fromkeys(sys_types)]
    except ValueError as exc:
        fail(str(exc))
    global_factory = getattr(ctx.obj, "factory", None)
    factory = factory or global_factory or os.environ.get(FACTORY_ENV_VAR) or None
    # The environment carries the settings into Celery's pool processes (and is what a plain
    # `celery -A scheduler.worker worker` reads).
    os.environ[BROKER_ENV_VAR] = broker
    if factory:
        os.environ[FACTORY_ENV_VAR] = factory
    else:
        os.environ.pop(FACTORY_ENV_VAR, None)
    if allow_non_durable_broker:
        os.environ[ALLOW_NON_DURABLE_ENV_VAR] = "1"
    else:
        os.environ.pop(ALLOW_NON_DURABLE_ENV_VAR, None)
    # As `celery -A` does: a factory module beside the current directory is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        import redis

        from scheduler.fleet.worker import app, check_durability, load_factory
    except ImportError:
        fail(_EXTRA_HINT)
    try:
        load_factory(factory)  # fail now, not at the first run
    except ValueError as exc:
        fail(f"--{exc}")
    try:
        check_durability(redis.Redis.from_url(broker, socket_connect_timeout=5))
    except BrokerNotDurableError as exc:
        fail(f"--broker {mask_url(broker)}: {exc}")
    except redis.RedisError:
        pass  # unreachable for now: the worker checks once it connects
    app.conf.broker_url = broker
    if visibility_timeout is not None:
        options = dict(app.conf.broker_transport_options or {})
        options["visibility_timeout"] = visibility_timeout
        # Look for overdue messages often enough for a short timeout to take effect.
        options["unacked_restore_interval"] = max(1, min(10, int(visibility_timeout / 2)))
        options["unacked_restore_throttle"] = 1
        app.conf.broker_transport_options = options
    # Unique by default, as Celery's own default is: two workers of one name would share
    # their registration and their names in run records.
    name = hostname or f"worker-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--hostname",
        name if "@" in name else f"celery@{name}",
        "--loglevel",
        loglevel,
        # Mingle only syncs revoked ids between workers at start-up; claims do that job here.
        "--without-mingle",
    ]
    app.worker_main(argv)
