"""The dashboard's routes: pages rendered from the dispatcher's Python API, plus a live feed.

Reads go straight to the dispatcher (``peek_tasks``, ``account_tasks``, ``runs``); every
change the pages make goes through the control plane's JSON API from the browser, so there
is one way to change a task and one set of checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from scheduler.control.api import API_PREFIX
from scheduler.control.guard import client_of
from scheduler.control.waits import wait_context
from scheduler.errors import TaskNotFoundError
from scheduler.triggers import utc_now
from scheduler.web.live import LiveFeed
from scheduler.web.security import COOKIE_NAME, SESSION_SECONDS, DashboardGuard, WebSecurity
from scheduler.web.timeline import SPANS, axis_ticks, build_timeline
from scheduler.web.views import (
    Filters,
    Lane,
    Selection,
    attention,
    cluster_line,
    edit_values,
    format_time,
    lanes,
    masked_fields,
    next_runs,
    select,
    task_row,
)
from tasks.model import TaskRecord, TaskStatus
from tasks.registry import default_registry
from tasks.waiting import why_waiting

if TYPE_CHECKING:
    from scheduler.dispatcher import Dispatcher

__all__ = [
    "ACCOUNT_SELECT_LIMIT",
    "API_PREFIX",
    "LANE_LIMIT",
    "OVERVIEW_LIMIT",
    "HealthProbe",
    "PageLimits",
    "backend_problems",
    "dashboard_app",
    "health_problems",
    "leadership_of",
    "log_in",
]

logger = logging.getLogger(__name__)

HISTORY_PAGE = 50
"""Runs per page of a task's history."""
TIMELINE_RUNS = 50_000
"""At most this many past runs are drawn on the timeline (the newest ones)."""

OVERVIEW_LIMIT = 2_000
"""Tasks one overview or timeline page shows at most. A store with no more tasks than this
is shown whole (and filtered in the browser); a larger one is filtered by the server."""
LANE_LIMIT = 50
"""Tasks one account's lane shows at most on a bounded page (unless the page is filtered on
that account, when its lane may take the whole page)."""
ACCOUNT_SELECT_LIMIT = 500
"""Above this many accounts the account filter is a text field, not a list of every one."""
OVERVIEW_LIMIT_ENV_VAR = "TASK_DISPATCHER_OVERVIEW_LIMIT"
"""Where an operator may set another :data:`OVERVIEW_LIMIT`."""
LANE_LIMIT_ENV_VAR = "TASK_DISPATCHER_LANE_LIMIT"
"""Where an operator may set another :data:`LANE_LIMIT`."""


@dataclass(frozen=True, slots=True)
class PageLimits:
    """How much one overview or timeline page holds (see :data:`OVERVIEW_LIMIT`)."""

    overview: int = OVERVIEW_LIMIT
    lane: int = LANE_LIMIT
    account_select: int = ACCOUNT_SELECT_LIMIT

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> PageLimits:
        """The defaults, or ``$TASK_DISPATCHER_OVERVIEW_LIMIT`` and
        ``$TASK_DISPATCHER_LANE_LIMIT`` when set (positive whole numbers)."""
        values: dict[str, int] = {}
        for field, name in (("overview", OVERVIEW_LIMIT_ENV_VAR), ("lane", LANE_LIMIT_ENV_VAR)):
            text = environ.get(name, "").strip()
            if not text:
                continue
            try:
                values[field] = int(text)
            except ValueError:
                values[field] = 0
            if values[field] < 1:
                raise ValueError(f"${name} must be a positive whole number, not {text!r}")
        return cls(**values)


HealthProbe = Callable[[], Sequence[str]]
"""Extra health problems to show (e.g. a fleet backend's unreachable broker)."""


def health_problems(dispatcher: Dispatcher, probe: HealthProbe | None = None) -> list[str]:
    """What an operator must know about now, one sentence each (empty when all is well)."""
    problems: list[str] = []
    if dispatcher.closed or not dispatcher.running:
        problems.append("The dispatcher is stopped: no task runs until it is started again.")
    health = dispatcher.save_health
    if not health.ok:
        zone = dispatcher.timezone
        problems.append(
            f"Saving failed {health.failed_saves} time(s), last at "
            f"{format_time(health.last_error_at, zone)}: {health.last_error}. "
            f"{len(health.unsaved_task_ids)} task(s) have changes not on disk yet; "
            f"last durable save {format_time(health.last_saved_at, zone)}. Retrying."
        )
    for probe_ in (functools.partial(backend_problems, dispatcher), probe):
        if probe_ is None:
            continue
        try:
            problems.extend(probe_())
        except Exception as exc:  # a broken probe must not take the page down
            logger.warning("dashboard health probe failed: %s", exc)
            problems.append(f"Health check failed: {exc}")
    return problems


def backend_problems(dispatcher: Dispatcher) -> list[str]:
    """What the run backend reports wrong: an unreachable broker, or a sys_type of a scheduled
    task with no live worker (for backends that report their workers)."""
    health = dispatcher.run_backend.health()
    problems = []
    if health.get("connected") is False:
        since = health.get("unreachable_since")
        problems.append(
            f"The broker {health.get('broker', '')} is unreachable"
            + (f" since {since}" if since else "")
            + ": runs cannot be sent; they are recorded as failed."
        )
    workers = health.get("workers")
    if isinstance(workers, Mapping):
        wanted = sorted(
            {r.sys_type for r in dispatcher.peek_tasks() if not r.status.settled}
            - {sys_type for sys_type, names in workers.items() if names}
        )
        problems.extend(
            f"No worker is running for sys_type {sys_type!r}: its runs wait in the queue."
            for sys_type in wanted
        )
    return problems


def leadership_of(dispatcher: Dispatcher) -> dict[str, Any] | None:
    """``role``, ``epoch`` and ``leader`` of a dispatcher on a shared store (as its health
    report gives them), or None for a store of one owner, which always leads."""
    standing = getattr(dispatcher, "standing", None)
    if standing is None:
        return None
    described: dict[str, Any] = standing.describe()
    return described


async def _runs(dispatcher: Dispatcher, *args: Any, **query: Any) -> list[Any] | None:
    """Run history entries (newest first), or None when this dispatcher keeps no history.

    The history is SQLite on the local disk: read in a thread, off the event loop.
    """
    runs = getattr(dispatcher, "runs", None)
    if runs is None:
        return None
    try:
        return list(await asyncio.to_thread(runs, *args, **query))
    except Exception as exc:  # history is an index: the page still shows without it
        logger.debug("dashboard could not read the run history: %s", exc)
        return None


def _workers(dispatcher: Dispatcher) -> dict[str, int] | None:
    """Live workers per sys_type, for a backend that reports them (None: it does not)."""
    try:
        workers = dispatcher.run_backend.health().get("workers")
    except Exception as exc:  # the page shows without them
        logger.debug("dashboard could not read the workers: %s", exc)
        return None
    if not isinstance(workers, Mapping):
        return None
    return {str(sys_type): len(names) for sys_type, names in sorted(workers.items())}


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the login and logout forms), without a multipart parser."""
    body = await request.body()
    if len(body) > 8192:
        return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("scheduler.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["count"] = "{:,}".format
    return environment


class _Pages:
    """The pages' route handlers (and login), sharing the dispatcher, the security settings
    and the templates; the live feed is :class:`~scheduler.web.live.LiveFeed`."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        security: WebSecurity,
        probe: HealthProbe | None,
        limits: PageLimits,
    ) -> None:
        self.dispatcher = dispatcher
        self.security = security
        self.probe = probe
        self.limits = limits
        self.templates = Jinja2Templates(env=_environment())
        # Names this process's order versions, which start again from 0 after a restart.
        self._epoch = secrets.token_hex(4)
        self.feed = LiveFeed(
            dispatcher, lambda: health_problems(dispatcher, probe), self._order_tag
        )
        """The live feed (``/events``), which names the account order as the pages do."""

    def _render(
        self,
        request: Request,
        name: str,
        context: dict[str, Any],
        status_code: int = 200,
        read_at: datetime | None = None,
        order_tag: str = "",
    ) -> HTMLResponse:
        """Render ``name``; ``read_at`` is when the page's data was read and ``order_tag``
        which account order it shows (both for the live feed: see
        :class:`~scheduler.web.live.LiveFeed`)."""
        session = request.cookies.get(COOKIE_NAME)
        base = {
            "csrf_token": self.security.csrf_token(
                session if self.security.valid_session(session) else None
            ),
            "api_prefix": API_PREFIX,
            "zone": str(self.dispatcher.timezone),
            "problems": health_problems(self.dispatcher, self.probe),
            "logged_in": self.security.token_required and self.security.valid_session(session),
            "path": request.url.path,
            "rendered_at": (read_at or utc_now()).isoformat(),
            "order_tag": order_tag,
            "cluster": cluster_line(leadership_of(self.dispatcher)),
        }
        response = self.templates.TemplateResponse(
            request, name, {**base, **context}, status_code=status_code
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    # ------------------------------------------------------------------ pages

    # The overview and the timeline are made in a worker thread (their records are read,
    # never copied): a look at 100,000 tasks takes tens of milliseconds, which the event loop
    # must not wait out. Up to ``limits.overview`` tasks they show every task; above, the
    # server applies the filters and shows the first matching tasks of each account.

    def _select(
        self,
        request: Request,
        records: Sequence[TaskRecord],
        order: dict[str, list[str]],
        accounts: Sequence[str] | None = None,
    ) -> tuple[Filters, Selection | None]:
        """The page's filters, and what a bounded page shows of ``records`` (None: they fit
        on one page, shown whole and filtered in the browser); lanes in the order of
        ``accounts`` (else by account id)."""
        filters = Filters.of(request.query_params)
        limits = self.limits
        if len(records) <= limits.overview:
            return filters, None
        return filters, select(
            records,
            order,
            filters,
            page_limit=limits.overview,
            lane_limit=limits.lane,
            account_order=accounts,
            now=utc_now(),
        )

    def _order_tag(self) -> str:
        """What names the account order about to be read (read the tag first)."""
        return f"{self._epoch}.{self.dispatcher.order_version}"

    async def overview(self, request: Request) -> Response:
        dispatcher = self.dispatcher
        read_at = utc_now()
        order_tag = self._order_tag()
        records = dispatcher.peek_tasks()
        order = dispatcher.account_tasks
        zone = dispatcher.timezone
        limits = self.limits

        alphabetical = request.query_params.get("sort") == "az"
        workers = _workers(dispatcher)
        context = wait_context(dispatcher, records)

        def page() -> Response:
            needs = attention(records, read_at)
            accounts = sorted(order) if alphabetical else needs.order(order)
            filters, selection = self._select(request, records, order, accounts)
            if selection is not None:
                shown = [
                    Lane(
                        account,
                        next((r.account_name for _, r in rows if r.account_name), ""),
                        [
                            task_row(record, zone, position, read_at, context)
                            for position, record in rows
                        ],
                        hidden=selection.hidden.get(account, 0),
                        total=len(order[account]),
                    )
                    for account, rows in selection.accounts.items()
                ]
            else:
                shown = lanes(records, order, zone, accounts, read_at, context)
            shown = [replace(lane, reason=needs.reason(lane.account_id)) for lane in shown]
            return self._render(
                request,
                "overview.html",
                {
                    "lanes": shown,
                    "selection": selection,
                    "filters": filters,
                    "accounts": sorted(order),
                    "account_list": len(order) <= limits.account_select,
                    "task_count": len(records),
                    "statuses": [status.value for status in TaskStatus],
                    "task_types": sorted({r.task_type for r in records}),
                    "sys_types": sorted({r.sys_type for r in records}),
                    "attention": needs,
                    "workers": workers,
                    "alphabetical": alphabetical,
                },
                read_at=read_at,
                order_tag=order_tag,
            )

        return await asyncio.to_thread(page)

    async def timeline(self, request: Request) -> Response:
        dispatcher = self.dispatcher
        now = utc_now()
        span = request.query_params.get("span", "24h")
        if span not in SPANS:
            span = "24h"
        horizon = SPANS[span]
        history = await _runs(dispatcher, since=now - horizon, limit=TIMELINE_RUNS)
        records, order, zone = (
            dispatcher.peek_tasks(),
            dispatcher.account_tasks,
            dispatcher.timezone,
        )

        def page() -> Response:
            filters, selection = self._select(request, records, order)
            if selection is not None:
                timeline = build_timeline(
                    [record for rows in selection.accounts.values() for _, record in rows],
                    {
                        account: [record.task_id for _, record in rows]
                        for account, rows in selection.accounts.items()
                    },
                    zone,
                    now,
                    history or (),
                    horizon,
                )
            else:
                timeline = build_timeline(records, order, zone, now, history or (), horizon)
            ticks = [
                (timeline.fraction(tick.at), tick)
                for tick in axis_ticks(timeline.start, timeline.stop, zone)
            ]
            return self._render(
                request,
                "timeline.html",
                {
                    "timeline": timeline,
                    "ticks": ticks,
                    "now_at": timeline.fraction(now),
                    "now_label": now.astimezone(zone).strftime("%H:%M"),
                    "span": span,
                    "spans": list(SPANS),
                    "tz": zone,
                    "has_history": history is not None,
                    "selection": selection,
                    "filters": filters,
                    "task_count": len(records),
                },
            )

        return await asyncio.to_thread(page)

    async def task(self, request: Request) -> Response:
        dispatcher = self.dispatcher
        task_id = request.path_params["task_id"]
        read_at = utc_now()
        order_tag = self._order_tag()  # the page shows no order: any current one will do
        try:
            record = dispatcher.get_task(task_id)
        except TaskNotFoundError:
            return self._render(request, "missing.html", {"task_id": task_id}, status_code=404)
        before = request.query_params.get("before") or None
        order = dispatcher.account_tasks.get(record.account_id, [])
        position = order.index(task_id) if task_id in order else 0
        label, upcoming = next_runs(record, dispatcher.timezone, utc_now())
        waiting = why_waiting(record, read_at, dispatcher.timezone, wait_context(dispatcher))
        entries = await _runs(dispatcher, task_id, limit=HISTORY_PAGE + 1, before_run=before)
        return self._render(
            request,
            "task.html",
            {
                "row": task_row(record, dispatcher.timezone, position),
                "waiting": waiting,
                "fields": masked_fields(record),
                "preview_label": label,
                "preview": [format_time(t, dispatcher.timezone) for t in upcoming],
                "edit": edit_values(record),
                "runs": [self._run_view(entry) for entry in (entries or [])[:HISTORY_PAGE]],
                "has_history": entries is not None,
                "before": before,
                "more": len(entries or []) > HISTORY_PAGE,
            },
            read_at=read_at,
            order_tag=order_tag,
        )

    def _run_view(self, entry: Any) -> dict[str, str]:
        zone = self.dispatcher.timezone
        duration = getattr(entry, "duration", None)
        outcome = getattr(entry, "outcome", "")
        if isinstance(duration, timedelta):
            duration = duration.total_seconds()
        return {
            "run_id": str(getattr(entry, "run_id", "")),
            "started": format_time(getattr(entry, "started_at", None), zone),
            "finished": format_time(getattr(entry, "finished_at", None), zone),
            "duration": "-" if duration is None else f"{float(duration):.3f} s",
            "outcome": str(getattr(outcome, "value", outcome)),
            "error": str(getattr(entry, "error", None) or ""),
            "worker": str(getattr(entry, "worker", None) or ""),
            "trigger": str(getattr(entry, "trigger", None) or ""),
        }

    async def add(self, request: Request) -> Response:
        records = self.dispatcher.peek_tasks()
        return self._render(
            request,
            "add.html",
            {
                "task_types": sorted({*default_registry.names(), *(r.task_type for r in records)}),
                "accounts": sorted(self.dispatcher.account_tasks),
            },
        )

    # ------------------------------------------------------------------ login

    async def login(self, request: Request) -> Response:
        """The login form (see :func:`log_in`)."""
        return await log_in(request, self.security, self._render)

    async def logout(self, request: Request) -> Response:
        """End the session (server-side: a copy of the cookie is refused from now on)."""
        form = await _form(request)
        session = request.cookies.get(COOKIE_NAME)
        if not self.security.valid_csrf(session, form.get("csrf_token")):
            return Response("missing or invalid CSRF token", status_code=403)
        self.security.revoke(session)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
        return response


async def log_in(
    request: Request, security: WebSecurity, render: Callable[..., Response]
) -> Response:
    """The login form; a valid token (typed in, or carried once by the login URL
    ``/login?token=...``) is traded for a session cookie and a redirect to ``next``.

    ``render(request, name, context, status_code=...)`` renders a page; the form shows no
    cluster line (who leads is for those who logged in)."""
    target = request.query_params.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):
        target = "/"

    def form_page(error: str = "", status_code: int = 200) -> Response:
        context = {"next": target, "error": error, "cluster": None}
        return render(request, "login.html", context, status_code=status_code)

    if request.method == "GET":
        if not security.token_required:
            return RedirectResponse(target, status_code=303)
        candidate = request.query_params.get("token")
        if candidate is None:
            return form_page()
    else:
        form = await _form(request)
        if not security.valid_csrf(None, form.get("csrf_token")):
            return form_page("The form expired: try again.", 403)
        candidate = form.get("token")
    client = client_of(request.scope)
    wait = security.throttle.wait(client)
    if wait > 0:
        retry_after = security.throttle.retry_after(client)
        refused = form_page(f"Too many wrong tokens: wait {retry_after} s and try again.", 429)
        refused.headers["Retry-After"] = retry_after
        return refused
    if not security.check_token(candidate, client):
        logger.warning("dashboard login refused from %s", client)
        return form_page("That is not the token.", 401)
    # The token leaves the address bar at once: the redirect's target does not carry it.
    response = RedirectResponse(target, status_code=303)
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    response.set_cookie(
        COOKIE_NAME,
        security.new_session(),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


def dashboard_app(
    dispatcher: Dispatcher,
    *,
    api: ASGIApp | None = None,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    health_probe: HealthProbe | None = None,
    limits: PageLimits | None = None,
) -> ASGIApp:
    """The dashboard at ``/``, with ``api`` (the control plane) behind it, guarded as one.

    With a token, browsers log in once (through the form, or a login URL carrying the token);
    ``token`` None serves without authentication, for a host embedding it in-process only
    (``allowed_hosts`` are the host names it answers to, any loopback one by default): a
    request through a TCP listener of ours is refused.
    ``limits`` bound what one page shows (None: :meth:`PageLimits.from_environment`).
    """
    security = WebSecurity(token, allowed_hosts=allowed_hosts)
    if limits is None:
        limits = PageLimits.from_environment()
    pages = _Pages(dispatcher, security, health_probe, limits)
    routes: list[BaseRoute] = [
        Route("/", pages.overview, name="overview"),
        Route("/timeline", pages.timeline, name="timeline"),
        Route("/tasks/{task_id:path}", pages.task, name="task"),
        Route("/add", pages.add, name="add"),
        Route("/login", pages.login, methods=["GET", "POST"], name="login"),
        Route("/logout", pages.logout, methods=["POST"], name="logout"),
        Route("/events", pages.feed.events, name="events"),
        Route("/favicon.ico", _favicon, name="favicon"),
        Mount("/static", StaticFiles(packages=[("scheduler.web", "static")]), name="static"),
    ]
    if api is not None:
        routes.append(Mount("/", api))
    # The overview of 1,000 tasks is about a megabyte of repetitive markup: 15 times less gzipped.
    app = Starlette(routes=routes, middleware=[Middleware(GZipMiddleware, minimum_size=1024)])
    return DashboardGuard(app, security, owns=_dashboard_path)


async def _favicon(request: Request) -> Response:
    # Browsers ask for /favicon.ico on pages that name no icon (the API's JSON, say).
    return RedirectResponse("/static/favicon.svg", status_code=301)


_PAGES = frozenset({"/", "/timeline", "/add", "/events", "/login", "/logout", "/favicon.ico"})
_PAGE_PREFIXES = ("/tasks/", "/static/")


def _dashboard_path(path: str) -> bool:
    """Whether ``path`` is the dashboard's (every other one is the control API's)."""
    return path in _PAGES or path.startswith(_PAGE_PREFIXES)
