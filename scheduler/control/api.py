"""What the control API's server and its client agree on: where the routes live, how an id
goes into a path, and the status of a change applied but not saved."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

__all__ = ["API_PREFIX", "NOT_SAVED", "leader_link", "path_segment"]

API_PREFIX = "/api/v1"
"""Where the API's routes live; a later, incompatible API gets a new prefix."""

NOT_SAVED = 507
"""The status of a change the dispatcher applied but could not save (``SaveFailedError``):
in effect, retried in the background, not on disk yet."""


def path_segment(value: str) -> str:
    """``value`` (a task or account id) as one percent-encoded URL path segment.

    Everything but unreserved ASCII is encoded (``账号`` as UTF-8, ``/``, ``?``, ``#``, ``%``),
    and the dots of a whole ``.`` or ``..`` too, which HTTP clients would otherwise collapse as
    relative segments (an account may be called that; a task only in a file saved before such
    task ids were refused). Browsers collapse ``%2E`` too: the dashboard cannot reach those.
    """
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


def leader_link(url: object) -> str | None:
    """``url`` if it is an absolute http(s) base URL (no query) a page may link to and a
    redirect may send a client to, else None.

    The value is read from the database: it is never trusted to be a harmless link
    (``javascript:`` and the like are shown as text)."""
    if not isinstance(url, str) or not url or url != url.strip():
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return None  # a base URL: a page's path and query are put after it
    if any(ord(char) < 0x21 or char in '"<>\\`' for char in url):
        return None
    return url
