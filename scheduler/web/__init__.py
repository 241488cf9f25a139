"""The web dashboard: every account's tasks in a browser, served beside the control API.

Needs the ``web`` extra (``pip install 'task-dispatcher[web]'``). :func:`dashboard_app` wraps
the control plane's ASGI app: pages at ``/``, the JSON API where the control plane puts it,
one security guard in front of both.
"""

from __future__ import annotations

from scheduler.web.app import API_PREFIX, HealthProbe, dashboard_app, health_problems
from scheduler.web.security import DashboardGuard, WebSecurity

__all__ = [
    "API_PREFIX",
    "DashboardGuard",
    "HealthProbe",
    "WebSecurity",
    "dashboard_app",
    "health_problems",
]
