"""The control plane: a JSON API over a running dispatcher, its listeners and its client.

Needs the ``control`` extra (``pip install 'task-dispatcher[control]'``). Most hosts use it
through :meth:`TaskDispatcher.control_app` and :meth:`TaskDispatcher.serve_control`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scheduler.control.api import API_PREFIX, NOT_SAVED, path_segment

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


def __getattr__(name: str) -> Any:
    # Imported on first use: the command line's client must not pay for the server side
    # (FastAPI, uvicorn), nor the server for the client (httpx).
    if name == "create_app":
        from scheduler.control.app import create_app

        return create_app
    if name == "ControlClient":
        from scheduler.control.client import ControlClient

        return ControlClient
    if name == "MAX_BODY":
        from scheduler.control.guard import MAX_BODY

        return MAX_BODY
    if name == "ControlServer":
        from scheduler.control.server import ControlServer

        return ControlServer
    if name == "check_listen":
        from scheduler.control.server import check_listen

        return check_listen
    raise AttributeError(f"module 'scheduler.control' has no attribute {name!r}")
