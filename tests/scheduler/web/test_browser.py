"""The dashboard in a real Chromium against a real ``task-dispatcher run --listen`` process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
from browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    DOC_PICTURES,
    ZONE,
    Served,
    cli,
    require_browser,
    seed,
)
from helpers import Running, read_state, seed_file, seed_task, task_in_file
from postgres_support import Databases, postgres_databases, url_of

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog, Page

__all__ = ["postgres_databases"]  # a fixture of the cluster test

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

WAIT = 15_000
"""Milliseconds any one browser expectation may take."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for process in started:
        process.close()


def shell(task_id: str, account: str, interval: float, **extra: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "account_id": account,
        "task_type": "shell",
        "sys_type": "local",
        "interval": interval,
        "command": "true",
        **extra,
    }


def start(
    directory: Path, served: list[Served], page: Page | None = None, **options: Any
) -> Served:
    """Serve ``directory``; with ``page``, log its browser in through the printed URL."""
    served.append(Served(directory, **options))
    if page is not None and served[-1].login_url is not None:
        page.goto(served[-1].login_url)
    return served[-1]


def order(directory: Path, account: str = "shop") -> list[str]:
    ids: list[str] = read_state(directory)["account_tasks"][account]
    return ids


def expect_in_file(check: Any, timeout: float = 15) -> None:
    """Poll the state file until ``check()`` holds; bounded (the file is the contract)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the state file never got there")
        time.sleep(0.05)


def test_overview_lists_every_task_and_pausing_changes_the_file(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(
        directory, [shell("a-1", "shop-a", 3600), shell("a-2", "shop-a", 60), shell("b-1", "b", 90)]
    )
    server = start(directory, served, page)
    page.goto(server.url + "/")
    expect(page.locator("li.task")).to_have_count(3)
    expect(page.locator("section.lane[data-account=shop-a] li.task")).to_have_count(2)
    row = page.locator("li.task[data-id=a-1]")
    expect(row.locator(".status")).to_have_text("pending")
    row.get_by_role("button", name="Pause").click()
    expect(row.locator(".status")).to_have_text("paused")
    expect_in_file(lambda: task_in_file(directory, "a-1")["status"] == "paused")
    row.get_by_role("button", name="Resume").click()
    expect(row.locator(".status")).to_have_text("pending")
    expect_in_file(lambda: task_in_file(directory, "a-1")["status"] == "pending")


def test_drag_and_drop_and_keyboard_reorder_change_account_tasks(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell(f"t{i}", "shop", 3600) for i in range(4)])
    server = start(directory, served, page)
    page.goto(server.url + "/")
    rows = page.locator("section.lane[data-account=shop] li.task")
    expect(rows).to_have_count(4)
    page.locator("li.task[data-id=t3]").drag_to(
        page.locator("li.task[data-id=t0]"), target_position={"x": 40, "y": 2}
    )
    expect_in_file(
        lambda: read_state(directory)["account_tasks"]["shop"] == ["t3", "t0", "t1", "t2"]
    )
    expect(rows.first).to_have_attribute("data-id", "t3")

    page.locator("li.task[data-id=t1] .handle").focus()
    page.keyboard.press("ArrowUp")
    expect_in_file(
        lambda: read_state(directory)["account_tasks"]["shop"] == ["t3", "t1", "t0", "t2"]
    )
    expect(rows.nth(1)).to_have_attribute("data-id", "t1")
    expect(page.locator("li.task[data-id=t1] .handle")).to_be_focused()


def test_add_form_shows_a_field_error_then_adds_a_good_task(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("x", "shop", 3600)])
    server = start(directory, served, page)
    page.goto(server.url + "/add")
    page.get_by_label("Task type").fill("shell")
    page.get_by_label("Account", exact=True).fill("shop-9")
    page.get_by_label("Interval").fill("30m")
    page.get_by_label("Hours").fill("8-25")
    page.get_by_label("Command").fill("echo hi")
    page.get_by_label("Task id").fill("new-one")
    page.get_by_role("button", name="Add task").click()
    error = page.locator('[data-error-for="valid_time_range"]')
    expect(error).to_contain_text("24")
    expect(page.get_by_label("Hours")).to_have_attribute("aria-invalid", "true")
    expect(page.locator('[data-error-for="interval"]')).to_be_empty()
    assert "new-one" not in json.dumps(read_state(directory)["account_tasks"])

    page.get_by_label("Hours").fill("8-22")
    page.get_by_role("button", name="Add task").click()
    expect(page).to_have_url(server.url + "/tasks/new-one")
    saved = task_in_file(directory, "new-one")
    assert saved["interval"] == 1800
    assert saved["valid_time_range"] == [8, 22]
    assert saved["kwargs"]["command"] == "echo hi"
    assert read_state(directory)["account_tasks"]["shop-9"] == ["new-one"]


def test_a_finished_run_updates_the_page_without_reload(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("quiet", "shop", 3600), shell("tick", "other", 2, command="exit 3")])
    server = start(directory, served, page)
    page.goto(server.url + "/")
    page.evaluate("window.__sameDocument = true")
    row = page.locator("li.task[data-id=tick]")
    expect(row.locator(".outcome")).to_have_text("failed", timeout=20_000)
    expect(row.locator("[data-f=streak]")).not_to_have_text("0")
    expect(row.locator(".error")).to_contain_text("exit", ignore_case=True)
    assert page.evaluate("window.__sameDocument") is True


def test_user_strings_are_shown_as_text_never_run(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    script = "<script>window.__xss = 1</script>"
    image = "<img src=x onerror='window.__xss = 2'>"
    directory = tmp_path / "store"
    seed(directory, [shell("evil", image, 3600, note=script, account_name=script)])
    server = start(directory, served, page)
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(server.url + "/")
    expect(page.locator("section.lane h2").first).to_contain_text(image)
    page.goto(server.url + "/tasks/evil")
    expect(page.locator('dd[data-field="kwargs"]')).to_contain_text(script)
    page.goto(server.url + "/timeline")
    expect(page.locator("section.tl-account h2").first).to_have_text(image)
    assert page.evaluate("window.__xss") is None
    assert page.locator("img[src=x]").count() == 0
    assert dialogs == []


def test_token_login_sets_a_strict_httponly_cookie(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("guarded", "shop", 3600)])
    server = start(directory, served, token="correct horse battery staple")
    page.goto(server.url + "/tasks/guarded")
    expect(page).to_have_url(server.url + "/login?next=%2Ftasks%2Fguarded")
    page.get_by_label("Token").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#token-error")).to_have_text("That is not the token.")
    page.get_by_label("Token").fill("correct horse battery staple")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(server.url + "/tasks/guarded")
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert "correct horse" not in cookie["value"]
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("h1 .status")).to_have_text("paused")
    expect_in_file(lambda: task_in_file(directory, "guarded")["status"] == "paused")


def test_the_printed_login_url_logs_the_browser_in_and_logging_out_ends_the_session(
    tmp_path: Path, browser: Browser, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("mine", "shop", 3600)])
    server = start(directory, served)  # no token given: one is drawn and printed once
    assert server.login_url is not None
    token = (directory / "control.token").read_text().strip()
    assert server.login_url == f"{server.url}/login?token={token}"
    failures: list[str] = []
    page.on("response", lambda r: failures.append(r.url) if r.status >= 400 else None)

    page.goto(server.url + "/")  # a stranger's browser: the login form, not the tasks
    expect(page).to_have_url(server.url + "/login?next=%2F")
    expect(page.locator("li.task")).to_have_count(0)
    page.goto(server.login_url)
    expect(page).to_have_url(server.url + "/")  # the token left the address bar at once
    expect(page.locator("li.task[data-id=mine]")).to_have_count(1)
    (cookie,) = page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert token not in cookie["value"]
    page.get_by_role("link", name="Timeline").click()
    expect(page).to_have_url(server.url + "/timeline")
    assert token not in page.evaluate("document.referrer")
    page.goto(server.url + "/tasks/mine")
    icon = page.locator('link[rel="icon"]').get_attribute("href")
    assert icon is not None
    assert page.request.get(server.url + icon).status == 200
    assert failures == []  # no 404 for an icon (or anything else) on any page

    # Framed by another site, the dashboard does not show (a click there would steer it).
    attacker = page.context.new_page()
    attacker.set_content(f'<iframe id="f" src="{server.url}/" width="800" height="600"></iframe>')
    attacker.wait_for_load_state("load")
    frame = attacker.frame_locator("#f")
    expect(frame.locator("body")).not_to_contain_text("task-dispatcher", timeout=5_000)
    assert frame.locator("button").count() == 0
    attacker.close()

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(server.url + "/login")
    # A copy of the cookie taken before logging out is refused.
    replay = browser.new_context()
    try:
        replay.add_cookies([{"name": cookie["name"], "value": cookie["value"], "url": server.url}])
        again = replay.new_page()
        again.goto(server.url + "/")
        expect(again).to_have_url(server.url + "/login?next=%2F")
        expect(again.locator("li.task")).to_have_count(0)
    finally:
        replay.close()


def test_remove_asks_for_confirmation(tmp_path: Path, page: Page, served: list[Served]) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("keep", "shop", 3600), shell("drop", "shop", 3600)])
    server = start(directory, served, page)
    page.goto(server.url + "/tasks/drop")
    page.get_by_role("button", name="Remove…").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("dialog")).to_be_hidden()
    assert task_in_file(directory, "drop")
    page.get_by_role("button", name="Remove…").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove", exact=True).click()
    expect(page).to_have_url(server.url + "/")
    expect_in_file(lambda: read_state(directory)["account_tasks"]["shop"] == ["keep"])


def test_screenshots_at_a_thousand_tasks(tmp_path: Path, page: Page, served: list[Served]) -> None:
    from playwright.sync_api import expect

    # Windows that open later today keep the runs (and their processes) out of the test,
    # except for 20 tasks that fail at once: the page shows every status.
    hour = datetime.now(ZoneInfo(ZONE)).hour
    windows = [[(hour + a) % 24, (hour + b) % 24] for a, b in ((1, 13), (3, 9), (2, 20))]
    intervals = [600, 1800, 3600, 7200, 86400, 60]
    tasks = [
        shell(
            f"task-{i:04d}",
            f"account-{i % 40:02d}",
            intervals[i % len(intervals)],
            valid_time_range=windows[i % len(windows)],
            task_end_time=(date.today() + timedelta(days=1 + i % 3)).isoformat()
            if i % 9 == 0
            else None,
        )
        for i in range(980)
    ]
    tasks += [
        shell(f"fails-{i:02d}", f"account-{i:02d}", 3600, command="exit 4") for i in range(20)
    ]
    directory = tmp_path / "store"
    seed(directory, tasks, paused=[f"task-{i:04d}" for i in range(0, 980, 49)])
    server = start(directory, served, page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    for name, path, ready in [
        ("overview", "/", "li.task >> nth=999"),
        ("timeline", "/timeline", ".tl-line >> nth=999"),
        ("task", "/tasks/task-0009", "dd[data-field=task_id]"),
    ]:
        started = time.perf_counter()
        response = page.goto(server.url + path, wait_until="load")
        expect(page.locator(ready)).to_be_attached()
        figures[name] = {
            "load_seconds": round(time.perf_counter() - started, 3),
            "html_bytes": len(response.body()) if response else None,
        }
        if name == "overview":
            expect(page.locator("li.task[data-status=error]")).to_have_count(20, timeout=30_000)
        picture = page.screenshot(
            path=str(ARTIFACTS / f"{name}-1000.png"), full_page=name == "task"
        )
        DOC_PICTURES[name].parent.mkdir(parents=True, exist_ok=True)
        DOC_PICTURES[name].write_bytes(picture)
    page.goto(server.url + "/?account=account-07")
    expect(page.locator("li.task:visible")).to_have_count(26)
    started = time.perf_counter()
    page.locator("#filters select[name=account]").select_option("")
    expect(page.locator("#shown")).to_have_text("1000 task(s) shown")
    figures["filter_all_seconds"] = round(time.perf_counter() - started, 3)
    (ARTIFACTS / "figures-1000.json").write_text(json.dumps(figures, indent=2))
    assert figures["overview"]["load_seconds"] < 10, figures


def test_a_large_store_is_filtered_by_the_server_and_stays_live(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    # Windows that open later today keep runs out of the test: only the commands below
    # change tasks. With these limits 20 tasks make a bounded page: 5 rows per lane.
    hour = datetime.now(ZoneInfo(ZONE)).hour
    later = [(hour + 2) % 24, (hour + 3) % 24]
    tasks = [shell(f"a-{i:02d}", "acc-a", 3600, valid_time_range=later) for i in range(12)]
    tasks += [shell(f"b-{i:02d}", "acc-b", 3600, valid_time_range=later) for i in range(8)]
    directory = tmp_path / "store"
    seed(directory, tasks, paused=["a-02", "a-09", "b-05"])
    limits = {"TASK_DISPATCHER_OVERVIEW_LIMIT": "12", "TASK_DISPATCHER_LANE_LIMIT": "5"}
    server = start(directory, served, page, environ=limits)

    def shown(selector: str = "li.task") -> list[str]:
        ids = page.locator(selector).evaluate_all("rows => rows.map((li) => li.dataset.id)")
        return [str(task_id) for task_id in ids]

    page.goto(server.url + "/")
    expect(page.locator("#bounded")).to_have_text(
        "10 of 20 matching tasks shown: filter to narrow."
    )
    lane = page.locator("section.lane[data-account=acc-a]")
    expect(lane.locator("li.task")).to_have_count(5)
    expect(lane.locator(".more")).to_contain_text("7 more matching task(s) not shown")

    # A filter loads the page the server filtered: every paused task, and only those.
    page.locator("#filters select[name=status]").select_option("paused")
    expect(page).to_have_url(server.url + "/?status=paused")
    expect(page.locator("li.task:visible")).to_have_count(3)
    assert shown() == ["a-02", "a-09", "b-05"]
    page.get_by_label("Search").fill("B-0")  # typing loads once it pauses
    expect(page).to_have_url(server.url + "/?status=paused&q=B-0")
    expect(page.locator("li.task")).to_have_count(1)
    assert shown() == ["b-05"]

    # Live, on a page of acc-a's tasks matching "a-0": a shown row follows its task; a
    # matching task not shown is not added; the lane keeps the rows it has in their
    # account's order; an account not on the page gets no lane.
    page.add_init_script(
        """window.__feed = [];
        const Source = window.EventSource;
        window.EventSource = class extends Source {
          constructor(...args) {
            super(...args);
            this.addEventListener("update", (e) => window.__feed.push(JSON.parse(e.data)));
          }
        };"""
    )
    page.goto(server.url + "/?q=a-0")
    expect(lane.locator("li.task")).to_have_count(5)
    expect(page.locator("section.lane")).to_have_count(1)
    # The page shows the current order: the feed's first message does not send it again.
    page.wait_for_function("window.__feed.length > 0")
    first = page.evaluate("window.__feed[0]")
    assert "health" in first
    assert "order" not in first
    for args in (
        ("pause", "a-07"),
        ("reorder", "a-04", "0"),
        ("reorder", "a-11", "0"),
        ("reorder", "b-07", "0"),
        ("pause", "a-01"),
    ):
        assert cli(directory, *args).returncode == 0
    expect(lane.locator("li.task[data-id=a-01] .status")).to_have_text("paused")
    assert shown() == ["a-04", "a-00", "a-01", "a-02", "a-03"]
    assert page.locator("li.task[data-id=a-07]").count() == 0
    assert page.locator("section.lane[data-account=acc-b]").count() == 0
    expect(lane.locator(".count")).to_have_text("12 task(s)")


def later_window() -> list[int]:
    """Hours that open later today: no run changes a task while a test looks at it."""
    hour = datetime.now(ZoneInfo(ZONE)).hour
    return [(hour + 2) % 24, (hour + 3) % 24]


def test_the_filters_hide_the_rows_they_do_not_count(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    window = later_window()
    tasks = [
        shell(f"{account}-{i}", account, 3600, valid_time_range=window)
        for account in ("shop-a", "shop-b", "shop-c", "shop-d")
        for i in range(8)
    ]
    paused = [f"{account}-{i}" for account in ("shop-a", "shop-c") for i in (1, 3, 5, 7)]
    directory = tmp_path / "store"
    seed(directory, tasks, paused=paused)
    server = start(directory, served, page)
    page.goto(server.url + "/")
    rows = page.locator("li.task")
    expect(rows).to_have_count(32)
    expect(page.locator("li.task:visible")).to_have_count(32)

    def visible() -> list[str]:
        ids = page.locator("li.task:visible").evaluate_all(
            "rows => rows.map((li) => li.dataset.id)"
        )
        return sorted(str(task_id) for task_id in ids)

    page.locator("#filters select[name=status]").select_option("paused")
    expect(page.locator("#shown")).to_have_text("8 task(s) shown")
    expect(page.locator("li.task:visible")).to_have_count(8)
    assert visible() == sorted(paused)
    expect(page.locator("section.lane:visible")).to_have_count(2)  # shop-b and shop-d: none

    page.get_by_label("Search").fill("shop-c-")
    expect(page.locator("#shown")).to_have_text("4 task(s) shown")
    assert visible() == ["shop-c-1", "shop-c-3", "shop-c-5", "shop-c-7"]

    page.locator("#filters select[name=status]").select_option("")
    page.get_by_label("Search").fill("")
    expect(page.locator("#shown")).to_have_text("32 task(s) shown")
    expect(page.locator("li.task:visible")).to_have_count(32)


@pytest.mark.parametrize("task_id", ["账号1-运营", "q?#50% a"])
def test_ids_outside_ascii_and_url_syntax_work_on_every_page(
    tmp_path: Path, page: Page, served: list[Served], task_id: str
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("next", "账号1", 3600, valid_time_range=later_window())])
    server = start(directory, served, page)
    page.goto(server.url + "/add")
    page.get_by_label("Task type").fill("shell")
    page.get_by_label("Account", exact=True).fill("账号1")
    page.get_by_label("Interval").fill("1h")
    page.get_by_label("Hours").fill("-".join(map(str, later_window())))
    page.get_by_label("Command").fill("true")
    page.get_by_label("Task id").fill("a/b")  # refused, naming the field
    page.get_by_role("button", name="Add task").click()
    expect(page.locator('[data-error-for="task_id"]')).to_contain_text("contains '/'")
    page.get_by_label("Task id").fill(task_id)
    page.get_by_role("button", name="Add task").click()
    # The new task's page, at its percent-encoded address.
    expect(page).to_have_url(f"{server.url}/tasks/{quote(task_id, safe='')}")
    expect(page.locator("h1")).to_contain_text(task_id)
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("h1 .status")).to_have_text("paused")
    expect_in_file(lambda: task_in_file(directory, task_id)["status"] == "paused")

    # The overview's row: its actions and its link reach the task.
    page.goto(server.url + "/")
    row = page.locator(f'li.task[data-id="{task_id}"]')
    row.get_by_role("button", name="Resume").click()
    expect(row.locator(".status")).to_have_text("pending")
    expect_in_file(lambda: task_in_file(directory, task_id)["status"] == "pending")
    row.get_by_role("link", name=task_id).click()
    expect(page.locator("h1")).to_contain_text(task_id)

    page.goto(server.url + "/timeline")
    page.get_by_role("link", name=task_id).click()
    expect(page.locator("h1")).to_contain_text(task_id)
    page.get_by_role("button", name="Remove…").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove", exact=True).click()
    expect(page).to_have_url(server.url + "/")
    expect_in_file(lambda: read_state(directory)["account_tasks"]["账号1"] == ["next"])


def test_a_saved_id_with_a_slash_is_paused_opened_and_removed_from_the_dashboard(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    # Written before add refused '/': the dashboard still reaches it.
    directory = tmp_path / "store"
    directory.mkdir()
    tasks = [
        seed_task(
            task_id,
            task_type="shell",
            task_end_time=None,
            valid_time_range=later_window(),
            kwargs={
                "account_id": "shop",
                "command": "true",
                "task_id": task_id,
                "task_type": "shell",
            },
            account_id="shop",
        )
        for task_id in ("shop/eu-1", "keep")
    ]
    (directory / "dispatch_config.json").write_bytes(
        seed_file(tasks, account_tasks={"shop": ["shop/eu-1", "keep"]})
    )
    server = start(directory, served, page)
    page.goto(server.url + "/")
    row = page.locator('li.task[data-id="shop/eu-1"]')
    row.get_by_role("button", name="Pause").click()
    expect(row.locator(".status")).to_have_text("paused")
    expect_in_file(lambda: task_in_file(directory, "shop/eu-1")["status"] == "paused")
    row.get_by_role("link", name="shop/eu-1").click()
    expect(page.locator("h1")).to_contain_text("shop/eu-1")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("h1 .status")).to_have_text("pending")
    page.get_by_role("button", name="Remove…").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove", exact=True).click()
    expect(page).to_have_url(server.url + "/")
    expect_in_file(lambda: read_state(directory)["account_tasks"]["shop"] == ["keep"])


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_standby_sends_the_browser_to_the_leader_whose_header_says_it_leads(
    page: Page, tmp_path: Path, postgres_databases: Databases
) -> None:
    from playwright.sync_api import expect

    token = "cluster-browser-token"
    env = {
        "TASK_DISPATCHER_STORE": f"{url_of(postgres_databases.create())}?lease=5",
        "TASK_DISPATCHER_TOKEN": token,
    }
    ports = _free_port(), _free_port()
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    started: list[Running] = []
    try:
        for name, port, url in zip(("a", "b"), ports, urls, strict=True):
            started.append(
                Running(
                    tmp_path / name,
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--advertise-url",
                    url,
                    env=env,
                )
            )
            started[-1].wait_for_line("leading cluster" if name == "a" else "standing by:")
        started[1].wait_for_line(f"dashboard on {urls[1]}/ (it sends a browser to the leader's)")

        # The standby's dashboard: log in there, and be sent to the same page at the leader
        # (which asks for its own login: a session is one instance's).
        page.goto(f"{urls[1]}/login?token={token}&next=%2Ftimeline")
        expect(page).to_have_url(f"{urls[0]}/login?next=%2Ftimeline")

        page.goto(f"{urls[0]}/login?token={token}&next=%2Ftimeline")
        expect(page).to_have_url(f"{urls[0]}/timeline")
        cluster = page.locator("#cluster")
        expect(cluster).to_have_attribute("data-role", "leader")
        expect(cluster.locator(".role")).to_have_text("leader")
        expect(cluster.locator(".epoch")).to_have_text("epoch 1")
        expect(cluster.locator(".leader")).not_to_have_text("unknown")
        expect(cluster.locator("a")).to_have_count(0)  # it leads: no link elsewhere
        page.screenshot(path=str(ARTIFACTS / "cluster-leader.png"))
    finally:
        for process in started:
            process.close()
