"""An operator's actions in a real Chromium against a real ``task-dispatcher run --listen``
(token-authenticated): run now, a whole account paused and resumed, a task edited with a
preview, the summary bar and the lanes ordered by attention; then the store and the history."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, ZONE, Served, require_browser, seed
from helpers import read_state, task_in_file

from scheduler.history import read_runs

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

WAIT = 15_000
TOKEN = "operator token 0123456789"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for process in started:
        process.close()


def new_page(browser: Browser, width: int = 1280) -> tuple[Page, list[str]]:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
    return page, errors


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page, errors = new_page(browser)
    yield page
    page.context.close()
    assert not errors, errors


def closed_hours() -> list[int]:
    """An hour window (in the dispatcher's zone) that opens two hours from now."""
    hour = datetime.now(ZoneInfo(ZONE)).hour
    return [(hour + 2) % 24, (hour + 4) % 24]


def shell(task_id: str, account: str, **extra: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "account_id": account,
        "task_type": "shell",
        "sys_type": "local",
        "interval": 3600,
        "valid_time_range": closed_hours(),
        "command": "true",
        **extra,
    }


def logged_in(page: Page, directory: Path, served: list[Served], path: str = "/") -> Served:
    server = Served(directory, token=TOKEN)
    served.append(server)
    page.goto(server.url + path)
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(server.url + path)
    return server


def eventually(check: Callable[[], bool], timeout: float = 20) -> None:
    """Poll ``check()`` until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("never got there")
        time.sleep(0.1)


def manual_runs(directory: Path, task_id: str) -> list[Any]:
    return [
        run
        for run in read_runs(directory, task_id=task_id)
        if run.trigger == "manual" and run.outcome != "running"
    ]


def test_run_now_from_a_row_and_from_the_task_page(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("r-1", "shop"), shell("r-2", "shop")], paused=["r-2"])
    logged_in(page, directory, served)
    planned = task_in_file(directory, "r-1")["next_execution_time"]
    opens = closed_hours()[0]
    # Why each task waits: under the row's next run.
    hours = f"outside its hours ({opens:02d}-{closed_hours()[1]:02d}) until "
    expect(page.locator("li.task[data-id=r-1] .waiting")).to_contain_text(hours)
    expect(page.locator("li.task[data-id=r-2] .waiting")).to_have_text(
        "paused: no run starts until it is resumed"
    )

    page.locator("li.task[data-id=r-1]").get_by_role("button", name="Run now").click()
    expect(page.locator("#notice")).to_contain_text("r-1: run asked for")
    eventually(lambda: len(manual_runs(directory, "r-1")) == 1)
    (run,) = manual_runs(directory, "r-1")
    assert run.outcome == "succeeded"
    record = task_in_file(directory, "r-1")
    assert (record["next_execution_time"], record["run_requested"]) == (planned, None)

    # A paused task runs too, and stays paused.
    page.locator("li.task[data-id=r-2] a").click()
    page.get_by_role("button", name="Run now").click()
    expect(page.locator("#notice")).to_contain_text("r-2: run asked for")
    eventually(lambda: len(manual_runs(directory, "r-2")) == 1)
    assert task_in_file(directory, "r-2")["status"] == "paused"
    page.reload()
    expect(page.locator("table.runs tr[data-trigger=manual]")).to_have_count(1)

    # The task page says why it waits, and follows the live feed when that changes.
    reason = page.locator(".waiting-reason")
    expect(reason).to_contain_text("Waiting: paused: no run starts until it is resumed")
    page.evaluate("window.__sameDocument = true")
    page.get_by_role("button", name="Resume").click()
    expect(reason).to_contain_text(f"Waiting: {hours}")
    assert page.evaluate("window.__sameDocument") is True


def test_pause_and_resume_a_whole_account_from_its_lane(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("a-1", "banned"), shell("a-2", "banned"), shell("b-1", "fine")])
    logged_in(page, directory, served)

    lane = page.locator("section.lane[data-account=banned]")
    lane.get_by_role("button", name="Pause account").click()
    expect(page.locator("#notice")).to_have_text("banned: 2 of 2 task(s) paused")
    expect(lane.locator("li.task[data-status=paused]")).to_have_count(2)
    statuses = {t["task_id"]: t["status"] for t in read_state(directory)["tasks"]}
    assert statuses == {"a-1": "paused", "a-2": "paused", "b-1": "pending"}

    page.reload()  # the paused account's lane now says why it needs attention
    expect(lane.locator(".attention")).to_have_text("Needs attention: 2 paused")
    lane.get_by_role("button", name="Resume account").click()
    expect(page.locator("#notice")).to_have_text("banned: 2 of 2 task(s) resumed")
    expect(lane.locator("li.task[data-status=pending]")).to_have_count(2)
    assert {t["status"] for t in read_state(directory)["tasks"]} == {"pending"}


def test_edit_a_task_with_errors_beside_the_fields_and_a_preview(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("e-1", "shop", valid_time_range=[0, 24])])
    logged_in(page, directory, served, "/tasks/e-1")

    page.get_by_label("Hours").fill("24-0")
    page.get_by_label("retries").fill("-1")
    page.get_by_role("button", name="Save").click()
    expect(page.locator('[data-error-for="valid_time_range"]')).to_contain_text("never opens")
    assert task_in_file(directory, "e-1")["valid_time_range"] == [0, 24]

    page.get_by_label("Hours").fill("8-22")
    page.get_by_role("button", name="Save").click()
    expect(page.locator('[data-error-for="run_policy.retries"]')).not_to_be_empty()
    expect(page.locator('[data-error-for="valid_time_range"]')).to_be_empty()

    page.get_by_label("retries").fill("2")
    page.get_by_label("Interval").fill("2h")
    page.get_by_label("Until").fill("2099-01-01")
    page.get_by_role("button", name="Preview next runs").click()
    expect(page.locator("#edit-preview-list li")).to_have_count(5)
    shown = page.locator("#edit-preview-list li").all_inner_texts()
    times = [datetime.fromisoformat(text) for text in shown]
    # Two hours apart, or the next day's first run when the window opens at 8 (the first run
    # may be due now, off the hour, when the page is opened inside the window).
    for before, after in itertools.pairwise(times):
        overnight = (after.hour, after.minute, after.second) == (8, 0, 0)
        assert after - before == timedelta(hours=2) or (
            overnight and timedelta(hours=10) <= after - before <= timedelta(hours=12)
        ), (before, after)
    assert all(8 <= t.hour < 22 for t in times)
    assert task_in_file(directory, "e-1")["interval"] == 3600  # a preview changes nothing

    page.get_by_role("button", name="Save").click()
    eventually(lambda: task_in_file(directory, "e-1")["interval"] == 7200)
    saved = task_in_file(directory, "e-1")
    assert saved["valid_time_range"] == [8, 22]
    assert saved["task_end_time"] == "2099-01-01"
    assert saved["run_policy"]["retries"] == 2
    expect(page.get_by_label("Interval")).to_have_value("2h")


def test_the_summary_bar_filters_and_the_lanes_put_attention_first(
    tmp_path: Path, page: Page, served: list[Served]
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(
        directory,
        [
            shell("ok-1", "a-calm"),
            shell("p-1", "b-paused"),
            shell("f-1", "c-failing", command="exit 3", valid_time_range=[0, 24]),
            shell("f-2", "c-failing"),
        ],
        paused=["p-1"],
    )
    server = logged_in(page, directory, served)
    eventually(lambda: task_in_file(directory, "f-1")["status"] == "error")
    page.reload()
    accounts = page.locator("section.lane").evaluate_all("(ls) => ls.map((l) => l.dataset.account)")
    assert accounts == ["c-failing", "b-paused", "a-calm"]
    failing = page.locator("section.lane[data-account=c-failing] .attention")
    expect(failing).to_have_text("Needs attention: 1 failing")

    page.locator("#summary a[data-count=error]").click()
    expect(page.locator("li.task:not([hidden])")).to_have_count(1)
    expect(page.locator("li.task:not([hidden])")).to_have_attribute("data-id", "f-1")
    expect(page.locator("#summary a[data-count=failing]")).to_have_text("1 failing account(s)")
    page.locator("#summary a[data-count=failing]").click()
    expect(page).to_have_url(server.url + "/?attention=failing")
    expect(page.locator("li.task:not([hidden])")).to_have_count(1)
    page.locator("#summary a[data-count=paused]").click()
    expect(page.locator("li.task:not([hidden])")).to_have_attribute("data-id", "p-1")

    page.locator("#summary a[data-sort=az]").click()
    accounts = page.locator("section.lane").evaluate_all("(ls) => ls.map((l) => l.dataset.account)")
    assert accounts == ["a-calm", "b-paused", "c-failing"]


OVERLAPS = """(labels) => {
  const boxes = labels.filter((l) => getComputedStyle(l).visibility !== "hidden")
    .map((l) => {
      const r = l.getBoundingClientRect();
      return [l.textContent, r.left, r.right, r.top, r.bottom];
    });
  const clashes = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, b] = [boxes[i], boxes[j]];
    if (a[1] < b[2] && b[1] < a[2] && a[3] < b[4] && b[3] < a[4]) clashes.push([a[0], b[0]]);
  }
  return { shown: boxes.map((b) => b[0]), clashes };
}"""


@pytest.mark.parametrize("span", ["6h", "24h", "7d"])
def test_the_timeline_axis_is_readable_on_a_phone(
    tmp_path: Path, browser: Browser, served: list[Served], span: str
) -> None:
    from playwright.sync_api import expect

    directory = tmp_path / "store"
    seed(directory, [shell("t-1", "shop", valid_time_range=[0, 24])])
    page, errors = new_page(browser, width=390)
    logged_in(page, directory, served, f"/timeline?span={span}")
    expect(page.locator(".spans a[aria-current]")).to_have_attribute("data-span", span)
    labels = page.locator(".axis span[data-rank]")
    found = labels.evaluate_all(OVERLAPS)
    assert found["clashes"] == [], found
    shown = found["shown"]
    assert any(text.startswith("now ") for text in shown), shown
    assert any(text[:3] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun") for text in shown)
    assert sum(":" in text and not text.startswith("now") for text in shown) >= 2, shown
    # Wider, more labels fit, still without a clash.
    page.set_viewport_size({"width": 1280, "height": 900})
    page.wait_for_function(
        "(n) => [...document.querySelectorAll('.axis span[data-rank]')]"
        ".filter((l) => getComputedStyle(l).visibility !== 'hidden').length > n",
        arg=len(shown),
    )
    wide = labels.evaluate_all(OVERLAPS)
    assert wide["clashes"] == [], wide
    page.context.close()
    assert not errors, errors
