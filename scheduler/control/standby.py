"""The control API of a standby: an instance of a cluster waiting while another leads.

It holds no tasks. ``GET /api/v1/health`` says it stands by, at which epoch and who leads;
every other request is answered with 307 to the same path at the leader's advertised URL
(clients send it there again, with their token), or 503 while no leader URL is known. The
same guard as the dispatcher's API stands in front of it (a token on TCP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from scheduler.control.api import API_PREFIX
from scheduler.control.app import _json, _package_version, redirect_to_leader
from scheduler.control.guard import ControlGuard

__all__ = ["StandbyView", "create_standby_app"]


@dataclass(frozen=True)
class StandbyView:
    """What a standby knows of its cluster, as of its last attempt to take the lease."""

    where: str
    """The shared state (its URL masked, and the cluster)."""
    epoch: int | None = None
    leader_id: str | None = None
    leader_url: str | None = None
    message: str = "this instance stands by"


def create_standby_app(view: Callable[[], StandbyView], *, token: str | None) -> FastAPI:
    """The control API of a standby whose knowledge ``view()`` returns."""
    app = FastAPI(
        title="task-dispatcher control API (standby)",
        version=_package_version(),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    @app.get(API_PREFIX + "/health")
    async def health() -> Response:
        known = view()
        body: dict[str, Any] = {
            "status": "standby",
            "version": _package_version(),
            "running": False,
            "state_file": known.where,
            "role": "standby",
            "epoch": known.epoch,
            "leader": {"id": known.leader_id, "url": known.leader_url} if known.leader_id else None,
        }
        return _json(body)

    @app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def elsewhere(request: Request, path: str) -> Response:
        known = view()
        return redirect_to_leader(request, known.leader_url, known.message)

    app.add_middleware(ControlGuard, token=token)
    return app
