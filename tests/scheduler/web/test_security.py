"""The listener's guards in-process: sessions, the login URL, throttling, framing, the icon."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from scheduler import TaskDispatcher
from scheduler.control import create_app
from scheduler.control.guard import LISTENER, Throttle, forbid_framing, is_loopback_host
from scheduler.web import WebSecurity, dashboard_app
from scheduler.web.security import COOKIE_NAME

TOKEN = "s3cret-token"
FRAMING = {"content-security-policy": "frame-ancestors 'none'", "x-frame-options": "DENY"}


@pytest.fixture
async def dispatcher(make_dispatcher: Callable[..., TaskDispatcher]) -> TaskDispatcher:
    d = make_dispatcher()
    await d.add_task(
        sys_type="local", task_type="shell", account_id="shop", interval=60, task_id="t-1"
    )
    return d


def client(app: Any, host: str = "127.0.0.1:8765", ip: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")


def guarded(dispatcher: TaskDispatcher) -> Any:
    return dashboard_app(dispatcher, api=dispatcher.control_app(token=TOKEN), token=TOKEN)


def csrf_of(page: httpx.Response) -> str:
    return page.text.split('name="csrf_token" value="')[1].split('"')[0]


async def login(c: httpx.AsyncClient) -> str:
    """Log ``c`` in through the form; the session cookie's value."""
    form = await c.get("/login")
    done = await c.post("/login", data={"token": TOKEN, "csrf_token": csrf_of(form)})
    assert done.status_code == 303, done.text
    return done.cookies[COOKIE_NAME]


# ---------------------------------------------------------------------- sessions


async def test_logout_ends_the_session_and_a_copy_of_the_cookie_is_refused(
    dispatcher: TaskDispatcher,
) -> None:
    app = guarded(dispatcher)
    async with client(app) as c:
        session = await login(c)
        page = await c.get("/", headers={"accept": "text/html"})
        assert page.status_code == 200
        assert (await c.get("/api/v1/tasks")).status_code == 200
        out = await c.post("/logout", data={"csrf_token": csrf_of(page)})
        assert out.status_code == 303
    # Someone kept a copy of the cookie (a shared machine, a stolen backup): it is dead.
    async with client(app) as replay:
        replay.cookies.set(COOKIE_NAME, session)
        back = await replay.get("/", headers={"accept": "text/html"})
        assert back.status_code == 303
        assert back.headers["location"].startswith("/login")
        assert (await replay.get("/api/v1/tasks")).status_code == 401
        refused = await replay.post(
            "/api/v1/tasks/t-1/pause", headers={"origin": "http://127.0.0.1:8765"}
        )
        assert refused.status_code in (401, 403)
    assert dispatcher.get_task("t-1").status.value != "paused"


async def test_other_sessions_survive_a_logout(dispatcher: TaskDispatcher) -> None:
    app = guarded(dispatcher)
    async with client(app) as laptop, client(app) as phone:
        await login(laptop)
        await login(phone)
        page = await laptop.get("/")
        await laptop.post("/logout", data={"csrf_token": csrf_of(page)})
        assert (await phone.get("/api/v1/tasks")).status_code == 200
        assert (await laptop.get("/api/v1/tasks")).status_code == 401


def test_live_sessions_are_bounded_and_the_oldest_ends_first() -> None:
    security = WebSecurity("tok", max_sessions=3)
    sessions = [security.new_session(now=1000.0 + i) for i in range(4)]
    assert [security.valid_session(s, now=1010.0) for s in sessions] == [
        False,
        True,
        True,
        True,
    ]
    security.revoke(sessions[2])
    assert not security.valid_session(sessions[2], now=1010.0)
    assert security.valid_session(sessions[3], now=1010.0)
    security.revoke("1.forged.value")  # nothing to end: no error
    assert len(security._sessions) == 2


# ---------------------------------------------------------------------- the login URL


async def test_the_login_url_trades_the_token_for_a_cookie_and_leaves_the_address_bar(
    dispatcher: TaskDispatcher,
) -> None:
    async with client(guarded(dispatcher)) as c:
        opened = await c.get(f"/login?token={TOKEN}&next=%2Ftimeline")
        assert opened.status_code == 303
        assert opened.headers["location"] == "/timeline"  # without the token
        assert opened.headers["referrer-policy"] == "no-referrer"
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert (await c.get("/timeline")).status_code == 200
    async with client(guarded(dispatcher)) as stranger:
        wrong = await stranger.get("/login?token=guess&next=%2F")
        assert wrong.status_code == 401
        assert COOKIE_NAME not in wrong.cookies
        assert "not the token" in wrong.text
        outside = await stranger.get(f"/login?token={TOKEN}&next=//evil.example/")
        assert outside.headers["location"] == "/"


# ---------------------------------------------------------------------- throttling


def test_a_throttle_makes_a_guesser_wait_doubling_up_to_a_cap() -> None:
    now = [0.0]
    throttle = Throttle(free=2, base=1.0, cap=4.0, forget_after=60.0, clock=lambda: now[0])
    waits = []
    for _ in range(6):
        throttle.failed("10.0.0.1")
        waits.append(throttle.wait("10.0.0.1"))
        now[0] += waits[-1]  # the guesser waits exactly as told
    assert waits == [0.0, 0.0, 1.0, 2.0, 4.0, 4.0]
    assert throttle.wait("10.0.0.2") == 0.0  # per client
    assert throttle.wait(None) == 0.0  # the Unix socket is never throttled
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == "4"
    now[0] += 60.0  # quiet for a while: forgotten, the real user is not locked out
    assert throttle.wait("10.0.0.1") == 0.0
    throttle.failed("10.0.0.1")
    assert throttle.wait("10.0.0.1") == 0.0  # counting starts again
    throttle.succeeded("10.0.0.1")
    assert "10.0.0.1" not in throttle._failures


def test_a_throttle_remembers_a_bounded_number_of_clients() -> None:
    throttle = Throttle(free=0, clients=100, clock=lambda: 0.0)
    for n in range(10_000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle._failures) == 100
    assert throttle.wait("10.0.39.15") > 0  # the newest are kept
    assert throttle.wait("10.0.0.0") == 0.0


async def test_wrong_bearer_tokens_are_throttled_on_the_api_and_the_dashboard(
    dispatcher: TaskDispatcher,
) -> None:
    for app in (guarded(dispatcher), dispatcher.control_app(token=TOKEN)):
        good = {"authorization": f"Bearer {TOKEN}"}
        async with client(app, ip="10.1.1.1") as guesser, client(app, ip="10.1.1.2") as user:
            statuses = [
                (
                    await guesser.get("/api/v1/tasks", headers={"authorization": f"Bearer g{n}"})
                ).status_code
                for n in range(6)
            ]
            assert statuses == [401] * 6
            # Now even the right token is not looked at from that address for a while.
            waited = await guesser.get("/api/v1/tasks", headers=good)
            assert waited.status_code == 429
            assert int(waited.headers["retry-after"]) >= 1
            assert waited.json()["error"] == "too_many_requests"
            # Another address is not affected.
            assert (await user.get("/api/v1/tasks", headers=good)).status_code == 200


async def test_wrong_tokens_at_the_login_form_are_throttled(dispatcher: TaskDispatcher) -> None:
    async with client(guarded(dispatcher), ip="10.2.2.2") as c:
        form = await c.get("/login")
        csrf = csrf_of(form)
        for n in range(5):
            wrong = await c.post("/login", data={"token": f"g{n}", "csrf_token": csrf})
            assert wrong.status_code == 401
        sixth = await c.get("/login?token=g5")
        assert sixth.status_code == 401
        blocked = await c.post("/login", data={"token": TOKEN, "csrf_token": csrf})
        assert blocked.status_code == 429
        assert "Too many wrong tokens" in blocked.text
        assert COOKIE_NAME not in blocked.cookies
        # A signed-in browser elsewhere on that address keeps working: its cookie is no guess.
    async with client(guarded(dispatcher), ip="10.2.2.3") as other:
        await login(other)


# ---------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ([], FRAMING),
        (
            [(b"content-security-policy", b"default-src 'self'")],
            {
                "content-security-policy": "default-src 'self'; frame-ancestors 'none'",
                "x-frame-options": "DENY",
            },
        ),
        (
            [(b"content-security-policy", b"default-src 'self';")],
            {
                "content-security-policy": "default-src 'self'; frame-ancestors 'none'",
                "x-frame-options": "DENY",
            },
        ),
        (
            [
                (b"content-security-policy", b"frame-ancestors 'self'"),
                (b"x-frame-options", b"SAMEORIGIN"),
            ],
            {"content-security-policy": "frame-ancestors 'self'", "x-frame-options": "SAMEORIGIN"},
        ),
    ],
)
def test_framing_is_forbidden_merged_with_what_was_sent(
    sent: list[tuple[bytes, bytes]], expected: dict[str, str]
) -> None:
    once = forbid_framing(sent)
    assert {k.decode(): v.decode() for k, v in once} == expected
    assert forbid_framing(once) == once  # stacked guards agree


async def _with_policy(scope: Scope, receive: Receive, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-security-policy", b"default-src 'self'")],
        }
    )
    await send({"type": "http.response.body", "body": b"{}"})


async def test_every_response_forbids_framing(dispatcher: TaskDispatcher) -> None:
    async with client(guarded(dispatcher)) as anonymous:
        responses = [
            await anonymous.get("/", headers={"accept": "text/html"}),  # 303 to the login
            await anonymous.get("/login"),
            await anonymous.get("/static/dashboard.css"),
            await anonymous.get("/api/v1/tasks"),  # 401
        ]
        await login(anonymous)
        responses += [
            await anonymous.get("/"),
            await anonymous.get("/tasks/t-1"),
            await anonymous.get("/api/v1/tasks"),
            await anonymous.get("/no-such-page"),
        ]
    async with client(dispatcher.control_app(token=TOKEN)) as api:
        responses.append(await api.get("/api/v1/health"))
    for response in responses:
        assert {k: response.headers.get(k) for k in FRAMING} == FRAMING, response.url
    async with client(dashboard_app(dispatcher, api=_with_policy)) as c:
        merged = await c.get("/api/v1/anything")
        assert merged.headers["content-security-policy"] == (
            "default-src 'self'; frame-ancestors 'none'"
        )


# ---------------------------------------------------------------------- hosts and TCP


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:8765", True),
        ("127.0.0.2:8765", True),
        ("127.255.0.9", True),
        ("[::1]:8765", True),
        ("localhost:8765", True),
        ("evil.example", False),
        ("127.0.0.1.evil.example:80", False),
        ("10.0.0.1:8765", False),
        ("[::2]:80", False),
        ("", False),
    ],
)
def test_loopback_host_names(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


async def test_without_a_token_any_loopback_name_is_answered_and_tcp_is_refused(
    dispatcher: TaskDispatcher,
) -> None:
    app = dashboard_app(dispatcher)
    for host in ("127.0.0.2:8765", "[::1]:8765", "localhost:8765"):
        async with client(app, host=host) as c:
            assert (await c.get("/")).status_code == 200, host
    async with client(app, host="evil.example") as c:
        assert (await c.get("/")).status_code == 403

    async def through_tcp(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, LISTENER: "tcp"}, receive, send)

    async with client(through_tcp) as c:
        refused = await c.get("/")
        assert refused.status_code == 401
        assert "no token" in refused.json()["message"]
    tokenless_api = create_app(dispatcher)
    async with client(tokenless_api, host="evil.example") as c:
        assert (await c.get("/api/v1/tasks")).status_code == 403


# ---------------------------------------------------------------------- the icon


async def test_every_page_names_an_icon_that_is_served(dispatcher: TaskDispatcher) -> None:
    async with client(guarded(dispatcher)) as c:
        login_page = await c.get("/login")
        icon = login_page.text.split('<link rel="icon" href="')[1].split('"')[0]
        served = await c.get(icon)  # before logging in too
        assert served.status_code == 200
        assert served.headers["content-type"].startswith("image/svg+xml")
        assert served.content.startswith(b"<svg")
        legacy = await c.get("/favicon.ico")
        assert legacy.status_code == 301
        assert legacy.headers["location"] == icon
        await login(c)
        for path in ("/", "/timeline", "/add", "/tasks/t-1"):
            assert f'<link rel="icon" href="{icon}"' in (await c.get(path)).text, path
