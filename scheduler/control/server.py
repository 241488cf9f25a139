"""Serving the control API on the dispatcher's Unix socket and, when asked, on TCP.

Each listener is a uvicorn server on the dispatcher's own event loop, on a socket created here:

* the Unix socket is bound in a private temporary directory, made ``0600`` and only then
  renamed to ``<dir>/control.sock``, so there is no instant at which another user could
  connect; a stale socket left by a dead owner is replaced (only this process, holding the
  directory's lock, can own the directory, so any socket already there is stale), anything
  else at that path is refused;
* TCP binds only with a token (TCP cannot tell local users apart: another user of the machine
  could otherwise steer the dispatcher) and after :func:`check_listen` accepted the address: a
  non-loopback address needs a token the host chose, not one drawn for it.

uvicorn installs no signal handlers and configures no logging here: the host (or the ``run``
command) owns both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Generator
from pathlib import Path
from urllib.parse import quote

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from scheduler.control.guard import LISTENER
from scheduler.errors import ListenError

__all__ = ["ControlServer", "check_listen", "parse_listen"]

logger = logging.getLogger(__name__)

_SHUTDOWN_GRACE = 5.0
"""Seconds requests in progress get to finish when the listeners stop."""
_MAX_UNIX_PATH = 107
"""The longest Unix socket path Linux accepts (sun_path holds 108 bytes with the NUL)."""
_START_TIMEOUT = 10.0
"""Seconds a listener may take to start (binding is already done; this is uvicorn's setup)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8765`` for IPv6) as ``(host, port)``; raises ``ValueError``."""
    host, sep, port_text = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ListenError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8765")
    return host, int(port_text)


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, str]]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"--listen {host}:{port}: cannot resolve {host!r}: {exc}") from None
    return [(family, str(address[0])) for family, _, _, _, address in found]


def check_listen(listen: str, token: str | None) -> tuple[str, int]:
    """Validate a TCP listen address: a non-loopback one is refused without a token."""
    host, port = parse_listen(listen)
    addresses = _addresses(host, port)
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for _, a in addresses)
    if not loopback and not token:
        raise ListenError(
            f"--listen {listen}: {host} is not a loopback address; anyone who can reach it "
            "could steer the dispatcher. Set a token (--token or $TASK_DISPATCHER_TOKEN) "
            "or listen on 127.0.0.1"
        )
    return host, port


def _bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the moment it appears there."""
    staged_length = len(os.fsencode(path.parent)) + len("/.ctl-xxxxxxxx/s")
    if max(len(os.fsencode(path)), staged_length) > _MAX_UNIX_PATH:
        raise ListenError(
            f"{path}: the path is too long for a Unix socket ({_MAX_UNIX_PATH} bytes at most); "
            "use a dispatcher directory with a shorter path"
        )
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise FileExistsError(
                errno.EEXIST, "exists and is not a socket; refusing to replace it", str(path)
            )
        logger.info("removing the stale control socket %s", path)
        path.unlink()
    private = Path(tempfile.mkdtemp(prefix=".ctl-", dir=path.parent))
    staged = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(staged))
        os.chmod(staged, 0o600)
        os.replace(staged, path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()
    sock.setblocking(False)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family, address = _addresses(host, port)[0]
    sock = socket.create_server((address, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


class _Listener:
    """Marks each request with the listener it came through, for the guard."""

    def __init__(self, app: ASGIApp, kind: str) -> None:
        self.app = app
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, LISTENER: self.kind}
        await self.app(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the host application owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ControlServer:
    """The listeners serving one control app; :meth:`close` stops them."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        socket_path: Path | None,
        listen: str | None = None,
        token: str | None = None,
        dashboard: bool = False,
    ) -> None:
        self._app = app
        self.socket_path = socket_path
        """The Unix socket served (None: no socket)."""
        if listen and not token:
            raise ListenError(
                f"--listen {listen}: a TCP listener needs a token (TCP cannot tell the users "
                "of this machine apart)"
            )
        self._listen = check_listen(listen, token) if listen else None
        self.token = token if listen else None
        """The token every TCP request needs (None: no TCP listener)."""
        self.dashboard = dashboard
        """Whether the app serves the dashboard (then :attr:`login_url` logs a browser in)."""
        self.address: tuple[str, int] | None = None
        """The TCP address bound (the real port if 0 was asked), or None."""
        self._servers: list[tuple[_Server, asyncio.Task[None]]] = []
        self._socket_inode: int | None = None

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the TCP listener, or None."""
        if self.address is None:
            return None
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def login_url(self) -> str | None:
        """The dashboard's URL carrying the token once: opening it logs a browser in (it
        trades the token for a session cookie and moves on to ``/`` without it). None
        without TCP or without the dashboard. It holds the token: show it to its owner only."""
        if self.url is None or self.token is None or not self.dashboard:
            return None
        return f"{self.url}/login?token={quote(self.token, safe='')}"

    async def start(self) -> None:
        """Bind and start serving; returns once every listener accepts connections."""
        try:
            if self.socket_path is not None:
                sock = _bind_unix(self.socket_path)
                self._socket_inode = os.stat(self.socket_path).st_ino
                await self._serve(sock, "unix")
                logger.info("control API on unix socket %s", self.socket_path)
            if self._listen is not None:
                sock = _bind_tcp(*self._listen)
                host, port = sock.getsockname()[:2]
                self.address = (str(host), int(port))
                await self._serve(sock, "tcp")
                logger.info("control API on %s", self.url)
        except OSError as exc:
            await self.close()
            raise ListenError(f"the control API cannot listen: {exc}") from exc
        except BaseException:
            await self.close()
            raise

    async def _serve(self, sock: socket.socket, kind: str) -> None:
        config = uvicorn.Config(
            _Listener(self._app, kind),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(_SHUTDOWN_GRACE),
        )
        server = _Server(config)
        task = asyncio.get_running_loop().create_task(
            server.serve(sockets=[sock]), name=f"task-dispatcher control {kind}"
        )
        self._servers.append((server, task))
        deadline = asyncio.get_running_loop().time() + _START_TIMEOUT
        while not server.started:
            if task.done() or asyncio.get_running_loop().time() > deadline:
                sock.close()
                if task.done():
                    task.result()  # raises what stopped it
                raise RuntimeError(f"the control API's {kind} listener stopped at start")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop accepting requests, let those in progress finish, remove the socket."""
        servers, self._servers = self._servers, []
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if self.socket_path is not None and self._socket_inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.socket_path).st_ino == self._socket_inode:
                    self.socket_path.unlink()
            self._socket_inode = None
        if servers:
            logger.info("control API stopped")
