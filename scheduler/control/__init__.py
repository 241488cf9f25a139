"""The control plane: a JSON API over a running dispatcher, its listeners and its client.

Needs the ``control`` extra (``pip install 'task-dispatcher[control]'``). Most hosts use it
through :meth:`TaskDispatcher.control_app` and :meth:`TaskDispatcher.serve_control`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from scheduler.control.app import create_app
    from scheduler.control.client import ControlClient
    from scheduler.control.guard import MAX_BODY
    from scheduler.control.server import ControlServer, check_listen

__all__ = [
    "API_PREFIX",
    "MAX_BODY",
    "NOT_SAVED",
    "ControlClient",
    "ControlServer",
    "check_listen",
    "create_app",
    "path_segment",
]

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


_LAZY = {
    "create_app": "scheduler.control.app",
    "ControlClient": "scheduler.control.client",
    "MAX_BODY": "scheduler.control.guard",
    "ControlServer": "scheduler.control.server",
    "check_listen": "scheduler.control.server",
}


def __getattr__(name: str) -> Any:
    # The command line's client must not pay for importing the server side (FastAPI, uvicorn).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'scheduler.control' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
