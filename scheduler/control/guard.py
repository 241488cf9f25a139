"""Who may call the control API, and how much they may send: a pure ASGI middleware.

It sits in front of every route (the API, ``/metrics``, the OpenAPI document and whatever a
dashboard mounts later), so no route can forget it.

* A request through the Unix socket is trusted: the socket is ``0600`` in a ``0700``
  directory, so the operating system already checked that the caller is the owner.
* With a token, every other request needs ``Authorization: Bearer <token>`` (compared in
  constant time); a caller who presented it is authorised to see secrets. A client that keeps
  presenting wrong tokens is made to wait (:class:`Throttle`, 429 with ``Retry-After``).
* Every TCP listener has a token (TCP cannot tell local users apart): a request that came
  through one of the server's TCP listeners to an app without a token is refused. An app
  without a token embedded by a host (no listener of ours) answers only requests addressed to
  a loopback name (a ``Host`` check against DNS rebinding), and nobody may see secrets.
* State-changing requests carrying a browser ``Origin`` of another site are refused (CSRF).
* Request bodies are limited (413 beyond ``max_body`` bytes).
* Every response forbids framing (``frame-ancestors 'none'``, ``X-Frame-Options: DENY``): no
  other site can show a page in a frame and steer a click.

It also issues the token a listener uses when its host gives none (:func:`issue_token`).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobstores.durable import write_atomic

__all__ = [
    "AUTHORISED",
    "LISTENER",
    "MAX_BODY",
    "TOKEN_FILE",
    "ControlGuard",
    "Throttle",
    "client_of",
    "forbid_framing",
    "framing_forbidden",
    "is_authorised",
    "is_loopback_host",
    "issue_token",
    "remove_token",
]

LISTENER = "task_dispatcher.listener"
"""Scope key set by the server's listeners: ``"unix"`` or ``"tcp"`` (absent when embedded)."""
AUTHORISED = "task_dispatcher.authorised"
"""Scope key set here: whether the caller may see secrets."""
MAX_BODY = 1024 * 1024
"""The default request body limit: 1 MiB holds thousands of task specs."""

TOKEN_FILE = "control.token"
"""Where a dispatcher keeps the token it drew for its TCP listener, in its directory (0600)."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_FRAME_ANCESTORS = b"frame-ancestors 'none'"


def issue_token(directory: Path) -> str:
    """Draw a token (``secrets.token_urlsafe``) and store it in ``directory/``:data:`TOKEN_FILE`.

    The file is written atomically and owner-only (created ``0600`` under a temporary name,
    then renamed into place), so no other user can read it at any instant; the owner's
    scripts can (``export TASK_DISPATCHER_TOKEN=$(cat <dir>/control.token)``).
    """
    token = secrets.token_urlsafe(32)
    write_atomic(directory / TOKEN_FILE, token.encode() + b"\n")
    return token


def remove_token(directory: Path, token: str | None) -> None:
    """Remove ``directory``'s token file if it still holds ``token`` (once its listener is
    gone), or whatever it holds with None (a token left by a dispatcher that died)."""
    path = directory / TOKEN_FILE
    with contextlib.suppress(OSError):
        if token is None or path.read_text().strip() == token:
            path.unlink()


def forbid_framing(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` (ASGI, lower-case names) with framing forbidden: ``frame-ancestors 'none'``
    added to the ``Content-Security-Policy`` already sent (or as one), ``X-Frame-Options:
    DENY`` unless one is set. Idempotent, so guards stacked in front of one app agree."""
    result: list[tuple[bytes, bytes]] = []
    policy = frame_options = False
    for name, value in headers:
        if name == b"content-security-policy":
            policy = True
            if b"frame-ancestors" not in value.lower():
                value = (
                    value.rstrip(b"; ") + b"; " + _FRAME_ANCESTORS
                    if value.strip()
                    else _FRAME_ANCESTORS
                )
        elif name == b"x-frame-options":
            frame_options = True
        result.append((name, value))
    if not policy:
        result.append((b"content-security-policy", _FRAME_ANCESTORS))
    if not frame_options:
        result.append((b"x-frame-options", b"DENY"))
    return result


def framing_forbidden(send: Send) -> Send:
    """``send`` with :func:`forbid_framing` applied to the response's headers."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": forbid_framing(message.get("headers", ()))}
        await send(message)

    return wrapped


def client_of(scope: Scope) -> str | None:
    """The address a request came from (None: unknown, e.g. the Unix socket)."""
    client = scope.get("client")
    return str(client[0]) if client else None


class Throttle:
    """A per-client backoff after wrong credentials (a token, a login form).

    The first ``free`` failures of a client cost nothing (typos); each later one makes the
    client wait ``base`` seconds, doubling up to ``cap``. While it waits its attempts are
    refused unchecked (a guess during the wait learns nothing); a success forgets its
    failures, and so does ``forget_after`` seconds without one, so the real user is never
    locked out for long. At most ``clients`` clients are remembered (the least recent is
    forgotten first): memory stays bounded whatever an attacker sends.
    """

    def __init__(
        self,
        *,
        free: int = 5,
        base: float = 1.0,
        cap: float = 30.0,
        forget_after: float = 900.0,
        clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.base = base
        self.cap = cap
        self.forget_after = forget_after
        self.clients = clients
        self._clock = clock
        # client -> (failures, when the last one happened, until when it must wait)
        self._failures: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def wait(self, client: str | None) -> float:
        """Seconds ``client`` must still wait before its credentials are checked (0: none)."""
        if client is None:
            return 0.0
        entry = self._failures.get(client)
        if entry is None:
            return 0.0
        now = self._clock()
        _, last, until = entry
        if now - last >= self.forget_after:
            del self._failures[client]
            return 0.0
        return max(0.0, until - now)

    def failed(self, client: str | None) -> None:
        """Count a wrong credential from ``client``."""
        if client is None:
            return
        now = self._clock()
        failures, last, _ = self._failures.pop(client, (0, now, now))
        if now - last >= self.forget_after:
            failures = 0
        failures += 1
        delay = 0.0
        if failures > self.free:
            delay = min(self.cap, self.base * 2 ** min(failures - self.free - 1, 32))
        self._failures[client] = (failures, now, now + delay)
        while len(self._failures) > self.clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str | None) -> None:
        """Forget ``client``'s failures (it knew the credential)."""
        if client is not None:
            self._failures.pop(client, None)

    def retry_after(self, client: str | None) -> str:
        """The ``Retry-After`` header of a refusal: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.wait(client))))


def is_authorised(scope: Scope) -> bool:
    """Whether the guard found the caller authorised to see secrets."""
    return bool(scope.get(AUTHORISED, False))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``, any
    ``127.x.x.x`` or ``[::1]``, with or without a port."""
    name = urlsplit(f"//{host}").hostname or ""
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _reply(send: Send, status: int, error: str, message: str, **headers: str) -> None:
    body = orjson.dumps({"error": error, "message": message, "field": None})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ControlGuard:
    """Authentication, origin checks, the body limit and the frame headers in front of ``app``.

    ``throttle`` counts wrong tokens per client (a fresh :class:`Throttle` by default).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body: int = MAX_BODY,
        throttle: Throttle | None = None,
    ) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self.max_body = max_body
        self.throttle = throttle or Throttle()

    @property
    def has_token(self) -> bool:
        """Whether a token is configured."""
        return self._token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = framing_forbidden(send)
        refusal = self._refusal(scope)
        if refusal is not None:
            status, error, message, headers = refusal
            await _reply(send, status, error, message, **headers)
            return
        if scope["method"] in _SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            await _reply(
                send,
                413,
                "too_large",
                f"request body exceeds {self.max_body} bytes; split a bulk add into parts",
            )
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect remains

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, dict[str, str]] | None:
        listener = scope.get(LISTENER)
        trusted = listener == "unix"
        if not trusted and self._token is not None:
            presented = _header(scope, b"authorization")
            refusal = self._check_bearer(presented, client_of(scope))
            if refusal is not None:
                return refusal
            trusted = True
        if listener == "tcp" and self._token is None:
            # The server never opens TCP without a token; an app built without one refuses
            # to be served that way all the same.
            return (
                401,
                "unauthorized",
                "this listener has no token: TCP cannot tell local users apart, so a token "
                "is required; serve the control API with a token",
                {},
            )
        if not trusted and self._token is None:
            host = _header(scope, b"host") or ""
            if not is_loopback_host(host):
                return (
                    403,
                    "forbidden",
                    f"Host {host!r} is not a loopback name; without a token this API answers "
                    "only requests addressed to localhost",
                    {},
                )
        origin = _header(scope, b"origin")
        if origin is not None and scope["method"] not in _SAFE_METHODS:
            host = _header(scope, b"host") or ""
            if urlsplit(origin).netloc != host:
                return (
                    403,
                    "forbidden",
                    f"cross-site request from {origin!r} refused",
                    {},
                )
        scope[AUTHORISED] = trusted
        return None

    def _check_bearer(
        self, presented: str | None, client: str | None
    ) -> tuple[int, str, str, dict[str, str]] | None:
        """The refusal of a request presenting ``presented`` (the Authorization header), or
        None when it carries the token."""
        assert self._token is not None
        if presented is None:
            return (
                401,
                "unauthorized",
                "this dispatcher needs a token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if self.throttle.wait(client) > 0:
            return (
                429,
                "too_many_requests",
                "too many wrong tokens from this address: wait and try again",
                {"Retry-After": self.throttle.retry_after(client)},
            )
        scheme, _, credential = presented.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), self._token
        ):
            self.throttle.failed(client)
            return (
                401,
                "unauthorized",
                "invalid token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        self.throttle.succeeded(client)
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit (nothing more is read)."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
