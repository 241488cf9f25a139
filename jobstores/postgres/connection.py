"""Opening connections to the store's database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

__all__ = ["connector"]


def connector(
    dsn: str, *, timeout: float | None = None, **options: Any
) -> Callable[[], psycopg.Connection[Any]]:
    """A function opening a new connection to ``dsn``.

    ``timeout`` (seconds) bounds connecting, each statement (``statement_timeout``) and
    unacknowledged network writes (``tcp_user_timeout``): a lease's connection uses a third
    of the lease, so a blocked database never holds its renewals past the deadline.
    """
    settings: dict[str, Any] = {"application_name": "task-dispatcher", **options}
    if timeout is not None:
        milliseconds = max(1, int(timeout * 1000))
        settings.setdefault("connect_timeout", max(1, int(timeout + 0.999)))
        settings.setdefault("options", f"-c statement_timeout={milliseconds}")
        settings.setdefault("tcp_user_timeout", milliseconds)

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, **settings)

    return connect
