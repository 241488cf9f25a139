"""The dashboard in a cluster: which instance leads, in the page header, and a standby's
dashboard, which sends a browser to the leader's (in-process; the store is a real PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Recorder
from postgres_support import Databases, postgres_databases, url_of

from jobstores.postgres import PostgresStorage
from scheduler import TaskDispatcher
from scheduler.control.standby import StandbyView, create_standby_app
from scheduler.web import dashboard_app
from scheduler.web.app import _environment
from scheduler.web.security import COOKIE_NAME
from scheduler.web.standby import standby_dashboard_app
from scheduler.web.views import ClusterLine, cluster_line, leader_link

__all__ = ["postgres_databases"]  # a fixture of the PostgreSQL tests

TOKEN = "cluster-test-token"
XSS = "<script>alert('x')</script>"
ESCAPED_XSS = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8765")


# ---------------------------------------------------------------------- what a line says


@pytest.mark.parametrize(
    "url",
    ["http://leader.example:8080", "https://10.0.0.2:8443/", "HTTP://leader.example/base"],
)
def test_an_http_url_is_a_link(url: str) -> None:
    assert leader_link(url) == url


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "javascript:alert(1)",
        "JavaScript:alert(1)//http://x",
        "data:text/html,<script>alert(1)</script>",
        "ftp://leader.example",
        "/relative/path",
        "//leader.example",
        "http://",
        "http:leader.example",
        " http://leader.example",
        "http://leader.example/a b",
        'http://leader.example/"onmouseover="alert(1)',
        "http://leader.example/<x>",
        "http://[::1",
        "http://leader.example:8080/?a=1",
        "http://leader.example:8080/#top",
        42,
    ],
)
def test_anything_else_is_no_link(url: object) -> None:
    assert leader_link(url) is None


def test_a_store_of_one_owner_has_no_cluster_line() -> None:
    assert cluster_line(None) is None


def test_the_leader_names_itself_without_a_link_and_a_standby_links_to_the_leader() -> None:
    leader = {"id": "a", "url": "http://a.example:8080"}
    assert cluster_line({"role": "leader", "epoch": 3, "leader": leader}) == ClusterLine(
        "leader", 3, "a", "http://a.example:8080", link=None
    )
    assert cluster_line({"role": "standby", "epoch": 3, "leader": leader}) == ClusterLine(
        "standby", 3, "a", "http://a.example:8080", link="http://a.example:8080"
    )
    unsafe = {"id": "a", "url": "javascript:alert(1)"}
    line = cluster_line({"role": "standby", "epoch": None, "leader": unsafe})
    assert line is not None
    assert line.link is None
    assert line.leader_url == "javascript:alert(1)"
    unknown = cluster_line({"role": "standby", "epoch": 2, "leader": None})
    assert unknown == ClusterLine("standby", 2, None, None, None)


def test_the_header_links_to_the_leader_only_for_a_safe_url_and_escapes_the_rest() -> None:
    template = _environment().get_template("cluster.html")
    linked = template.render(
        cluster=ClusterLine("standby", 5, XSS, "https://leader.example", "https://leader.example")
    )
    assert '<a href="https://leader.example" rel="noreferrer">' + ESCAPED_XSS + "</a>" in linked
    assert "epoch 5" in linked
    as_text = template.render(
        cluster=ClusterLine("standby", 5, "node-2", "javascript:alert('x')", None)
    )
    assert "<a " not in as_text
    assert "node-2 (javascript:alert(&#39;x&#39;))" in as_text
    unknown = template.render(cluster=ClusterLine("standby", None, None, None, None))
    assert "unknown" in unknown
    assert 'class="epoch"' not in unknown


# ---------------------------------------------------------------------- a dispatcher's pages


async def test_a_dispatcher_on_a_file_shows_no_cluster_line(
    make_dispatcher: Callable[..., TaskDispatcher],
) -> None:
    dispatcher = make_dispatcher()
    async with client(dashboard_app(dispatcher)) as c:
        page = await c.get("/")
    assert page.status_code == 200
    assert 'class="cluster"' not in page.text
    assert 'class="epoch"' not in page.text


async def test_the_leader_of_a_cluster_shows_its_role_epoch_and_id_escaped(
    recorder: Recorder, tmp_path: Path, postgres_databases: Databases
) -> None:
    store = PostgresStorage.for_url(
        url_of(postgres_databases.create()),
        holder=f"node-1 {XSS}",
        advertise_url="http://leader.example:8080",
    )
    dispatcher = TaskDispatcher(tmp_path, task_manager_factory=recorder, store=store)
    try:
        async with client(dashboard_app(dispatcher)) as c:
            pages = [await c.get(path) for path in ("/", "/timeline", "/add")]
        for page in pages:
            assert page.status_code == 200
            header = page.text.split('<span class="cluster"', 1)[1].split("</header>", 1)[0]
            assert 'data-role="leader"' in header
            assert '<span class="role">leader</span>' in header
            assert f'<span class="epoch">epoch {store.leadership.epoch}</span>' in header
            assert f"node-1 {ESCAPED_XSS}" in header
            assert XSS not in page.text
            assert "<a " not in header  # this instance leads: nowhere else to go
    finally:
        dispatcher.close()


# ---------------------------------------------------------------------- a standby's dashboard


def standby(view: StandbyView) -> Any:
    known = lambda: view  # noqa: E731
    return standby_dashboard_app(known, api=create_standby_app(known, token=TOKEN), token=TOKEN)


async def log_in(c: httpx.AsyncClient) -> None:
    done = await c.get(f"/login?token={TOKEN}")
    assert done.status_code == 303, done.text
    assert done.cookies[COOKIE_NAME]


LEADS = StandbyView("cluster default", 4, "node-1", "http://leader.example:8080")


async def test_a_standby_sends_a_logged_in_browser_to_the_same_page_at_the_leader() -> None:
    async with client(standby(LEADS)) as c:
        await log_in(c)
        for path in ("/", "/timeline?span=7d&account=shop%201", "/add", "/tasks/t-1"):
            sent = await c.get(path, headers={"Accept": "text/html"})
            assert sent.status_code == 307, (path, sent.text)
            assert sent.headers["location"] == "http://leader.example:8080" + path
        # Its API is as before: health here, everything else at the leader.
        health = await c.get("/api/v1/health")
        assert health.json()["role"] == "standby"
    async with client(standby(LEADS)) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        change = await c.post("/api/v1/tasks/t-1/pause", headers=auth)
        assert change.status_code == 307
        assert change.headers["location"] == "http://leader.example:8080/api/v1/tasks/t-1/pause"


async def test_a_standby_asks_a_browser_to_log_in_before_saying_anything() -> None:
    async with client(standby(LEADS)) as c:
        page = await c.get("/timeline", headers={"Accept": "text/html"})
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=%2Ftimeline"
        assert "leader.example" not in page.text
        api = await c.get("/", headers={"Accept": "application/json"})
        assert api.status_code == 401
        wrong = await c.get("/", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        form = await c.get("/login")
        assert form.status_code == 200
        assert 'name="token"' in form.text
        assert "leader.example" not in form.text
        with_token = await c.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert with_token.status_code == 307


async def test_a_standby_knowing_no_leader_url_says_it_stands_by() -> None:
    async with client(standby(StandbyView("cluster default"))) as c:
        await log_in(c)
        page = await c.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 503
    assert "This instance stands by" in page.text
    assert "No leader is known yet" in page.text
    assert 'data-role="standby"' in page.text


async def test_a_standby_shows_an_unsafe_leader_url_as_escaped_text_not_a_link() -> None:
    view = StandbyView("cluster default", 7, XSS, "javascript:alert('x')")
    async with client(standby(view)) as c:
        await log_in(c)
        page = await c.get("/tasks/t-1", headers={"Accept": "text/html"})
    assert page.status_code == 503  # nowhere safe to send the browser
    assert "location" not in page.headers
    assert XSS not in page.text
    assert ESCAPED_XSS in page.text
    assert "javascript:alert(&#39;x&#39;)" in page.text
    assert 'href="javascript' not in page.text.lower()
    assert '<span class="epoch">epoch 7</span>' in page.text


@pytest.mark.parametrize(
    "url", ["javascript:alert('x')", "http://leader.example/\r\nSet-Cookie: x=1", "ftp://leader"]
)
async def test_a_standby_api_sends_no_client_to_an_unsafe_leader_url(url: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client(standby(StandbyView("cluster default", 7, "node-1", url))) as c:
        change = await c.post("/api/v1/tasks/t-1/pause", headers=auth)
    assert change.status_code == 503  # nowhere safe to send it
    assert "location" not in change.headers
