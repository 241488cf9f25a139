"""``task-dispatcher run``: the dispatcher as a foreground service (its loop, the live table,
signals, the control socket and ``--listen``) until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from scheduler.cli_gateway import CONTROL_EXTRA_HINT
from scheduler.cli_local import running_factory
from scheduler.cli_parse import TOKEN_ENV_VAR, Options, dir_option
from scheduler.cli_render import console as make_console
from scheduler.cli_render import errors, fail, task_table
from scheduler.fleet.cli import FLEET_MAX_CONCURRENT_RUNS, broker_options, make_backend
from scheduler.listeners import WebhookListener
from scheduler.serve import TaskDispatcher
from tasks.errors import NotLeaderError
from tasks.shell import OUTPUT_LOGGER

__all__ = ["DEMO_TASKS", "run"]

logger = logging.getLogger("scheduler.cli")
"""The service's own lines keep the command line's logger name."""

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


@click.command()
@dir_option
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
@click.option(
    "--advertise-url",
    default=None,
    metavar="URL",
    help="With --store: the URL of this instance's control API (its --listen), which the "
    "others of the cluster name as the leader's while this one leads.",
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
    resend_after: float | None,
    listen: str | None,
    notify_url: tuple[str, ...],
    advertise_url: str | None,
) -> None:
    """Run the dispatcher in the foreground until SIGINT or SIGTERM.

    The control API is served on <dir>/control.sock (owner only), through which the other
    commands steer it, and with --listen on TCP. With --store (a PostgreSQL store shared by
    several instances) it leads the cluster, or waits as a standby while another leads and
    takes over when that one's lease runs out.
    """
    control = _control_available(listen)
    if control and listen is not None:
        from scheduler.control.server import check_listen

        with errors():
            check_listen(listen, options.token)
    with errors():  # webhooks for failed runs and pauses, checked before anything starts
        webhooks = [WebhookListener(url) for url in notify_url]
    console = make_console()
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
        logger.warning(
            "the control API is not installed, so other commands cannot steer this dispatcher "
            "while it runs: %s",
            CONTROL_EXTRA_HINT,
        )
    backend = make_backend(broker, start_timeout, lost_after, resend_after)
    if max_concurrent_runs is None:
        max_concurrent_runs = FLEET_MAX_CONCURRENT_RUNS if backend else 10
    # With workers, a --factory only checks tasks early; the workers create the managers.
    factory = running_factory(options) if backend is None or options.factory else None

    def make(store: Any = None) -> TaskDispatcher:
        # A backend serves one dispatcher: an instance that leads again gets a fresh one.
        run_backend = (
            make_backend(broker, start_timeout, lost_after, resend_after) if store else backend
        )
        dispatcher = TaskDispatcher(
            options.dir,
            task_manager_factory=factory,
            timezone=options.zone(),
            max_concurrent_runs=max_concurrent_runs,
            convert_timezone=options.convert_timezone,
            run_backend=run_backend,
            store=store,
        )
        dispatcher.lead_again = False  # standing by is this command's (its control API too)
        for webhook in webhooks:
            dispatcher.add_listener(webhook)
        return dispatcher

    serving: dict[str, Any] = {
        "grace": grace,
        "demo": demo,
        "live": live,
        "control": control,
        "listen": listen,
        "token": options.token,
    }
    if options.store:
        with errors():
            asyncio.run(
                _serve_cluster(options.store, advertise_url, make, console, serving, options)
            )
        return
    with errors():
        dispatcher = make()
    try:
        with errors():
            asyncio.run(_serve(dispatcher, console, **serving))
    finally:
        if not dispatcher.closed:
            dispatcher.close()


async def _serve_cluster(
    url: str,
    advertise_url: str | None,
    make: Callable[[Any], TaskDispatcher],
    console: Console,
    serving: dict[str, Any],
    options: Options,
) -> None:
    """Stand by until this instance takes the cluster's lease, lead until it loses it, and
    again, until SIGINT or SIGTERM. While standing by, the control API (when installed)
    answers health and sends every other request to the leader."""
    from scheduler.cli_store import open_store

    stop = _stop_on_signals()
    while not stop.is_set():
        store = open_store(url, advertise_url)
        standby = _Standby(store.where)
        server = await standby.serve(options, serving) if serving["control"] else None
        try:
            if not await _campaign(store, stop, standby):
                return
        finally:
            if server is not None:
                await server.close()
                standby.forget_token(options)
        dispatcher = make(store)
        try:
            lost = dispatcher.standing.stepped_down if dispatcher.standing else None
            await _serve(dispatcher, console, stop=stop, lost=lost, **serving)
        finally:
            if not dispatcher.closed:
                dispatcher.close(save=False)
            store.release()


class _Standby:
    """What this instance knows of its cluster while it stands by, and its control API."""

    def __init__(self, where: str) -> None:
        from scheduler.control.standby import StandbyView

        self.view = StandbyView(where)
        self.token: str | None = None

    def saw(self, exc: Exception) -> None:
        from scheduler.control.standby import StandbyView

        if isinstance(exc, NotLeaderError):
            self.view = StandbyView(
                self.view.where, exc.epoch, exc.leader_id, exc.leader_url, str(exc)
            )

    async def serve(self, options: Options, serving: dict[str, Any]) -> Any:
        from jobstores.durable import ensure_private_dir
        from scheduler.control.guard import issue_token
        from scheduler.control.server import ControlServer
        from scheduler.control.standby import create_standby_app
        from scheduler.dispatcher import CONTROL_SOCKET

        ensure_private_dir(options.dir)
        listen = serving["listen"]
        token = serving["token"]
        if listen is not None and token is None:
            token = self.token = issue_token(options.dir)
        app: Any = create_standby_app(lambda: self.view, token=token)
        # The leader's dashboard is served where its --listen is: so is a standby's, which
        # sends a browser to the leader's (or says it stands by, when none is known).
        dashboard = listen is not None and _dashboard_available()
        if dashboard:
            from scheduler.web.standby import standby_dashboard_app

            app = standby_dashboard_app(lambda: self.view, api=app, token=token)
        server = ControlServer(
            app,
            socket_path=options.dir / CONTROL_SOCKET,
            listen=listen,
            token=token,
            dashboard=dashboard,
        )
        await server.start()
        if dashboard and server.url is not None:
            logger.info("dashboard on %s/ (it sends a browser to the leader's)", server.url)
        return server

    def forget_token(self, options: Options) -> None:
        if self.token is not None:
            from scheduler.control.guard import remove_token

            remove_token(options.dir, self.token)
            self.token = None


async def _campaign(store: Any, stop: asyncio.Event, standby: _Standby) -> bool:
    """Try to take the lease every third of it until this instance leads (True) or is
    stopped (False); says once which instance it stands by for."""
    from jobstores.postgres import PostgresStoreError

    said = None
    while not stop.is_set():
        try:
            await asyncio.to_thread(store.acquire)
        except (NotLeaderError, PostgresStoreError) as exc:
            standby.saw(exc)
            if str(exc) != said:
                logger.info("standing by: %s", exc)
                said = str(exc)
        else:
            logger.info("leading %s at epoch %s", store.where, store.leadership.epoch)
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), store.leadership.lease / 3)
    return False


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


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
            fail(f"--listen needs the control API: {CONTROL_EXTRA_HINT}")
        return False
    return True


def _dashboard_available() -> bool:
    """Whether the web extra is installed; without it ``--listen`` serves the API alone."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        logger.warning(
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
    stop: asyncio.Event | None = None,
    lost: asyncio.Event | None = None,
) -> None:
    """Serve ``dispatcher`` until ``stop`` is set (by default: on SIGINT or SIGTERM), or until
    ``lost`` is (its cluster's lease was lost)."""
    if demo and not dispatcher.peek_tasks():
        await dispatcher.add_tasks({"sys_type": "local", **task} for task in DEMO_TASKS)
    if not dispatcher.peek_tasks():
        # Other commands steer a running dispatcher through its control socket; without the
        # control extra there is none, and they must wait for the directory to be free.
        when = "from another terminal while this runs" if control else "after stopping (Ctrl-C)"
        logger.warning(
            "no tasks in %s yet; add one %s: task-dispatcher --dir %s add --type shell "
            "--account me --interval 1m --kw command=date  (or try: run --demo)",
            dispatcher.state_file,
            when,
            dispatcher.directory,
        )
    stop = stop or _stop_on_signals()
    ended = asyncio.Event()
    watchers = [asyncio.create_task(_relay(event, ended)) for event in (stop, lost) if event]
    await dispatcher.start()
    try:
        if control:
            dashboard = listen is not None and _dashboard_available()
            server = await dispatcher.serve_control(
                socket=True, listen=listen, token=token, dashboard=dashboard
            )
            if dashboard and server.url is not None:
                logger.info("dashboard on %s/", server.url)
                if live:  # the log shows only problems above the live table
                    console.print(f"dashboard on {server.url}/")
            if server.url is not None and token is None:
                _announce_token(dispatcher, server.login_url)
        logger.info(
            "running %d task(s) from %s; Ctrl-C to stop",
            len(dispatcher.peek_tasks()),
            dispatcher.state_file,
        )
        if live:
            title = f"task-dispatcher: {dispatcher.state_file}"
            with Live(
                _live_table(dispatcher, title), console=console, refresh_per_second=2
            ) as screen:
                while not ended.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ended.wait(), 1)
                    screen.update(_live_table(dispatcher, title))
        else:
            await ended.wait()
    finally:
        for watcher in watchers:
            watcher.cancel()
        logger.info("stopping: letting runs finish (up to %gs)", grace)
        await dispatcher.stop(grace_period=grace)
        if lost is not None and lost.is_set():
            logger.info("stopped: another instance leads %s now", dispatcher.state_file)
        else:
            logger.info("stopped; state saved to %s", dispatcher.state_file)


async def _relay(event: asyncio.Event, to: asyncio.Event) -> None:
    await event.wait()
    to.set()


def _announce_token(dispatcher: TaskDispatcher, login_url: str | None) -> None:
    """Say where the token drawn for the TCP listener is, and print the login URL once.

    The URL goes to standard output only, never to the log: it carries the token.
    """
    from scheduler.control.guard import TOKEN_FILE

    where = dispatcher.directory / TOKEN_FILE
    logger.info(
        "TCP requests need the token in %s (Authorization: Bearer, or $%s for --url)",
        where,
        TOKEN_ENV_VAR,
    )
    if login_url is not None:
        click.echo(f"log in to the dashboard (this URL carries the token): {login_url}")


def _live_table(dispatcher: TaskDispatcher, title: str) -> Table:
    queued = frozenset(tid for ids in dispatcher.queued_runs().values() for tid in ids)
    return task_table(dispatcher.peek_tasks(), dispatcher.timezone, title=title, queued=queued)
