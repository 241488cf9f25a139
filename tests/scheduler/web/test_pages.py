"""The dashboard in-process: pages, escaping, masking, the live feed's messages, security."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import SHANGHAI, Recorder, at, record, seed_file, seed_task
from starlette.types import Receive, Scope, Send

from scheduler import LocalRunBackend, TaskDispatcher
from scheduler.control.guard import LISTENER
from scheduler.web import WebSecurity, dashboard_app
from scheduler.web.app import LANE_LIMIT, OVERVIEW_LIMIT, PageLimits, backend_problems
from scheduler.web.feed import FeedState, diff
from scheduler.web.security import COOKIE_NAME
from scheduler.web.views import format_interval, task_row
from tasks import TaskStatus

XSS = "<script>alert('x')</script>"


async def _api(scope: Scope, receive: Receive, send: Send) -> None:
    """A stand-in for the control API: echoes the authorization it was given."""
    headers = dict(scope["headers"])
    body = httpx.Response(200, json={"authorization": headers.get(b"authorization", b"").decode()})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.content})


@pytest.fixture
async def dispatcher(
    make_dispatcher: Callable[..., TaskDispatcher],
) -> TaskDispatcher:
    d = make_dispatcher()
    await d.add_task(
        sys_type="local",
        task_type="shell",
        account_id="shop-1",
        interval=1800,
        valid_time_range=[8, 22],
        task_id="t-1",
        command="./sync.sh",
        api_token="abc123",
        note=XSS,
    )
    await d.add_task(
        sys_type="local",
        task_type="shell",
        account_id="shop-1",
        interval=60,
        task_id="t-2",
        command="date",
    )
    await d.add_task(sys_type="mac", task_type="xhs", account_id=XSS, interval=3600, task_id="t-3")
    return d


def client(app: Any, host: str = "127.0.0.1:8765") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}")


async def test_overview_lists_lanes_in_priority_order_and_escapes(
    dispatcher: TaskDispatcher,
) -> None:
    async with client(dashboard_app(dispatcher)) as c:
        page = await c.get("/")
    assert page.status_code == 200
    text = page.text
    assert text.index('data-id="t-1"') < text.index('data-id="t-2"')
    assert XSS not in text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text
    assert "The dispatcher is stopped" in text  # never started: the banner says so


async def test_task_page_masks_secrets_and_escapes_kwargs(dispatcher: TaskDispatcher) -> None:
    async with client(dashboard_app(dispatcher)) as c:
        page = await c.get("/tasks/t-1")
        missing = await c.get("/tasks/nope")
    assert page.status_code == 200
    assert "abc123" not in page.text
    assert "***" in page.text
    assert XSS not in page.text
    assert "next runs" in page.text.lower()
    assert missing.status_code == 404


async def test_timeline_and_add_pages_render(dispatcher: TaskDispatcher) -> None:
    async with client(dashboard_app(dispatcher)) as c:
        timeline = await c.get("/timeline")
        add = await c.get("/add")
    assert timeline.status_code == 200
    assert timeline.text.count('class="tl-line') == 3
    assert XSS not in timeline.text
    assert add.status_code == 200
    assert 'data-error-for="interval"' in add.text


async def test_a_foreign_host_name_is_refused_without_a_token(dispatcher: TaskDispatcher) -> None:
    async with client(dashboard_app(dispatcher), host="attacker.example") as c:
        assert (await c.get("/")).status_code == 403


async def test_cross_origin_and_tokenless_browser_changes_are_refused(
    dispatcher: TaskDispatcher,
) -> None:
    app = dashboard_app(dispatcher, api=_api)
    async with client(app) as c:
        cross = await c.post("/api/v1/tasks/t-1/pause", headers={"origin": "http://evil.example"})
        no_csrf = await c.post("/api/v1/tasks/t-1/pause", headers={"sec-fetch-site": "same-origin"})
        page = await c.get("/")
        token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
        ok = await c.post(
            "/api/v1/tasks/t-1/pause",
            headers={"origin": "http://127.0.0.1:8765", "x-csrf-token": token},
        )
        script = await c.post("/api/v1/tasks/t-1/pause")  # a non-browser client
    assert cross.status_code == 403
    assert no_csrf.status_code == 403
    assert ok.status_code == 200
    assert script.status_code == 200


async def test_token_login_sets_a_strict_httponly_cookie_that_authorises_the_api(
    dispatcher: TaskDispatcher,
) -> None:
    app = dashboard_app(
        dispatcher, api=dispatcher.control_app(token="s3cret-token"), token="s3cret-token"
    )
    async with client(app, host="10.0.0.5:8765") as c:
        redirected = await c.get("/timeline", headers={"accept": "text/html"})
        assert redirected.status_code == 303
        assert redirected.headers["location"] == "/login?next=%2Ftimeline"
        assert (await c.get("/api/v1/tasks")).status_code == 401
        assert (
            await c.get("/api/v1/tasks", headers={"authorization": "Bearer no"})
        ).status_code == 401
        form = await c.get("/login")
        csrf = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        wrong = await c.post("/login", data={"token": "nope", "csrf_token": csrf})
        assert wrong.status_code == 401
        assert "not the token" in wrong.text
        forged = await c.post("/login", data={"token": "s3cret-token", "csrf_token": "x"})
        assert forged.status_code == 403
        good = await c.post(
            "/login?next=/timeline", data={"token": "s3cret-token", "csrf_token": csrf}
        )
        assert good.status_code == 303
        assert good.headers["location"] == "/timeline"
        cookie = good.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert (await c.get("/timeline")).status_code == 200
        api = await c.get("/api/v1/tasks")
        assert api.status_code == 200
        assert {task["task_id"] for task in api.json()["tasks"]} == {"t-1", "t-2", "t-3"}
        bearer = await c.get(
            "/api/v1/tasks", headers={"authorization": "Bearer s3cret-token", "cookie": ""}
        )
        assert bearer.status_code == 200


def test_sessions_are_signed_and_expire() -> None:
    security = WebSecurity("tok")
    session = security.new_session(now=1000.0)
    assert security.valid_session(session, now=1001.0)
    assert not security.valid_session(session, now=1000.0 + 13 * 3600)
    assert not security.valid_session(
        session[:-1] + ("0" if session[-1] != "0" else "1"), now=1001.0
    )
    assert not WebSecurity("other").valid_session(session, now=1001.0)
    assert not WebSecurity(None).valid_session(session)
    assert COOKIE_NAME == "td_session"


def test_feed_sends_changed_rows_removed_ids_order_and_health() -> None:
    now = at(2026, 1, 8, 7, 0)
    a, b = record("a"), record("b")
    state = FeedState.of([a, b], {"acc": ["a", "b"]}, {"problems": []})
    same, message = diff(state, [a, b], {"acc": ["a", "b"]}, {"problems": []}, SHANGHAI, now)
    assert message is None
    ran = a.replace(
        status=TaskStatus.ERROR,
        run_count=1,
        failure_count=1,
        consecutive_failures=1,
        last_error="boom",
        updated_at=now,
    )
    _, message = diff(same, [ran], {"acc": ["a"]}, {"problems": ["x"]}, SHANGHAI, now)
    assert message is not None
    assert [row["task_id"] for row in message["changed"]] == ["a"]
    assert message["changed"][0]["outcome"] == "failed"
    assert message["changed"][0]["streak"] == 1
    assert message["removed"] == ["b"]
    assert message["order"] == {"acc": ["a"]}
    assert message["health"] == {"problems": ["x"]}


@pytest.mark.parametrize("updated", [2, 12], ids=["few changed", "many changed"])
def test_feed_compares_records_and_places_each_changed_row(updated: int) -> None:
    # A tick passes over the records it showed; a record replaced with nothing shown
    # changed sends no row; added and removed tasks in one tick are both told; each row
    # carries its task's position in its account.
    now = at(2026, 1, 8, 7, 0)
    ids = [f"t{i:02d}" for i in range(20)]
    records = [record(task_id) for task_id in ids]
    state = FeedState.of(records, {"acc": ids}, {})
    later = [
        r.replace(run_count=1, updated_at=now) if index < updated else r
        for index, r in enumerate(records)
    ]
    later[-1] = later[-1].replace(kwargs={"note": "edited, nothing shown changed"})
    later[-2] = record("new")
    order = [*ids[:-2], ids[-1], "new"]
    order.reverse()
    _, message = diff(state, later, {"acc": order}, {}, SHANGHAI, now)
    assert message is not None
    rows = {row["task_id"]: row for row in message["changed"]}
    assert sorted(rows) == sorted([*ids[:updated], "new"])
    assert message["removed"] == [ids[-2]]
    for task_id, row in rows.items():
        assert row["position"] == order.index(task_id)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2, "2s"), (90, "1m30s"), (3600, "1h"), (5400, "1h30m"), (86400, "1d"), (1.5, "1.5s")],
)
def test_format_interval(seconds: float, text: str) -> None:
    assert format_interval(seconds) == text


def test_row_of_a_never_run_task() -> None:
    row = task_row(record("a", valid_time_range=(0, 24)), SHANGHAI, 3)
    assert (row.outcome, row.hours, row.position, row.next_run) == (
        "never",
        "all day",
        3,
        "2026-01-08 08:00:00",
    )


async def test_the_unix_socket_is_trusted_like_the_api_trusts_it(
    dispatcher: TaskDispatcher,
) -> None:
    app = dashboard_app(dispatcher, api=_api, token="tok")

    async def through_socket(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, LISTENER: "unix"}, receive, send)

    async with client(through_socket, host="localhost") as c:
        assert (await c.get("/api/v1/tasks")).status_code == 200
        assert (await c.get("/")).status_code == 200


async def test_task_page_and_timeline_show_the_run_history(
    dispatcher: TaskDispatcher, recorder: Recorder
) -> None:
    recorder.fail.add("t-2")
    await dispatcher.start()
    try:
        await dispatcher.run_pending()
        async with client(dashboard_app(dispatcher)) as c:
            page = await c.get("/tasks/t-2")
            timeline = await c.get("/timeline")
    finally:
        await dispatcher.stop()
    assert 'class="outcome-failed"' in page.text
    assert "boom in t-2" in page.text
    assert 'class="past failed"' in timeline.text


class _ReportingBackend(LocalRunBackend):
    """The local backend, reporting what a fleet backend reports about its broker and workers."""

    def __init__(self, report: dict[str, Any], factory: Recorder) -> None:
        super().__init__(factory)
        self.report = report

    def health(self) -> Mapping[str, Any]:
        return self.report


async def test_the_banner_names_an_unreachable_broker_and_sys_types_without_workers(
    make_dispatcher: Callable[..., TaskDispatcher], recorder: Recorder
) -> None:
    backend = _ReportingBackend({"connected": True, "workers": {"mac": ["mac-01"]}}, recorder)
    d = make_dispatcher(run_backend=backend)
    for task_id, sys_type in (("on-mac", "mac"), ("on-win", "win")):
        await d.add_task(
            sys_type=sys_type, task_type="xhs", account_id="a", interval=3600, task_id=task_id
        )
    d.pause_task("on-win")
    assert backend_problems(d) == []  # a paused task needs no worker
    d.resume_task("on-win")
    assert backend_problems(d) == [
        "No worker is running for sys_type 'win': its runs wait in the queue."
    ]
    backend.report = {"connected": False, "broker": "redis://h:***@b/0", "unreachable_since": "x"}
    (problem,) = backend_problems(d)
    assert problem.startswith("The broker redis://h:***@b/0 is unreachable since x")
    async with client(dashboard_app(d)) as http:
        page = await http.get("/")
    assert "is unreachable since x" in page.text


# ---------------------------------------------------------------------- a bounded page

SMALL = PageLimits(overview=12, lane=5)
"""Limits small enough that the 40 tasks of :func:`large` make a bounded page."""


def _task(task_id: str, account: str, task_type: str, sys_type: str, **changes: Any) -> Any:
    return seed_task(
        task_id,
        account_id=account,
        task_type=task_type,
        sys_type=sys_type,
        kwargs={"task_id": task_id},
        **changes,
    )


@pytest.fixture
def large(make_dispatcher: Callable[..., TaskDispatcher], state_dir: Path) -> TaskDispatcher:
    """40 tasks in three accounts: acc-a (12, in reverse priority order), acc-b (3), acc-c (25)."""
    tasks = [_task(f"a-{i:02d}", "acc-a", "xhs", "mac") for i in range(12)]
    tasks += [_task(f"b-{i:02d}", "acc-b", "dy", "win") for i in range(3)]
    tasks += [_task(f"c-{i:02d}", "acc-c", "xhs", "win") for i in range(25)]
    changes = {
        "a-03": {"status": "paused"},
        "a-07": {"status": "paused"},
        "a-05": {"status": "error", "last_error": "Timeout talking to the API"},
        "b-01": {"status": "error", "last_error": "disk FULL"},
        "c-20": {"status": "error", "last_error": "boom"},
    }
    for task in tasks:
        task.update(changes.get(task["task_id"], {}))
    order = {
        account: [t["task_id"] for t in tasks if t["account_id"] == account]
        for account in ("acc-a", "acc-b", "acc-c")
    }
    order["acc-a"].reverse()
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "dispatch_config.json").write_bytes(seed_file(tasks, order))
    return make_dispatcher()


def lanes_shown(text: str) -> dict[str, list[str]]:
    """Account -> the task ids of its lane, in the page's order."""
    found: dict[str, list[str]] = {}
    for chunk in text.split('<section class="lane"')[1:]:
        account = re.search(r'data-account="([^"]*)"', chunk)
        assert account is not None
        if account.group(1):
            found[account.group(1)] = re.findall(r'<li class="task"[^>]*data-id="([^"]+)"', chunk)
    return found


def notes(text: str) -> list[str]:
    """The "not shown" notes of truncated lanes and the page's sentence, as plain text."""
    found = re.findall(r'<p class="(?:more|bounded)"[^>]*>(.*?)</p>', text, re.S)
    return [" ".join(re.sub(r"<[^>]+>", "", note).split()) for note in found]


async def test_a_large_store_shows_a_bounded_page(large: TaskDispatcher) -> None:
    async with client(dashboard_app(large, limits=SMALL)) as c:
        page = await c.get("/")
    text = page.text
    assert lanes_shown(text) == {
        "acc-a": ["a-11", "a-10", "a-09", "a-08", "a-07"],
        "acc-b": ["b-00", "b-01", "b-02"],
        "acc-c": ["c-00", "c-01", "c-02", "c-03"],
    }
    assert notes(text) == [
        "12 of 40 matching tasks shown: filter to narrow.",
        "7 more matching task(s) not shown: show only acc-a",
        "21 more matching task(s) not shown: show only acc-c",
    ]
    assert 'href="/?account=acc-a"' in text
    assert 'href="/?account=acc-c"' in text
    assert '<div id="lanes" data-bounded>' in text
    assert "data-bounded>" in text.split('id="filters"')[1].split("\n")[0]
    # A truncated lane counts its account's tasks; a whole one, its rows.
    assert re.search(r'data-account="acc-a" data-truncated>.*?12 task\(s\)', text, re.S)
    assert re.search(r'data-account="acc-b">.*?3 task\(s\)', text, re.S)


async def test_a_bounded_page_names_the_accounts_it_has_no_room_for(
    large: TaskDispatcher,
) -> None:
    async with client(dashboard_app(large, limits=PageLimits(overview=7, lane=5))) as c:
        page = await c.get("/")
    assert list(lanes_shown(page.text)) == ["acc-a", "acc-b"]
    assert notes(page.text)[0] == (
        "7 of 40 matching tasks shown, from 2 of 3 accounts: filter to narrow."
    )


PENDING_IN_A = ["a-11", "a-10", "a-09", "a-08", "a-06", "a-04", "a-02", "a-01", "a-00"]
"""acc-a's pending tasks in priority order (all of them: the page is filtered on acc-a)."""


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=paused", {"acc-a": ["a-07", "a-03"]}),
        ("status=error", {"acc-a": ["a-05"], "acc-b": ["b-01"], "acc-c": ["c-20"]}),
        ("type=dy", {"acc-b": ["b-00", "b-01", "b-02"]}),
        ("sys=win&status=error", {"acc-b": ["b-01"], "acc-c": ["c-20"]}),
        ("account=acc-b", {"acc-b": ["b-00", "b-01", "b-02"]}),
        ("account=acc-a&status=pending", {"acc-a": PENDING_IN_A}),
        ("q=A-1", {"acc-a": ["a-11", "a-10"]}),  # the task id, any case
        ("q=+timeout+", {"acc-a": ["a-05"]}),  # the last error, any case, trimmed
        ("q=full", {"acc-b": ["b-01"]}),
        ("q=boom&type=dy", {}),
        ("account=nobody", {}),
    ],
)
async def test_the_server_filters_a_bounded_page_as_the_browser_does(
    large: TaskDispatcher, query: str, expected: dict[str, list[str]]
) -> None:
    async with client(dashboard_app(large, limits=SMALL)) as c:
        page = await c.get(f"/?{query}")
    assert lanes_shown(page.text) == expected
    count = sum(map(len, expected.values()))
    assert notes(page.text) == [f"{count} of {count} matching tasks shown (40 tasks in all)."]


async def test_a_filtered_account_takes_the_whole_page_and_links_keep_the_filters(
    large: TaskDispatcher,
) -> None:
    async with client(dashboard_app(large, limits=SMALL)) as c:
        account = await c.get("/?account=acc-c")
        win = await c.get("/?sys=win")
    assert lanes_shown(account.text) == {"acc-c": [f"c-{i:02d}" for i in range(12)]}
    assert notes(account.text) == [
        "12 of 25 matching tasks shown (40 tasks in all): filter to narrow.",
        "13 more matching task(s) not shown: narrow the filters",
    ]
    assert lanes_shown(win.text) == {
        "acc-b": ["b-00", "b-01", "b-02"],
        "acc-c": ["c-00", "c-01", "c-02", "c-03", "c-04"],
    }
    assert 'href="/?account=acc-c&amp;sys=win"' in win.text


async def test_a_store_within_the_limit_is_shown_whole_and_filtered_in_the_browser(
    large: TaskDispatcher,
) -> None:
    async with client(dashboard_app(large, limits=PageLimits(overview=40, lane=5))) as c:
        page = await c.get("/?status=error")
    assert sum(map(len, lanes_shown(page.text).values())) == 40
    assert "data-bounded" not in page.text
    assert notes(page.text) == []


@pytest.mark.parametrize(("threshold", "select"), [(3, True), (2, False)])
async def test_many_accounts_make_the_account_filter_a_text_field(
    large: TaskDispatcher, threshold: int, select: bool
) -> None:
    limits = PageLimits(overview=12, lane=5, account_select=threshold)
    async with client(dashboard_app(large, limits=limits)) as c:
        page = await c.get("/?account=acc-b")
    assert ('<select name="account">' in page.text) is select
    assert ('<input type="text" name="account"' in page.text) is not select
    assert lanes_shown(page.text) == {"acc-b": ["b-00", "b-01", "b-02"]}


async def test_the_timeline_of_a_large_store_is_bounded_too(large: TaskDispatcher) -> None:
    def lines(text: str) -> list[str]:
        return re.findall(r'class="tl-line[^"]*" data-id="([^"]+)"', text)

    async with client(dashboard_app(large, limits=SMALL)) as c:
        whole = await c.get("/timeline")
        one = await c.get("/timeline?account=acc-b")
    assert lines(whole.text) == [
        *["a-11", "a-10", "a-09", "a-08", "a-07"],
        *["b-00", "b-01", "b-02"],
        *["c-00", "c-01", "c-02", "c-03"],
    ]
    assert notes(whole.text) == [
        "12 of 40 matching tasks shown: filter to narrow.",
        "7 more matching task(s) not shown: show only acc-a",
        "21 more matching task(s) not shown: show only acc-c",
    ]
    assert 'href="/timeline?account=acc-a"' in whole.text
    assert lines(one.text) == ["b-00", "b-01", "b-02"]
    assert notes(one.text) == ["3 of 3 matching tasks shown (40 tasks in all)."]


def test_page_limits_come_from_the_environment() -> None:
    assert PageLimits.from_environment({}) == PageLimits(OVERVIEW_LIMIT, LANE_LIMIT)
    assert PageLimits.from_environment(
        {"TASK_DISPATCHER_OVERVIEW_LIMIT": "30", "TASK_DISPATCHER_LANE_LIMIT": " 5 "}
    ) == PageLimits(overview=30, lane=5)
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError, match="TASK_DISPATCHER_LANE_LIMIT"):
            PageLimits.from_environment({"TASK_DISPATCHER_LANE_LIMIT": bad})


def test_feed_order_carries_only_the_accounts_whose_order_changed() -> None:
    now = at(2026, 1, 8, 7, 0)
    a1, a2, b1, c1 = (
        record("a1", account="a"),
        record("a2", account="a"),
        record("b1", account="b"),
        record("c1", account="c"),
    )
    order = {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}
    state = FeedState.of([a1, a2, b1, c1], order, {})
    state, message = diff(
        state, [a1, a2, b1, c1], {"a": ["a2", "a1"], "b": ["b1"], "c": ["c1"]}, {}, SHANGHAI, now
    )
    assert message is not None
    assert message["order"] == {"a": ["a2", "a1"]}
    _, message = diff(state, [a1, a2, b1], {"a": ["a2", "a1"], "b": ["b1"]}, {}, SHANGHAI, now)
    assert message is not None
    assert message["order"] == {"c": []}
    assert message["removed"] == ["c1"]


async def test_task_page_overview_and_feed_say_why_a_task_waits(
    started: TaskDispatcher, recorder: Recorder
) -> None:
    import asyncio
    import html

    from scheduler.control.waits import wait_context
    from scheduler.triggers import utc_now

    recorder.gates["first"] = asyncio.Event()
    recorder.started["first"] = asyncio.Event()
    for task_id in ("first", "second"):
        await started.add_task(
            sys_type="mac", task_type="xhs", account_id="shop", interval=3600, task_id=task_id
        )
    await asyncio.wait_for(recorder.started["first"].wait(), 10)
    for _ in range(1000):  # the second run joins the lane on the scheduler's next pass
        if started.queued_runs() == {"shop": ["second"]}:
            break
        await asyncio.sleep(0.01)
    run_id = started.get_task("first").active_run.run_id  # type: ignore[union-attr]
    behind = f"its due run waits for account shop's lane, behind task first's run {run_id}"
    async with client(dashboard_app(started)) as c:
        second = html.unescape((await c.get("/tasks/second")).text)
        overview = html.unescape((await c.get("/")).text)
    assert re.search(r'<p class="waiting-reason" data-kind="lane"\s*>', second), second
    assert behind in second
    rows = dict(re.findall(r'data-id="([^"]+)".*?data-f="waiting">([^<]*)<', overview, re.S))
    assert rows["second"].startswith(behind)
    assert rows["first"].startswith(f"run {run_id} executing since ")

    # The live feed's rows say it too (a new page: every row is sent).
    _, message = diff(
        FeedState(),
        started.peek_tasks(),
        started.account_tasks,
        {},
        SHANGHAI,
        utc_now(),
        wait_context(started),
    )
    assert message is not None
    fed = {row["task_id"]: row["waiting"] for row in message["changed"]}
    assert fed["second"].startswith(behind)
    recorder.gates["first"].set()
