"""The control plane: a JSON API over a running dispatcher, its listeners and its client.

Needs the ``control`` extra (``pip install 'task-dispatcher[control]'``). Most hosts use it
through :meth:`TaskDispatcher.control_app` and :meth:`TaskDispatcher.serve_control`.
"""

from __future__ import annotations

from scheduler.control.app import API_PREFIX, create_app
from scheduler.control.client import ControlClient
from scheduler.control.guard import MAX_BODY
from scheduler.control.server import ControlServer, check_listen

__all__ = ["API_PREFIX", "MAX_BODY", "ControlClient", "ControlServer", "check_listen", "create_app"]
