"""The dashboard of a standby: an instance of a cluster waiting while another leads.

It shows no tasks (a standby holds none). A browser asking for any page of the dashboard is
sent to the same page at the leader's advertised URL (307), when that is an http(s) URL;
else it gets a small page saying that this instance stands by and who leads, if known. The
same guard as the leader's dashboard stands in front: a browser logs in here first (its
token, or the login URL), every other request is the standby's control API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from scheduler.control.api import API_PREFIX
from scheduler.control.standby import StandbyView
from scheduler.triggers import utc_now
from scheduler.web.app import _dashboard_path, _environment, _favicon, log_in
from scheduler.web.security import DashboardGuard, WebSecurity
from scheduler.web.views import cluster_line, leader_link

__all__ = ["standby_dashboard_app"]


def standby_dashboard_app(
    view: Callable[[], StandbyView], *, api: ASGIApp, token: str | None
) -> ASGIApp:
    """The dashboard of a standby whose knowledge ``view()`` returns, with ``api`` (its
    control API) behind it, guarded as one (see :func:`scheduler.web.dashboard_app`)."""
    security = WebSecurity(token)
    templates = Jinja2Templates(env=_environment())

    def render(
        request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        known = view()
        base = {
            "csrf_token": security.csrf_token(None),
            "api_prefix": API_PREFIX,
            "zone": "",
            "problems": [],
            "logged_in": False,
            "path": request.url.path,
            "rendered_at": utc_now().isoformat(),
            "order_tag": "",
            "cluster": cluster_line(_described(known)),
            "message": known.message,
        }
        response = templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status_code
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    async def login(request: Request) -> Response:
        return await log_in(request, security, render)

    async def page(request: Request) -> Response:
        """Any page: the same one at the leader, or a page saying this instance stands by."""
        link = leader_link(view().leader_url)
        if link is None:
            return render(request, "standby.html", {}, status_code=503)
        location = link.rstrip("/") + request.url.path
        if request.url.query:
            location += "?" + request.url.query
        response = RedirectResponse(location, status_code=307)
        response.headers["Cache-Control"] = "no-store"
        return response

    routes: list[BaseRoute] = [
        Route("/login", login, methods=["GET", "POST"], name="login"),
        Route("/favicon.ico", _favicon, name="favicon"),
        Mount("/static", StaticFiles(packages=[("scheduler.web", "static")]), name="static"),
        Route("/", page),
        Route("/timeline", page),
        Route("/add", page),
        Route("/events", page),
        Route("/tasks/{task_id:path}", page),
        Mount("/", api),
    ]
    return DashboardGuard(Starlette(routes=routes), security, owns=_dashboard_path)


def _described(known: StandbyView) -> dict[str, Any]:
    leader = {"id": known.leader_id, "url": known.leader_url} if known.leader_id else None
    return {"role": "standby", "epoch": known.epoch, "leader": leader}
