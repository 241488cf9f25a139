"""What the control API's server and its client agree on: where the routes live, how an id
goes into a path, and the status of a change applied but not saved."""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["API_PREFIX", "NOT_SAVED", "path_segment"]

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
