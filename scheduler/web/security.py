"""Who may use the dashboard: the API's token, carried by a signed cookie, and CSRF checks.

The listener is the security boundary, so one ASGI middleware (:class:`DashboardGuard`) wraps
everything it serves, the dashboard and the control API alike:

- **Token**: every TCP listener has one (the server refuses TCP without it; a request that
  came through TCP to an app without a token is refused here too). Every request needs it, as
  an ``Authorization: Bearer`` header (API clients) or as a session cookie (browsers) that the
  login form, or a login URL carrying the token once (``/login?token=...``), sets. The cookie
  is signed, ``HttpOnly`` and ``SameSite=Strict``; a valid cookie is passed on to the API as
  the bearer token, so the API has one way to authorise.
- **Sessions** are revocable: the cookie names a session the process keeps (a bounded set of
  live ones), and logging out ends it, so a copy of the cookie is refused afterwards.
- **Throttling**: wrong tokens (header, form or URL) make their client wait
  (:class:`~scheduler.control.guard.Throttle`, 429 with ``Retry-After``).
- **Host check** without a token (an app a host embeds in-process, never a TCP listener of
  ours): a page from another site cannot reach it through DNS rebinding, because its requests
  carry that site's host name.
- **CSRF**: a change (any method but GET/HEAD/OPTIONS) made by a browser must carry the page's
  CSRF token in ``X-CSRF-Token``, and a cross-origin ``Origin`` is refused outright. Clients
  that authenticate with a header (the CLI, scripts) are not browsers and are not asked.
- **Framing**: every response forbids being shown in a frame (clickjacking).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from scheduler.control.guard import (
    LISTENER,
    Throttle,
    client_of,
    framing_forbidden,
    is_loopback_host,
)

__all__ = [
    "COOKIE_NAME",
    "CSRF_HEADER",
    "LOOPBACK_HOSTS",
    "DashboardGuard",
    "WebSecurity",
]

COOKIE_NAME = "td_session"
"""The session cookie set by the login form."""
CSRF_HEADER = "x-csrf-token"
"""The header that carries the page's CSRF token on every change."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
"""Some host names a loopback listener answers to (any loopback address or name will do)."""
SESSION_SECONDS = 12 * 3600
"""How long a login lasts."""
MAX_SESSIONS = 1_000
"""Live sessions kept at most; beyond, the oldest login ends (the memory stays bounded)."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PUBLIC_PREFIXES = ("/login", "/static/", "/favicon.ico")
# Plain HTML forms, which cannot send a header: their routes check a CSRF form field instead.
_FORM_PATHS = frozenset({"/login", "/logout"})


def _host_name(host: str) -> str:
    """``127.0.0.1:8765`` -> ``127.0.0.1``, ``[::1]:80`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class WebSecurity:
    """The token, the signing key derived from it, the live sessions and the checks on them.

    ``token`` None means an unauthenticated app, which only an in-process host may embed:
    then ``allowed_hosts`` (None: any loopback name or address) guards against DNS rebinding.
    Sessions and CSRF tokens are HMACs under a key drawn per process, so a restart logs
    everyone out; a session is valid while this process keeps it (:meth:`revoke` ends it).
    ``throttle`` counts wrong tokens per client.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        allowed_hosts: Collection[str] | None = None,
        key: bytes | None = None,
        throttle: Throttle | None = None,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.token = token or None
        self.allowed_hosts = frozenset(allowed_hosts) if allowed_hosts and not token else None
        self.throttle = throttle or Throttle()
        self.max_sessions = max_sessions
        self._key = hashlib.sha256(
            (key or secrets.token_bytes(32)) + (token or "").encode()
        ).digest()
        # Session id -> when it expires, oldest login first.
        self._sessions: OrderedDict[str, float] = OrderedDict()

    @property
    def token_required(self) -> bool:
        """Whether requests must prove they know the token."""
        return self.token is not None

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def check_token(self, candidate: str | None, client: str | None = None) -> bool:
        """Whether ``candidate`` is the token (a constant-time comparison). With ``client``,
        a wrong candidate counts against it in :attr:`throttle` (a right one clears it): ask
        :meth:`Throttle.wait` first, and do not check while it says wait."""
        if self.token is None or candidate is None:
            return False
        right = hmac.compare_digest(candidate.encode(), self.token.encode())
        if client is not None:
            if right:
                self.throttle.succeeded(client)
            else:
                self.throttle.failed(client)
        return right

    def new_session(self, now: float | None = None) -> str:
        """A fresh signed session value, valid for :data:`SESSION_SECONDS` unless revoked."""
        now = time.time() if now is None else now
        expires = int(now + SESSION_SECONDS)
        session_id = secrets.token_hex(16)
        sessions = self._sessions
        while sessions and (
            len(sessions) >= self.max_sessions or next(iter(sessions.values())) <= now
        ):
            sessions.popitem(last=False)
        sessions[session_id] = expires
        payload = f"{expires}.{session_id}"
        return f"{payload}.{self._sign('session', payload)}"

    def _session_id(self, value: str | None) -> str | None:
        """The id of the session ``value`` names, if this process signed it."""
        if not value or self.token is None:
            return None
        payload, _, signature = value.rpartition(".")
        if not hmac.compare_digest(signature, self._sign("session", payload)):
            return None
        return payload.partition(".")[2]

    def valid_session(self, value: str | None, now: float | None = None) -> bool:
        """Whether ``value`` is a live session this process signed and that has not expired."""
        session_id = self._session_id(value)
        if session_id is None:
            return False
        expires = self._sessions.get(session_id)
        return expires is not None and expires > (time.time() if now is None else now)

    def revoke(self, value: str | None) -> None:
        """End the session ``value`` names: the cookie is refused from now on."""
        session_id = self._session_id(value)
        if session_id is not None:
            self._sessions.pop(session_id, None)

    def csrf_token(self, session: str | None) -> str:
        """The CSRF token of a page shown to ``session`` (or to an anonymous visitor)."""
        return self._sign("csrf", session or "anonymous")

    def valid_csrf(self, session: str | None, candidate: str | None) -> bool:
        """Whether ``candidate`` is the CSRF token of ``session``."""
        return bool(candidate) and hmac.compare_digest(
            str(candidate), self.csrf_token(session if self.valid_session(session) else None)
        )

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request for ``host`` (the Host header) may be answered."""
        if self.token is not None:
            return True
        if host is None:
            return False
        if self.allowed_hosts is None:
            return is_loopback_host(host)
        return _host_name(host) in self.allowed_hosts


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, credential = value.partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


def _same_origin(origin: str, host: str | None) -> bool:
    return origin != "null" and urlsplit(origin).netloc == (host or "")


def _error(status: int, error: str, message: str, **headers: str) -> JSONResponse:
    # The control API's error body, so a client reads one shape whoever refused.
    body = {"error": error, "message": message, "field": None}
    return JSONResponse(body, status_code=status, headers=headers or None)


class DashboardGuard:
    """ASGI middleware applying :class:`WebSecurity` in front of the dashboard and the API.

    The listener is the boundary: every token presented in a header is checked (and
    throttled) here, for the API's paths too. The dashboard's own paths (``owns``) need the
    token or a session; on the API's paths a valid session cookie is turned into the bearer
    token it stands for and the API's own guard decides. Browser changes are checked for CSRF.
    Every response, refusals included, forbids framing.
    """

    def __init__(self, app: ASGIApp, security: WebSecurity, owns: Callable[[str], bool]) -> None:
        self.app = app
        self.security = security
        self.owns = owns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = framing_forbidden(send)
        if scope["type"] not in ("http", "websocket") or scope.get(LISTENER) == "unix":
            # The Unix socket is owner-only: the operating system already authenticated.
            await self.app(scope, receive, send)
            return
        response = self._refusal(scope)
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        """The response refusing this request, or None to let it through (maybe amended)."""
        connection = HTTPConnection(scope)
        headers = connection.headers
        security = self.security
        path: str = scope["path"]
        own = self.owns(path)
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        if not security.token_required and scope.get(LISTENER) == "tcp":
            return _error(
                401,
                "unauthorized",
                "this listener has no token: TCP cannot tell local users apart, so a token "
                "is required; serve the dashboard with a token",
            )
        if own and not security.host_allowed(headers.get("host")):
            return _error(
                403,
                "forbidden",
                f"Host {headers.get('host')!r} is not a loopback name; without a token the "
                "dashboard answers only requests addressed to localhost",
            )
        if method not in _SAFE_METHODS and origin and not _same_origin(origin, headers.get("host")):
            return _error(403, "forbidden", f"cross-site request from {origin!r} refused")
        bearer = _bearer(headers)
        session = connection.cookies.get(COOKIE_NAME)
        if security.token_required and bearer is not None:
            client = client_of(scope)
            wait = security.throttle.wait(client)
            if wait > 0:
                return _error(
                    429,
                    "too_many_requests",
                    "too many wrong tokens from this address: wait and try again",
                    **{"Retry-After": security.throttle.retry_after(client)},
                )
            if not security.check_token(bearer, client):
                return _error(
                    401,
                    "unauthorized",
                    "invalid token: send 'Authorization: Bearer <token>'",
                    **{"WWW-Authenticate": "Bearer"},
                )
        elif security.token_required and security.valid_session(session):
            # The API authorises bearer tokens only: hand it the one the cookie stands for.
            assert security.token is not None
            raw = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
            raw.append((b"authorization", f"Bearer {security.token}".encode()))
            scope["headers"] = raw
        elif security.token_required and own and not path.startswith(_PUBLIC_PREFIXES):
            if method == "GET" and "text/html" in headers.get("accept", ""):
                target = path
                if scope.get("query_string"):
                    target += "?" + scope["query_string"].decode("latin-1")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            return _error(
                401,
                "unauthorized",
                "this dispatcher needs a token: log in, or send 'Authorization: Bearer <token>'",
                **{"WWW-Authenticate": "Bearer"},
            )
        browser = bool(origin or "cookie" in headers or "sec-fetch-site" in headers)
        if (
            method not in _SAFE_METHODS
            and bearer is None
            and browser
            and path not in _FORM_PATHS
            and not security.valid_csrf(session, headers.get(CSRF_HEADER))
        ):
            return _error(403, "forbidden", "missing or invalid CSRF token: reload the page")
        return None
