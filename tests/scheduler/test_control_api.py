"""The control API in-process (httpx's ASGI transport): every endpoint, every error, the guard."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import APIRouter
from helpers import at, seed_file, seed_task, task_in_file

from scheduler import TaskDispatcher
from scheduler.control import create_app, path_segment

API = "/api/v1"
SECRET_TASK = {
    "task_type": "xhs_type",
    "sys_type": "mac_intel",
    "account_id": "acc",
    "interval": 3600,
    "valid_time_range": [8, 22],
    "user_query": "go",
    "api_token": "s3cret",
}

Connect = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def connect(
    make_dispatcher: Callable[..., TaskDispatcher],
) -> AsyncIterator[Connect]:
    """``connect(dispatcher=None, **create_app options)``: a client of an in-process app."""
    clients: list[httpx.AsyncClient] = []
    default: list[TaskDispatcher] = []

    def make(dispatcher: TaskDispatcher | None = None, **options: Any) -> httpx.AsyncClient:
        if dispatcher is None:
            if not default:
                default.append(make_dispatcher())
            dispatcher = default[0]
        headers = options.pop("headers", {})
        app = create_app(dispatcher, **options)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost", headers=headers
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def add(client: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    response = await client.post(f"{API}/tasks", json={**SECRET_TASK, **changes})
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "message", "field"}
    return body


# ---------------------------------------------------------------------- tasks


async def test_add_returns_the_saved_record_masked_with_its_location(
    connect: Connect, state_dir: Any
) -> None:
    api = connect()
    response = await api.post(f"{API}/tasks", json={**SECRET_TASK, "task_id": "t1"})
    assert response.status_code == 201
    assert response.headers["location"] == f"{API}/tasks/t1"
    record = response.json()
    assert record["task_id"] == "t1"
    assert record["valid_time_range"] == [8, 22]
    assert record["kwargs"]["api_token"] == "***"
    assert record["kwargs"]["user_query"] == "go"
    saved = (state_dir / "dispatch_config.json").read_text()
    assert '"t1"' in saved
    assert "s3cret" in saved  # masked in answers, never in the file


async def test_get_list_and_filters(connect: Connect) -> None:
    api = connect()
    await add(api, task_id="a1")
    await add(api, task_id="a2", task_type="shell_like")
    await add(api, task_id="b1", account_id="other", sys_type="linux")
    await api.post(f"{API}/tasks/a2/pause")

    one = await api.get(f"{API}/tasks/a1")
    assert one.status_code == 200
    assert one.json()["kwargs"]["api_token"] == "***"

    async def ids(**params: str) -> list[str]:
        listing = (await api.get(f"{API}/tasks", params=params)).json()
        return [task["task_id"] for task in listing["tasks"]]

    assert await ids() == ["a1", "a2", "b1"]
    assert await ids(account="other") == ["b1"]
    assert await ids(status="paused") == ["a2"]
    assert await ids(task_type="shell_like") == ["a2"]
    assert await ids(sys_type="linux") == ["b1"]
    listing = (await api.get(f"{API}/tasks", params={"account": "nobody"})).json()
    assert listing["tasks"] == []
    assert listing["total"] == 3
    assert listing["timezone"] == "Asia/Shanghai"
    assert listing["state_file"].endswith("dispatch_config.json")
    bad = error(await api.get(f"{API}/tasks", params={"status": "sleeping"}), 422)
    assert bad["field"] == "status"


async def pages(
    api: httpx.AsyncClient, limit: int, **params: str
) -> tuple[list[list[str]], list[str | None]]:
    """Every page of the listing at ``limit`` tasks a page: their ids, and each ``next``."""
    ids: list[list[str]] = []
    cursors: list[str | None] = []
    after: str | None = None
    while True:
        query = {**params, "limit": str(limit), **({"after": after} if after else {})}
        listing = (await api.get(f"{API}/tasks", params=query)).json()
        ids.append([task["task_id"] for task in listing["tasks"]])
        cursors.append(after := listing["next"])
        if after is None:
            return ids, cursors


async def test_the_listing_comes_in_pages_in_account_and_priority_order(
    connect: Connect,
) -> None:
    api = connect()
    tasks = [
        {**SECRET_TASK, "task_id": f"{account}{i}", "account_id": account}
        for account in ("b", "a", "c")
        for i in range(3)
    ]
    assert (await api.post(f"{API}/tasks/bulk", json={"tasks": tasks})).status_code == 201
    await api.post(f"{API}/tasks/a2/reorder", json={"position": 0})
    await api.post(f"{API}/tasks/b1/pause")
    whole = (await api.get(f"{API}/tasks")).json()
    assert whole["next"] is None
    listed = [task["task_id"] for task in whole["tasks"]]
    assert listed == ["a2", "a0", "a1", "b0", "b1", "b2", "c0", "c1", "c2"]

    for limit in (1, 2, 4, 9):
        ids, cursors = await pages(api, limit)
        assert [i for page in ids for i in page] == listed, limit
        assert all(len(page) == limit for page in ids[:-1]), limit
        assert ids[-1], limit  # a listing that ends on a page's edge sends no empty page
        assert cursors[-1] is None
    ids, _ = await pages(api, 2, status="pending")
    assert [i for page in ids for i in page] == [i for i in listed if i != "b1"]
    ids, _ = await pages(api, 2, account="b")
    assert ids == [["b0", "b1"], ["b2"]]

    # Between two pages: the task a page ended at moves, or goes; the next page starts
    # right after it where it is now, or after the place it had.
    first = (await api.get(f"{API}/tasks", params={"limit": "4"})).json()
    assert [t["task_id"] for t in first["tasks"]] == ["a2", "a0", "a1", "b0"]
    await api.post(f"{API}/tasks/b0/reorder", json={"position": 1})
    following = await api.get(f"{API}/tasks", params={"limit": "2", "after": first["next"]})
    assert [t["task_id"] for t in following.json()["tasks"]] == ["b2", "c0"]
    await api.delete(f"{API}/tasks/b0")
    following = await api.get(f"{API}/tasks", params={"limit": "2", "after": first["next"]})
    assert [t["task_id"] for t in following.json()["tasks"]] == ["b2", "c0"]

    for params, field in (
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"after": "not-a-cursor"}, "after"),
        ({"after": "WzEsMiwzXQ"}, "after"),  # JSON, but not a cursor: [1,2,3]
    ):
        assert error(await api.get(f"{API}/tasks", params=params), 422)["field"] == field


async def test_bulk_add_is_all_or_nothing_and_names_the_field(connect: Connect) -> None:
    api = connect()
    response = await api.post(
        f"{API}/tasks/bulk",
        json={"tasks": [{**SECRET_TASK, "task_id": "x1"}, {**SECRET_TASK, "task_id": "x2"}]},
    )
    assert response.status_code == 201
    assert response.json() == {"task_ids": ["x1", "x2"]}

    refused = await api.post(
        f"{API}/tasks/bulk",
        json={"tasks": [{**SECRET_TASK, "task_id": "y1"}, {**SECRET_TASK, "interval": -1}]},
    )
    body = error(refused, 422)
    assert body["field"] == "interval"
    assert "y1" not in [t["task_id"] for t in (await api.get(f"{API}/tasks")).json()["tasks"]]
    typed = error(
        await api.post(f"{API}/tasks/bulk", json={"tasks": [{**SECRET_TASK, "interval": "1h"}]}),
        422,
    )
    assert typed["field"] == "tasks.0.interval"
    assert error(await api.post(f"{API}/tasks/bulk", json={"tasks": []}), 422)["field"] == "tasks"


async def test_pause_resume_reorder_remove(connect: Connect) -> None:
    api = connect()
    for task_id in ("a", "b", "c"):
        await add(api, task_id=task_id)

    paused = await api.post(f"{API}/tasks/b/pause")
    assert paused.status_code == 200
    assert paused.json()["status"] == "paused"
    assert paused.json()["next_execution_time"] is None
    resumed = await api.post(f"{API}/tasks/b/resume")
    assert resumed.json()["status"] == "pending"
    assert resumed.json()["next_execution_time"] is not None

    moved = await api.post(f"{API}/tasks/c/reorder", json={"position": 0})
    assert moved.json() == {"account_id": "acc", "task_ids": ["c", "a", "b"], "queued": []}
    assert (await api.get(f"{API}/accounts/acc")).json()["task_ids"] == ["c", "a", "b"]

    removed = await api.delete(f"{API}/tasks/a")
    assert removed.status_code == 204
    assert removed.content == b""
    error(await api.get(f"{API}/tasks/a"), 404)
    assert (await api.get(f"{API}/accounts")).json() == [
        {"account_id": "acc", "task_ids": ["c", "b"], "queued": []}
    ]


async def test_patch_edits_a_task_in_place_and_names_a_bad_field(
    connect: Connect, state_dir: Any
) -> None:
    api = connect()
    await add(api, task_id="e")
    edited = await api.patch(
        f"{API}/tasks/e",
        json={"interval": 7200, "valid_time_range": [9, 21], "run_policy": {"retries": 2}},
    )
    assert edited.status_code == 200, edited.text
    body = edited.json()
    assert (body["task_id"], body["interval"], body["valid_time_range"]) == ("e", 7200, [9, 21])
    assert body["run_policy"]["retries"] == 2
    saved = task_in_file(state_dir, "e")
    assert (saved["interval"], saved["valid_time_range"]) == (7200, [9, 21])
    bad = error(await api.patch(f"{API}/tasks/e", json={"valid_time_range": [24, 0]}), 422)
    assert bad["field"] == "valid_time_range"
    assert task_in_file(state_dir, "e")["valid_time_range"] == [9, 21]
    error(await api.patch(f"{API}/tasks/nope", json={"interval": 60}), 404)
    error(await api.patch(f"{API}/tasks/e", json={"status": "paused"}), 422)


async def test_next_runs_previews_pending_and_paused_tasks(connect: Connect) -> None:
    api = connect()
    await add(api, task_id="t", interval=1800)
    preview = (await api.get(f"{API}/tasks/t/next-runs", params={"count": 3})).json()
    assert preview["if_resumed"] is False
    times = [datetime.fromisoformat(t) for t in preview["runs"]]
    assert len(times) == 3
    assert all(later > earlier for earlier, later in itertools.pairwise(times))
    assert all(8 <= t.hour < 22 for t in times)

    await api.post(f"{API}/tasks/t/pause")
    paused = (await api.get(f"{API}/tasks/t/next-runs")).json()
    assert (paused["status"], paused["if_resumed"], len(paused["runs"])) == ("paused", True, 5)
    error(await api.get(f"{API}/tasks/t/next-runs", params={"count": -1}), 422)


# ---------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    ("task_id", "account_id"),
    [
        ("账号1-运营", "账号1"),
        ("q?#50% a", "shop a/b"),  # '?', '#', '%' and spaces: percent-encoded wherever they go
        ("back\\slash", "."),
    ],
)
async def test_any_id_add_accepts_is_addressed_by_every_route(
    connect: Connect, task_id: str, account_id: str
) -> None:
    api = connect()
    await add(api, task_id="other", account_id=account_id)
    response = await api.post(
        f"{API}/tasks", json={**SECRET_TASK, "task_id": task_id, "account_id": account_id}
    )
    assert response.status_code == 201, response.text
    location = response.headers["location"]
    assert location == f"{API}/tasks/{quote(task_id, safe='')}"
    assert location.isascii()
    assert (await api.get(location)).json()["task_id"] == task_id
    path = f"{API}/tasks/{path_segment(task_id)}"
    assert (await api.post(f"{path}/pause")).json()["status"] == "paused"
    assert (await api.post(f"{path}/resume")).json()["status"] == "pending"
    assert (await api.get(f"{path}/next-runs")).json()["task_id"] == task_id
    assert (await api.get(f"{path}/runs")).json() == []
    assert (await api.patch(path, json={"interval": 7200})).json()["interval"] == 7200
    moved = (await api.post(f"{path}/reorder", json={"position": 0})).json()
    assert moved["task_ids"] == [task_id, "other"]
    account = await api.get(f"{API}/accounts/{path_segment(account_id)}")
    assert account.json()["task_ids"] == [task_id, "other"]
    preview = await api.post(f"{path}/preview", json={"interval": 3600})
    assert preview.json()["task_id"] == task_id
    assert (await api.post(f"{path}/run")).status_code == 202
    paused = await api.post(f"{API}/accounts/{path_segment(account_id)}/pause")
    assert [t["task_id"] for t in paused.json()["tasks"]] == [task_id, "other"]
    resumed = await api.post(f"{API}/accounts/{path_segment(account_id)}/resume")
    assert {t["status"] for t in resumed.json()["tasks"]} == {"pending"}
    assert (await api.delete(path)).status_code == 204
    error(await api.get(path), 404)
    assert [t["task_id"] for t in (await api.get(f"{API}/tasks")).json()["tasks"]] == ["other"]


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("a/b", "'a/b' contains '/'"),
        (".", "'.' cannot be a task id"),
        ("..", "'..' cannot be a task id"),
        ("tab\there", "unprintable character '\\t'"),
        ("trailing ", "whitespace"),
    ],
)
async def test_an_id_no_url_can_carry_is_422_naming_task_id(
    connect: Connect, task_id: str, message: str
) -> None:
    api = connect()
    for route, body in (
        ("/tasks", {**SECRET_TASK, "task_id": task_id}),
        (
            "/tasks/bulk",
            {"tasks": [{**SECRET_TASK, "task_id": "fine"}, {**SECRET_TASK, "task_id": task_id}]},
        ),
    ):
        refused = error(await api.post(API + route, json=body), 422)
        assert refused["field"] == "task_id"
        assert refused["message"].startswith("task_id: ")
        assert message in refused["message"]
        assert "\n" not in refused["message"]
    assert (await api.get(f"{API}/tasks")).json()["total"] == 0


async def test_saved_ids_add_refuses_now_are_still_addressed(
    connect: Connect, make_dispatcher: Callable[..., TaskDispatcher], state_dir: Path
) -> None:
    legacy = ["a/b", ".", ".."]
    state_dir.mkdir()
    (state_dir / "dispatch_config.json").write_bytes(
        seed_file([seed_task(task_id, task_end_time="2999-01-01") for task_id in legacy])
    )
    api = connect(make_dispatcher())
    for task_id in legacy:
        path = f"{API}/tasks/{path_segment(task_id)}"
        assert (await api.get(path)).json()["task_id"] == task_id
        assert (await api.post(f"{path}/pause")).json()["status"] == "paused"
        assert (await api.post(f"{path}/resume")).json()["status"] == "pending"
        assert (await api.get(f"{path}/next-runs")).json()["task_id"] == task_id
        assert (await api.patch(path, json={"interval": 60})).json()["interval"] == 60
    moved = (await api.post(f"{API}/tasks/%2E%2E/reorder", json={"position": 0})).json()
    assert moved["task_ids"] == ["..", "a/b", "."]
    for task_id in legacy:
        assert (await api.delete(f"{API}/tasks/{path_segment(task_id)}")).status_code == 204
    assert (await api.get(f"{API}/tasks")).json()["total"] == 0


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/tasks/nope", None),
        ("GET", "/tasks/nope/next-runs", None),
        ("POST", "/tasks/nope/pause", None),
        ("POST", "/tasks/nope/resume", None),
        ("POST", "/tasks/nope/reorder", {"position": 0}),
        ("DELETE", "/tasks/nope", None),
        ("GET", "/tasks/nope/runs", None),
    ],
)
async def test_unknown_ids_are_404_naming_the_id(
    connect: Connect, method: str, path: str, body: Any
) -> None:
    body_out = error(await connect().request(method, API + path, json=body), 404)
    assert body_out == {
        "error": "not_found",
        "message": "no task with id 'nope'",
        "field": "task_id",
    }


async def test_bad_input_is_422_naming_the_field_and_conflicts_409(connect: Connect) -> None:
    api = connect()
    await add(api, task_id="t")
    duplicate = error(await api.post(f"{API}/tasks", json={**SECRET_TASK, "task_id": "t"}), 409)
    assert duplicate == {
        "error": "conflict",
        "message": "task_id: a task with id 't' exists",
        "field": "task_id",
    }
    window = error(
        await api.post(f"{API}/tasks", json={**SECRET_TASK, "valid_time_range": [5]}), 422
    )
    assert window["field"] == "valid_time_range"
    missing = error(await api.post(f"{API}/tasks", json={"task_type": "x", "interval": 5}), 422)
    assert missing["field"] == "sys_type"
    typed = error(await api.post(f"{API}/tasks", json={**SECRET_TASK, "interval": "soon"}), 422)
    assert typed == {
        "error": "invalid",
        "message": "interval: Input should be a valid number",
        "field": "interval",
    }
    not_json = await api.post(
        f"{API}/tasks", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert error(not_json, 422)["field"]
    position = error(await api.post(f"{API}/tasks/t/reorder", json={"position": 4}), 422)
    assert position["field"] == "position"
    assert position["message"] == "position: must be from 0 to 0 for account 'acc'"
    flag = error(await api.post(f"{API}/tasks/t/reorder", json={"position": True}), 422)
    assert flag["field"] == "position"
    assert error(await api.get(f"{API}/accounts/nobody"), 404)["field"] == "account_id"
    assert error(await api.get("/nothing/here"), 404)["error"] == "not_found"
    assert error(await api.put(f"{API}/tasks/t"), 405)["error"] == "method_not_allowed"


async def test_a_stopped_dispatcher_answers_503(
    connect: Connect, make_dispatcher: Callable[..., TaskDispatcher]
) -> None:
    dispatcher = make_dispatcher()
    await dispatcher.start()
    api = connect(dispatcher)
    await add(api, task_id="t")
    await dispatcher.stop()
    for method, path in (("GET", "/tasks"), ("POST", "/tasks/t/pause"), ("GET", "/tasks/t")):
        assert error(await api.request(method, API + path), 503)["error"] == "stopped"
    health = await api.get(f"{API}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "stopped"


# ---------------------------------------------------------------------- health, history


async def test_health_reports_saves_version_uptime_backend(
    connect: Connect, started: TaskDispatcher
) -> None:
    api = connect(started)
    await add(api, task_id="t", valid_time_range=[0, 24], interval=3600)
    await started.run_pending()
    health = (await api.get(f"{API}/health")).json()
    assert health["status"] == "ok"
    assert health["running"] is True
    assert health["uptime_seconds"] > 0
    assert health["version"]
    assert health["timezone"] == "Asia/Shanghai"
    assert health["tasks"] == 1
    assert sum(health["tasks_by_status"].values()) == 1
    assert health["backend"]["name"] == "LocalRunBackend"
    assert health["save_health"]["ok"] is True
    assert health["save_health"]["last_saved_at"] is not None
    assert health["save_health"]["unsaved_task_ids"] == []
    # A file has one owner, which always leads (a shared store reports its lease).
    assert (health["role"], health["epoch"], health["leader"]) == ("leader", None, None)


async def test_run_history_by_task_account_outcome_and_pages(
    connect: Connect, make_dispatcher: Callable[..., TaskDispatcher], recorder: Any, clock: Any
) -> None:
    dispatcher = make_dispatcher()
    api = connect(dispatcher)
    await add(api, task_id="good")
    await add(api, task_id="bad", account_id="other")
    recorder.fail.add("bad")
    await dispatcher.start()
    try:
        for hour in (8, 9):
            clock.move_to(at(2026, 1, 8, hour, 0))
            await dispatcher.run_pending()

        good = (await api.get(f"{API}/tasks/good/runs")).json()
        assert [(r["task_id"], r["outcome"]) for r in good] == [("good", "succeeded")] * 2
        assert good[0]["started_at"] == "2026-01-08T09:00:00+08:00"
        failed = (await api.get(f"{API}/runs", params={"failed": "true"})).json()
        assert [(r["task_id"], r["error"]) for r in failed] == [
            ("bad", "ValueError: boom in bad")
        ] * 2
        other = (await api.get(f"{API}/runs", params={"account": "other"})).json()
        assert {r["task_id"] for r in other} == {"bad"}
        since = (await api.get(f"{API}/runs", params={"since": "2026-01-08T09:00:00+08:00"})).json()
        assert len(since) == 2
        first = (await api.get(f"{API}/runs", params={"limit": 3})).json()
        rest = (
            await api.get(f"{API}/runs", params={"limit": 3, "before_run": first[-1]["run_id"]})
        ).json()
        assert len(first) + len(rest) == 4
        assert not {r["run_id"] for r in first} & {r["run_id"] for r in rest}

        for params, field in (
            ({"limit": 0}, "limit"),
            ({"since": "2026-01-08T09:00:00"}, "since"),
            ({"before_run": "nope"}, "before_run"),
            ({"failed": "maybe"}, "failed"),
        ):
            assert error(await api.get(f"{API}/runs", params=params), 422)["field"] == field
    finally:
        await dispatcher.stop()


async def test_runs_and_metrics_answer_501_when_off(
    connect: Connect, make_dispatcher: Callable[..., TaskDispatcher], monkeypatch: Any
) -> None:
    dispatcher = make_dispatcher(history=False)
    monkeypatch.setattr(dispatcher, "_metrics", None)
    api = connect(dispatcher)
    assert error(await api.get(f"{API}/runs"), 501)["error"] == "not_available"
    assert error(await api.get("/metrics"), 501)["error"] == "not_available"


async def test_metrics_in_prometheus_text(
    connect: Connect, started: TaskDispatcher, recorder: Any
) -> None:
    api = connect(started)
    await add(api, task_id="t", valid_time_range=[0, 24])
    await started.run_pending()
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'task_dispatcher_tasks{status="pending"}' in response.text
    assert "task_dispatcher_runs_total" in response.text


async def test_changes_are_saved_off_the_event_loop(
    connect: Connect, make_dispatcher: Callable[..., TaskDispatcher], monkeypatch: Any
) -> None:
    dispatcher = make_dispatcher()
    api = connect(dispatcher)
    await add(api, task_id="t")
    threads: list[int] = []
    for name in ("pause_task", "resume_task", "reorder_task", "remove_task"):
        original = getattr(dispatcher, name)

        def spy(*args: Any, _original: Any = original) -> Any:
            threads.append(threading.get_ident())
            return _original(*args)

        monkeypatch.setattr(dispatcher, name, spy)
    await api.post(f"{API}/tasks/t/pause")
    await api.post(f"{API}/tasks/t/resume")
    await api.post(f"{API}/tasks/t/reorder", json={"position": 0})
    await api.delete(f"{API}/tasks/t")
    assert len(threads) == 4
    assert threading.get_ident() not in threads


# ---------------------------------------------------------------------- the guard


async def test_secrets_are_masked_unless_an_authorised_caller_asks(connect: Connect) -> None:
    open_api = connect()
    await add(open_api, task_id="t")
    for path in (f"{API}/tasks/t", f"{API}/tasks"):
        refused = error(await open_api.get(path, params={"show_secrets": "true"}), 403)
        assert refused["field"] == "show_secrets"
    assert (await open_api.post(f"{API}/tasks/t/pause")).json()["kwargs"]["api_token"] == "***"

    holder = connect(token="tok-123", headers={"Authorization": "Bearer tok-123"})
    shown = await holder.get(f"{API}/tasks/t", params={"show_secrets": "true"})
    assert shown.json()["kwargs"]["api_token"] == "s3cret"
    masked = await holder.get(f"{API}/tasks/t")
    assert masked.json()["kwargs"]["api_token"] == "***"
    listed = await holder.get(f"{API}/tasks", params={"show_secrets": "true"})
    assert listed.json()["tasks"][0]["kwargs"]["api_token"] == "s3cret"


@pytest.mark.parametrize("path", [f"{API}/tasks", f"{API}/health", "/openapi.json", "/metrics"])
async def test_with_a_token_every_request_needs_it(connect: Connect, path: str) -> None:
    missing = await connect(token="tok-123").get(path)
    assert error(missing, 401)["error"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = connect(token="tok-123", headers={"Authorization": "Bearer tok-124"})
    error(await wrong.get(path), 401)
    basic = connect(token="tok-123", headers={"Authorization": "Basic tok-123"})
    error(await basic.get(path), 401)
    right = connect(token="tok-123", headers={"Authorization": "Bearer tok-123"})
    assert (await right.get(path)).status_code != 401


async def _chunks(size: int) -> AsyncIterator[bytes]:
    """A body without Content-Length (sent chunked)."""
    yield b'{"tasks": ['
    yield b" " * size
    yield b"]}"


async def test_request_bodies_are_limited(connect: Connect) -> None:
    api = connect(max_body=1000)
    declared = await api.post(f"{API}/tasks/bulk", content=b"x" * 1001)
    assert error(declared, 413)["error"] == "too_large"
    streamed = await api.post(f"{API}/tasks/bulk", content=_chunks(2000))
    error(streamed, 413)
    fits = await api.post(f"{API}/tasks", json={**SECRET_TASK, "task_id": "small"})
    assert fits.status_code == 201
    default = connect()
    error(await default.post(f"{API}/tasks/bulk", content=b" " * (1024 * 1024 + 1)), 413)


async def test_cross_site_changes_are_refused(connect: Connect) -> None:
    api = connect()
    await add(api, task_id="t")
    forged = await api.post(f"{API}/tasks/t/pause", headers={"Origin": "http://evil.example"})
    assert error(forged, 403)["message"] == "cross-site request from 'http://evil.example' refused"
    assert (await api.get(f"{API}/tasks/t")).json()["status"] == "pending"
    same = await api.post(f"{API}/tasks/t/pause", headers={"Origin": "http://localhost"})
    assert same.status_code == 200
    read = await api.get(f"{API}/tasks/t", headers={"Origin": "http://evil.example"})
    assert read.status_code == 200  # reads are not state changes; CORS keeps them private


# ---------------------------------------------------------------------- the app


async def test_openapi_document_lists_every_endpoint(connect: Connect) -> None:
    document = (await connect().get("/openapi.json")).json()
    paths = document["paths"]
    assert set(paths) >= {
        f"{API}/health",
        f"{API}/tasks",
        f"{API}/tasks/bulk",
        f"{API}/tasks/{{task_id}}",
        f"{API}/tasks/{{task_id}}/next-runs",
        f"{API}/tasks/{{task_id}}/pause",
        f"{API}/tasks/{{task_id}}/resume",
        f"{API}/tasks/{{task_id}}/reorder",
        f"{API}/tasks/{{task_id}}/runs",
        f"{API}/runs",
        f"{API}/accounts",
        f"{API}/accounts/{{account_id}}",
        "/metrics",
    }
    assert "TaskRecord" in document["components"]["schemas"]
    errors = paths[f"{API}/tasks/{{task_id}}"]["get"]["responses"]
    assert errors["404"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")


async def test_extra_routers_are_served_behind_the_guard(connect: Connect) -> None:
    dashboard = APIRouter()

    @dashboard.get("/")
    async def index() -> dict[str, str]:
        return {"page": "dashboard"}

    assert (await connect(extra_routers=[dashboard]).get("/")).json() == {"page": "dashboard"}
    guarded = connect(extra_routers=[dashboard], token="tok-123")
    error(await guarded.get("/"), 401)


async def test_live_listing_shows_queued_runs(
    connect: Connect, started: TaskDispatcher, recorder: Any
) -> None:
    api = connect(started)
    recorder.gates["first"] = asyncio.Event()
    recorder.started["first"] = asyncio.Event()
    window = [0, 24]
    await add(api, task_id="first", valid_time_range=window)
    await add(api, task_id="second", valid_time_range=window)
    await asyncio.wait_for(recorder.started["first"].wait(), 10)

    async def queued() -> dict[str, Any]:
        listing: dict[str, Any] = (await api.get(f"{API}/tasks")).json()
        return listing

    for _ in range(1000):  # the second run joins the lane on the scheduler's next pass
        listing = await queued()
        if listing["queued"] == {"acc": ["second"]}:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError(f"the second run never queued: {listing}")
    statuses = {t["task_id"]: t["status"] for t in listing["tasks"]}
    assert statuses["first"] == "running"
    health = (await api.get(f"{API}/health")).json()
    assert health["backend"]["queued_runs"] == 1
    assert health["backend"]["running_runs"] == 1
    account = (await api.get(f"{API}/accounts/acc")).json()
    assert account["queued"] == ["second"]
    recorder.gates["first"].set()
    await started.run_pending()
