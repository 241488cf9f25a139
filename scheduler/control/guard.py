"""Who may call the control API, and how much they may send: a pure ASGI middleware.

It sits in front of every route (the API, ``/metrics``, the OpenAPI document and whatever a
dashboard mounts later), so no route can forget it.

* A request through the Unix socket is trusted: the socket is ``0600`` in a ``0700``
  directory, so the operating system already checked that the caller is the owner.
* With a token, every other request needs ``Authorization: Bearer <token>`` (compared in
  constant time); a caller who presented it is authorised to see secrets.
* Without a token, TCP (refused off loopback by the server) accepts requests whose ``Host``
  is a loopback name (defeats DNS rebinding), and nobody may see secrets.
* State-changing requests carrying a browser ``Origin`` of another site are refused (CSRF).
* Request bodies are limited (413 beyond ``max_body`` bytes).
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AUTHORISED", "LISTENER", "MAX_BODY", "ControlGuard", "is_authorised"]

LISTENER = "task_dispatcher.listener"
"""Scope key set by the server's listeners: ``"unix"`` or ``"tcp"`` (absent when embedded)."""
AUTHORISED = "task_dispatcher.authorised"
"""Scope key set here: whether the caller may see secrets."""
MAX_BODY = 1024 * 1024
"""The default request body limit: 1 MiB holds thousands of task specs."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_authorised(scope: Scope) -> bool:
    """Whether the guard found the caller authorised to see secrets."""
    return bool(scope.get(AUTHORISED, False))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _loopback_host(host: str) -> bool:
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
    """Authentication, origin checks and the body limit in front of ``app``."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int = MAX_BODY) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self.max_body = max_body

    @property
    def has_token(self) -> bool:
        """Whether a token is configured."""
        return self._token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
            presented = _header(scope, b"authorization") or ""
            scheme, _, credential = presented.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode(), self._token
            ):
                return (
                    401,
                    "unauthorized",
                    "this dispatcher needs a token: send 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
            trusted = True
        if listener == "tcp" and self._token is None:
            host = _header(scope, b"host") or ""
            if not _loopback_host(host):
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
