"""Opening connections to the store's database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

__all__ = ["connector"]


def connector(
    dsn: str,
    *,
    timeout: float | None = None,
    idle_in_transaction: float | None = None,
    **options: Any,
) -> Callable[[], psycopg.Connection[Any]]:
    """A function opening a new connection to ``dsn``.

    ``timeout`` (seconds) bounds connecting, each statement (``statement_timeout``) and
    unacknowledged network writes (``tcp_user_timeout``): a lease's connection uses a third
    of the lease, so a blocked database never holds its renewals past the deadline.
    ``idle_in_transaction`` (seconds) ends the session of a client that stops in the middle
    of a transaction (``idle_in_transaction_session_timeout``): a leader frozen during a
    commit holds the fencing lock a takeover waits for, and would otherwise hold it for as
    long as it is frozen.
    """
    settings: dict[str, Any] = {"application_name": "task-dispatcher", **options}
    server: list[str] = []
    if timeout is not None:
        milliseconds = max(1, int(timeout * 1000))
        settings.setdefault("connect_timeout", max(1, int(timeout + 0.999)))
        server.append(f"-c statement_timeout={milliseconds}")
        settings.setdefault("tcp_user_timeout", milliseconds)
    if idle_in_transaction is not None:
        idle = max(1, int(idle_in_transaction * 1000))
        server.append(f"-c idle_in_transaction_session_timeout={idle}")
    if server:
        settings.setdefault("options", " ".join(server))

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, **settings)

    return connect
