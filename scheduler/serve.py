"""``TaskDispatcher``: the host application's handle on its recurring per-account tasks.

It is :class:`~scheduler.dispatcher.Dispatcher` (the facade that wires the tasks, their runs
and their observers) with the control plane that serves it: the control API, the dashboard,
their listeners and their token. Serving sits above the dispatcher and above ``control/``
and ``web/``, which work through the dispatcher's public methods; so nothing below imports
them, and a host without the ``control`` or ``web`` extra imports none of their libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from scheduler.dispatcher import CONTROL_SOCKET, Dispatcher
from tasks.errors import DispatcherNotRunningError

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI
    from starlette.types import ASGIApp

    from scheduler.control.server import ControlServer

__all__ = ["TaskDispatcher"]


class TaskDispatcher(Dispatcher):
    """Runs recurring per-account tasks on APScheduler and persists all of their state.

    State lives in ``<dispatcher_dir>/dispatch_config.json`` and is loaded here: tasks carry
    on after a restart or a crash. The dispatcher owns its directory (an OS-level lock) until
    :meth:`stop` or :meth:`close`.

    ``timezone`` is the zone of the hour windows and end dates. None takes the zone the file
    records, else the local one. A zone other than the recorded one raises
    :class:`TimezoneMismatchError` unless ``convert_timezone=True``: then the windows are
    read in the new zone from now on (and the file records it from the next save).

    Every run is recorded in ``<dispatcher_dir>/history.sqlite3`` (see :meth:`runs`), or on
    a PostgreSQL store in its cluster's ``td_runs``, shared by its instances;
    ``history=False`` turns that off, a :class:`RunHistory` passed instead (its retention
    configured) is used and closed with the dispatcher.

    ``snapshot_below`` (2,000 by default): below this many tasks the state file itself holds
    every change when the call making it returns (``json.load`` it at any time); from that
    many on, changes go to a journal beside it at a cost that does not grow with the number
    of tasks, and the file follows within 10 minutes (see :class:`JsonJobStore`).

    ``store`` chooses where the state is kept (see :func:`jobstores.stores.resolve_store`):
    None (the default) is the journal on ``dispatcher_dir`` described above; a
    :class:`~jobstores.state.StateStore` object is used as it is (``JournalStorage(dir)`` or
    ``SnapshotStorage(dir)`` from :mod:`jobstores`, which writes the whole file at every
    save); a string is a URL naming a store by its scheme, and an unknown scheme raises
    :class:`ValueError` naming ``store``: ``postgresql://user@host/db`` is the PostgreSQL store
    (the ``postgres`` extra). The dispatcher acquires the store (one owner at a time) and
    releases it when it closes; ``dispatcher_dir`` still holds the control socket (and the run
    history, but for PostgreSQL's).

    Failover: a store shared by several dispatchers (PostgreSQL) is owned through a lease, and
    creating a dispatcher while another leads raises :class:`NotLeaderError` naming it (the
    ``run`` command waits as a standby instead). :attr:`role` is ``"leader"``; once the lease
    is lost (taken over, or not renewed in time) it is ``"standby"`` at once: no run starts or
    is sent, planning stops, and changes raise :class:`NotLeaderError`. A started dispatcher
    then tries to take the lease again every third of it, and once it has it (a new epoch)
    loads the state afresh and leads again, as ``run`` does (not on a fleet's run backend,
    which serves one leader; ``lead_again = False`` turns it off).

    ``clock`` is what the dispatcher reads for every decision by the time and every instant it
    stamps: what is due, the hour windows and end dates, retries, the times on records, run
    events and saves, and the run history's retention. Any object with a ``now()`` method
    returning an aware datetime (:class:`tasks.clock.Clock`); None (the default) is the
    system's clock, read at each call, which time-travel tools such as freezegun move. A host
    or test that advances its own clock drives passes with :meth:`run_pending`. Elapsed times
    (timeouts, leases, the journal's age) keep the system's monotonic clock and log lines its
    wall clock; a fleet backend and its workers check run deadlines and stamp runs by the
    system's clock (so a clock far from it suits the local backend). Anything else raises
    :class:`TypeError` naming ``clock``.

    Thread safety: every synchronous method may be called from any thread. The coroutines
    (:meth:`add_task`, :meth:`start`, :meth:`run_pending`, :meth:`stop`) belong to the event
    loop the dispatcher was started on.

    Serving: :meth:`serve_control` serves the control API (and with ``dashboard=True`` the
    web dashboard) on the directory's socket and on TCP, :meth:`control_app` gives the API as
    an app to mount in the host's own; both stop with the dispatcher.
    """

    # Set when serving starts and when the token is drawn (the dispatcher's own constructor
    # does the rest, so its parameters are declared once).
    _control: ControlServer | None = None
    _control_token: str | None = None

    @property
    def control_token(self) -> str:
        """The token a TCP listener or an embedded control app of this dispatcher requires
        when the host gives none of its own.

        Drawn on first use (``secrets.token_urlsafe``), once per dispatcher, and written
        owner-only to ``<directory>/control.token`` so the owner's scripts can read it; the
        file goes when the dispatcher stops. Needs the ``control`` extra.
        """
        if self._control_token is None:
            from scheduler.control.guard import issue_token

            self._changes.check_open()
            self._control_token = issue_token(self.directory)
        return self._control_token

    def control_app(
        self, *, token: str | None = None, extra_routers: Sequence[APIRouter] = ()
    ) -> FastAPI:
        """The control API as an ASGI (FastAPI) app a host can mount in its own app.

        Every request needs ``Authorization: Bearer <token>``; without ``token`` that is
        :attr:`control_token`. Needs the ``control`` extra
        (``pip install 'task-dispatcher[control]'``).
        """
        from scheduler.control.app import create_app

        return create_app(self, token=token or self.control_token, extra_routers=extra_routers)

    async def serve_control(
        self,
        socket: bool = True,
        listen: str | None = None,
        token: str | None = None,
        *,
        extra_routers: Sequence[APIRouter] = (),
        dashboard: bool = False,
    ) -> ControlServer:
        """Serve the control API on ``<directory>/control.sock`` and, with ``listen``
        (``HOST:PORT``), on TCP; return once listening. The listeners stop with :meth:`stop`.

        Every TCP request needs ``token``; without one a loopback ``listen`` uses
        :attr:`control_token` (the returned server's ``token``, and its ``login_url`` for a
        browser), and a non-loopback one raises :class:`ListenError`. With ``dashboard`` the
        web dashboard is served at ``/`` of the same listeners (needs the ``web`` extra).
        """
        from scheduler.control.app import create_app
        from scheduler.control.server import ControlServer, check_listen

        self._changes.check_open()
        if self._control is not None:
            raise RuntimeError(f"the control API of {str(self.directory)!r} is already served")
        if self._control_token is None:
            # A token file here was left by a dispatcher that died (this one owns the
            # directory now): its token is dead, and the file must not suggest otherwise.
            from scheduler.control.guard import remove_token

            remove_token(self.directory, None)
        if listen is not None:
            check_listen(listen, token)  # off loopback, only with a token the host chose
            token = token or self.control_token
        app: ASGIApp = create_app(self, token=token, extra_routers=extra_routers)
        if dashboard:
            from scheduler.web import dashboard_app

            app = dashboard_app(self, api=app, token=token)
        server = ControlServer(
            app,
            socket_path=self.directory / CONTROL_SOCKET if socket else None,
            listen=listen,
            token=token,
            dashboard=dashboard,
        )
        await server.start()
        self._control = server
        return server

    async def _stop_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            await control.close()
        self._forget_control_token()

    def _forget_control_token(self) -> None:
        token, self._control_token = self._control_token, None
        if token is not None:
            from scheduler.control.guard import remove_token

            remove_token(self.directory, token)

    async def stop(self, grace_period: float | None = 30.0) -> None:
        """Stop scheduling, let runs in progress finish, save, and release the directory.

        Runs still going after ``grace_period`` seconds (None: wait for them) are cancelled
        and stay runnable. The control API's listeners stop first. Idempotent.
        """
        if not self.closed:
            await self._stop_control()
        await super().stop(grace_period)

    def close(self, *, save: bool = True) -> None:
        """Save and release the directory without an event loop (for a never-started dispatcher).

        ``save=False`` releases it without writing changes that are not saved yet (for a caller
        that reported them as not saved after a :class:`SaveFailedError`).
        """
        if not self.closed and (self.running or self._control is not None):
            raise DispatcherNotRunningError("the dispatcher is running: use 'await stop()'")
        super().close(save=save)
        self._forget_control_token()
