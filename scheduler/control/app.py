"""The control API: a FastAPI app over one :class:`TaskDispatcher`.

Every route under ``/api/v1`` goes through the dispatcher's public methods. The synchronous
ones save durably before returning, so handlers call them in a worker thread: the event loop
(which also runs the tasks) never waits on the disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.control.api import API_PREFIX, NOT_SAVED, leader_link, path_segment
from scheduler.control.guard import MAX_BODY, ControlGuard, is_authorised
from scheduler.control.models import (
    AccountChanges,
    AccountOrder,
    BulkAdd,
    BulkAdded,
    ErrorBody,
    Health,
    NextRuns,
    Position,
    RunFilters,
    TaskChanges,
    TaskList,
    TaskSpec,
    TaskView,
)
from scheduler.control.paging import MAX_PAGE, Cursor, TaskFilter, task_page
from scheduler.control.waits import wait_context
from scheduler.errors import (
    AccountNotFoundError,
    DispatcherClosedError,
    HistoryUnavailableError,
    InvalidTaskError,
    NotLeaderError,
    SaveFailedError,
    TaskExistsError,
    TaskNotFoundError,
)
from scheduler.history import RunEntry
from scheduler.triggers import utc_now
from tasks.model import TaskRecord, TaskStatus, json_default
from tasks.waiting import WaitContext, why_waiting

if TYPE_CHECKING:
    from scheduler.dispatcher import Dispatcher

__all__ = ["API_PREFIX", "ApiError", "create_app", "zone_name"]

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (401, "A token is configured and the request did not carry it."),
        (403, "Secrets asked for by a caller not authorised to see them."),
        (404, "No task (or account) with this id."),
        (409, "A task with this id exists."),
        (413, "The request body is too large."),
        (422, "Invalid input; `field` names what is wrong."),
        (501, "Run history or metrics are off in this dispatcher."),
        (503, "The dispatcher was stopped, or stands by while no leader is known."),
        (307, "A standby: the same request goes to the leader (Location)."),
    )
}


class ApiError(Exception):
    """An error answered as :class:`ErrorBody` with ``status``."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field


def _json(data: Any, status: int = 200, **headers: str) -> Response:
    body = orjson.dumps(data, default=json_default)  # time-travel datetimes of test tools too
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, error: str, message: str, field: str | None) -> Response:
    return _json({"error": error, "message": message, "field": field}, status)


def zone_name(zone: Any) -> str:
    """An IANA key for a tzinfo when it has one, else its string form."""
    return str(getattr(zone, "key", None) or zone)


def _package_version() -> str:
    try:
        return version("task-dispatcher")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def leadership(dispatcher: Dispatcher) -> dict[str, Any]:
    """``role``, ``epoch`` and ``leader`` of the health report (a file: the one leader)."""
    standing = getattr(dispatcher, "standing", None)
    if standing is None:
        return {"role": "leader", "epoch": None, "leader": None}
    described: dict[str, Any] = standing.describe()
    return described


def redirect_to_leader(request: Request, leader_url: str | None, message: str) -> Response:
    """307 to the same path and query at the leader (the client sends the same request
    there, with its token), or 503 when no leader is known or its advertised URL is not a
    plain http(s) base URL (it is read from the database: a client is never sent to any
    other kind of place)."""
    leader_url = leader_link(leader_url)
    if leader_url is None:
        return _error(503, "not_leader", message, None)
    location = leader_url.rstrip("/") + request.url.path
    if request.url.query:
        location += "?" + request.url.query
    response = _error(307, "not_leader", message, None)
    response.headers["Location"] = location
    return response


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotLeaderError)
    async def not_leader(request: Request, exc: NotLeaderError) -> Response:
        return redirect_to_leader(request, exc.leader_url, str(exc))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.error, exc.message, exc.field)

    @app.exception_handler(AccountNotFoundError)
    async def no_account(request: Request, exc: AccountNotFoundError) -> Response:
        return _error(404, "not_found", str(exc), "account_id")

    @app.exception_handler(TaskNotFoundError)
    async def not_found(request: Request, exc: TaskNotFoundError) -> Response:
        return _error(404, "not_found", str(exc), "task_id")

    @app.exception_handler(TaskExistsError)
    async def exists(request: Request, exc: TaskExistsError) -> Response:
        return _error(409, "conflict", str(exc), exc.field)

    @app.exception_handler(InvalidTaskError)
    async def invalid(request: Request, exc: InvalidTaskError) -> Response:
        return _error(422, "invalid", str(exc), exc.field)

    @app.exception_handler(HistoryUnavailableError)
    async def no_history(request: Request, exc: HistoryUnavailableError) -> Response:
        return _error(501, "not_available", str(exc), None)

    @app.exception_handler(DispatcherClosedError)
    async def closed(request: Request, exc: DispatcherClosedError) -> Response:
        return _error(503, "stopped", str(exc), None)

    @app.exception_handler(SaveFailedError)
    async def not_saved(request: Request, exc: SaveFailedError) -> Response:
        # The change is in effect (and retried in the background) but not on disk yet: the
        # server's storage failed, which 507 Insufficient Storage says.
        return _error(NOT_SAVED, "not_saved", str(exc), None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        problem = exc.errors()[0]
        location = [str(part) for part in problem.get("loc", ())]
        # ("body", "tasks", "0", "interval") -> "tasks.0.interval"; a bare "body" stays.
        field = ".".join(location[1:]) or (location[0] if location else "body")
        return _error(422, "invalid", f"{field}: {problem.get('msg', 'invalid')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        return _error(exc.status_code, error, str(exc.detail), None)


def _secrets_allowed(request: Request, show_secrets: bool = False) -> bool:
    """``?show_secrets=true``, allowed only to an authorised caller (see the guard)."""
    if show_secrets and not is_authorised(request.scope):
        raise ApiError(
            403,
            "forbidden",
            "show_secrets: only a token holder or a caller on the Unix socket may see secrets",
            "show_secrets",
        )
    return show_secrets


ShowSecrets = Annotated[bool, Depends(_secrets_allowed)]


def create_app(
    dispatcher: Dispatcher,
    *,
    token: str | None = None,
    max_body: int = MAX_BODY,
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The control API of ``dispatcher``.

    ``token``: when set, every request not made through the Unix socket must carry
    ``Authorization: Bearer <token>``. ``max_body``: the request body limit in bytes.
    ``extra_routers`` are included after the API (e.g. a dashboard served at ``/``); they sit
    behind the same guard. The app keeps the dispatcher as ``app.state.dispatcher``.
    """
    app = FastAPI(
        title="task-dispatcher control API",
        version=_package_version(),
        description="Steer a running task-dispatcher: tasks, accounts, runs, health.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.dispatcher = dispatcher
    for router in _api_routers(dispatcher):
        app.include_router(router)
    app.include_router(_metrics_router(dispatcher))
    for router in extra_routers:
        app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(ControlGuard, token=token, max_body=max_body)
    return app


def _metrics_router(dispatcher: Dispatcher) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 501: {"model": ErrorBody}},
    )
    async def metrics() -> Response:
        source = dispatcher.metrics
        if source is None:
            raise ApiError(
                501, "not_available", "metrics need prometheus_client (the control extra)"
            )
        body, content_type = await asyncio.to_thread(source.render)
        return Response(body, media_type=content_type)

    return router


def _api_routers(dispatcher: Dispatcher) -> list[APIRouter]:
    async def dispatcher_open() -> None:
        if dispatcher.closed:
            raise DispatcherClosedError(f"the dispatcher on {str(dispatcher.directory)!r} stopped")

    router = APIRouter(
        prefix=API_PREFIX, dependencies=[Depends(dispatcher_open)], responses=_ERRORS
    )
    # Health answers even once the dispatcher stopped: that is what a monitor asks about.
    health_router = APIRouter(prefix=API_PREFIX, responses=_ERRORS)

    def view(record: TaskRecord, show_secrets: bool) -> dict[str, Any]:
        return record.to_json_dict(masked=not show_secrets)

    def task_view(record: TaskRecord, show_secrets: bool, context: WaitContext) -> dict[str, Any]:
        """The record and why it waits (``TaskView``)."""
        data = view(record, show_secrets)
        waiting = why_waiting(record, utc_now(), dispatcher.timezone, context)
        data["waiting"] = None if waiting is None else waiting.to_json()
        return data

    def account_order(account_id: str, ids: list[str], queued: dict[str, list[str]]) -> Any:
        return {"account_id": account_id, "task_ids": ids, "queued": queued.get(account_id, [])}

    @health_router.get(
        "/health",
        response_model=Health,
        summary="The dispatcher's health (503 with the same body once stopped)",
    )
    async def health() -> Response:
        records = [] if dispatcher.closed else await asyncio.to_thread(dispatcher.peek_tasks)
        saves = dispatcher.save_health
        running = dispatcher.running
        queued = dispatcher.queued_runs() if running else {}
        by_status = Counter(record.status.value for record in records)
        status = "stopped" if not running else ("ok" if saves.ok else "degraded")
        body = {
            "status": status,
            "version": _package_version(),
            "running": running,
            "uptime_seconds": dispatcher.uptime,
            "directory": str(dispatcher.directory),
            "state_file": str(dispatcher.state_file),
            "timezone": zone_name(dispatcher.timezone),
            "tasks": len(records),
            "tasks_by_status": {s.value: by_status.get(s.value, 0) for s in TaskStatus},
            "backend": {
                "name": type(dispatcher.run_backend).__name__,
                "health": dict(dispatcher.run_backend.health()),
                "running_runs": by_status.get(TaskStatus.RUNNING.value, 0),
                "queued_runs": sum(len(ids) for ids in queued.values()),
            },
            "save_health": {
                "ok": saves.ok,
                "last_saved_at": saves.last_saved_at,
                "last_error": saves.last_error,
                "last_error_at": saves.last_error_at,
                "failed_saves": saves.failed_saves,
                "unsaved_task_ids": list(saves.unsaved_task_ids),
            },
            **leadership(dispatcher),
        }
        return _json(body, 200 if running else 503)

    @router.get(
        "/tasks", response_model=TaskList, summary="Tasks, filtered, in pages, and why they wait"
    )
    async def list_tasks(
        show_secrets: ShowSecrets,
        account: str | None = None,
        status: TaskStatus | None = None,
        task_type: str | None = None,
        sys_type: str | None = None,
        limit: Annotated[
            int | None,
            Query(ge=1, le=MAX_PAGE, description="At most this many tasks (default: all)"),
        ] = None,
        after: Annotated[
            str | None, Query(description="The next page: the previous answer's `next`.")
        ] = None,
    ) -> Response:
        cursor = None if after is None else Cursor.decode(after)
        chosen = TaskFilter(account, status, task_type, sys_type)
        context = wait_context(dispatcher)  # on the loop, as the lanes are

        def select() -> tuple[list[dict[str, Any]], int, str | None]:
            records = dispatcher.peek_tasks()
            page, last = task_page(
                records, dispatcher.account_tasks, chosen, limit=limit, after=cursor
            )
            following = None if last is None else last.encode()
            return [task_view(r, show_secrets, context) for r in page], len(records), following

        tasks, total, following = await asyncio.to_thread(select)
        queued = dispatcher.queued_runs() if dispatcher.running else {}
        if account is not None:
            queued = {account: queued[account]} if account in queued else {}
        return _json(
            {
                "tasks": tasks,
                "total": total,
                "next": following,
                "queued": queued,
                "timezone": zone_name(dispatcher.timezone),
                "state_file": str(dispatcher.state_file),
            }
        )

    @router.post("/tasks", status_code=201, response_model=TaskRecord, summary="Add a task (saved)")
    async def add_task(spec: TaskSpec, show_secrets: ShowSecrets) -> Response:
        (task_id,) = await dispatcher.add_tasks([spec.keywords()])
        record = dispatcher.get_task(task_id)
        location = f"{API_PREFIX}/tasks/{path_segment(task_id)}"
        return _json(view(record, show_secrets), 201, Location=location)

    @router.post(
        "/tasks/bulk",
        status_code=201,
        response_model=BulkAdded,
        summary="Add many tasks with one save, all or none",
    )
    async def add_tasks(body: BulkAdd) -> Response:
        task_ids = await dispatcher.add_tasks([spec.keywords() for spec in body.tasks])
        return _json({"task_ids": task_ids}, 201)

    @router.get(
        "/tasks/{task_id:path}/next-runs", response_model=NextRuns, summary="The next planned runs"
    )
    async def next_runs(task_id: str, count: Annotated[int, Query(ge=0, le=1000)] = 5) -> Response:
        preview = dispatcher.next_runs(task_id, count)
        return _json(
            {
                "task_id": preview.task_id,
                "status": preview.status,
                "if_resumed": preview.if_resumed,
                "runs": list(preview.runs),
            }
        )

    @router.post("/tasks/{task_id:path}/pause", response_model=TaskRecord, summary="Pause (saved)")
    async def pause(task_id: str, show_secrets: ShowSecrets) -> Response:
        await asyncio.to_thread(dispatcher.pause_task, task_id)
        return _json(view(dispatcher.get_task(task_id), show_secrets))

    @router.post(
        "/tasks/{task_id:path}/resume", response_model=TaskRecord, summary="Resume (saved)"
    )
    async def resume(task_id: str, show_secrets: ShowSecrets) -> Response:
        await asyncio.to_thread(dispatcher.resume_task, task_id)
        return _json(view(dispatcher.get_task(task_id), show_secrets))

    @router.post(
        "/tasks/{task_id:path}/run",
        status_code=202,
        response_model=TaskRecord,
        summary="Run once now, whatever the window or status (the request is saved)",
    )
    async def run_now(task_id: str, show_secrets: ShowSecrets) -> Response:
        record = await asyncio.to_thread(dispatcher.run_now, task_id)
        return _json(view(record, show_secrets), 202)

    @router.post(
        "/tasks/{task_id:path}/preview",
        response_model=NextRuns,
        summary="The next runs an edit would plan (changes nothing)",
    )
    async def preview(
        task_id: str, body: TaskChanges, count: Annotated[int, Query(ge=0, le=1000)] = 5
    ) -> Response:
        changes = body.model_dump(exclude_unset=True)
        if "kwargs" in changes:
            raise ApiError(422, "invalid", "kwargs: do not change the planned runs", "kwargs")
        preview = await asyncio.to_thread(
            functools.partial(dispatcher.preview_update, task_id, count, **changes)
        )
        return _json(
            {
                "task_id": preview.task_id,
                "status": preview.status,
                "if_resumed": preview.if_resumed,
                "runs": list(preview.runs),
            }
        )

    @router.patch("/tasks/{task_id:path}", response_model=TaskRecord, summary="Edit a task (saved)")
    async def update(task_id: str, body: TaskChanges, show_secrets: ShowSecrets) -> Response:
        changes = body.model_dump(exclude_unset=True)
        record = await asyncio.to_thread(
            functools.partial(dispatcher.update_task, task_id, **changes)
        )
        return _json(view(record, show_secrets))

    @router.post(
        "/tasks/{task_id:path}/reorder",
        response_model=AccountOrder,
        summary="Move a task in its account's priority order (saved)",
    )
    async def reorder(task_id: str, body: Position) -> Response:
        await asyncio.to_thread(dispatcher.reorder_task, task_id, body.position)
        account = dispatcher.get_task(task_id).account_id
        queued = dispatcher.queued_runs() if dispatcher.running else {}
        return _json(account_order(account, dispatcher.account_tasks.get(account, []), queued))

    @router.delete("/tasks/{task_id:path}", status_code=204, summary="Remove a task (saved)")
    async def remove(task_id: str) -> Response:
        await asyncio.to_thread(dispatcher.remove_task, task_id)
        return Response(status_code=204)

    async def query_runs(task_id: str | None, filters: RunFilters) -> Response:
        try:
            entries = await asyncio.to_thread(
                dispatcher.runs,
                task_id,
                account_id=filters.account,
                failed=filters.failed,
                since=filters.since,
                until=filters.until,
                limit=filters.limit,
                before_run=filters.before_run,
            )
        except ValueError as exc:
            field, _, _ = str(exc).partition(":")
            raise ApiError(422, "invalid", str(exc), field) from None
        return _json([entry.to_json() for entry in entries])

    @router.get(
        "/tasks/{task_id:path}/runs",
        response_model=list[RunEntry],
        summary="A task's recorded runs, newest first",
    )
    async def task_runs(task_id: str, filters: Annotated[RunFilters, Query()]) -> Response:
        dispatcher.get_task(task_id)  # 404 for an unknown id
        return await query_runs(task_id, filters)

    # Declared after the routes that end in a word of their own (/next-runs, /runs), which
    # would otherwise be read as part of the id.
    @router.get(
        "/tasks/{task_id:path}", response_model=TaskView, summary="One task, and why it waits"
    )
    async def get_task(task_id: str, show_secrets: ShowSecrets) -> Response:
        record = dispatcher.get_task(task_id)
        context = wait_context(dispatcher)
        return _json(await asyncio.to_thread(task_view, record, show_secrets, context))

    @router.get(
        "/runs",
        response_model=list[RunEntry],
        summary="Recorded runs, newest first (page with before_run)",
    )
    async def all_runs(
        filters: Annotated[RunFilters, Query()], task_id: str | None = None
    ) -> Response:
        return await query_runs(task_id, filters)

    @router.get(
        "/accounts",
        response_model=list[AccountOrder],
        summary="Accounts and their tasks in priority order",
    )
    async def accounts() -> Response:
        queued = dispatcher.queued_runs() if dispatcher.running else {}
        return _json(
            [account_order(a, ids, queued) for a, ids in sorted(dispatcher.account_tasks.items())]
        )

    async def account_change(account_id: str, change: Any) -> Response:
        report = await asyncio.to_thread(change, account_id)
        return _json(
            {
                "account_id": account_id,
                "tasks": [
                    {"task_id": c.task_id, "status": c.status.value, "changed": c.changed}
                    for c in report
                ],
            }
        )

    @router.post(
        "/accounts/{account_id:path}/pause",
        response_model=AccountChanges,
        summary="Pause every task of an account (one commit, saved)",
    )
    async def pause_account(account_id: str) -> Response:
        return await account_change(account_id, dispatcher.pause_account)

    @router.post(
        "/accounts/{account_id:path}/resume",
        response_model=AccountChanges,
        summary="Resume every paused task of an account (one commit, saved)",
    )
    async def resume_account(account_id: str) -> Response:
        return await account_change(account_id, dispatcher.resume_account)

    @router.get("/accounts/{account_id:path}", response_model=AccountOrder, summary="One account")
    async def account(account_id: str) -> Response:
        ids = dispatcher.account_tasks.get(account_id)
        if not ids:
            raise ApiError(404, "not_found", f"no account with id {account_id!r}", "account_id")
        queued = dispatcher.queued_runs() if dispatcher.running else {}
        return _json(account_order(account_id, ids, queued))

    return [health_router, router]
