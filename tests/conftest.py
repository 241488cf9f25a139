"""Shared fixtures: a recording task manager factory, dispatcher directories, a frozen clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from helpers import SHANGHAI, Recorder, Running

from scheduler import TaskDispatcher

TESTS = Path(__file__).parent

OUT_OF_PROCESS_FILES = frozenset(
    {
        "reliability/test_crash.py",  # kills child processes in a loop
        "reliability/test_soak.py",
        "scheduler/test_cli_process.py",  # the CLI and the service as processes
        "scheduler/test_control_process.py",
        "scheduler/web/test_browser.py",  # a real Chromium
        "test_docs.py",  # runs every example of the docs as a script, builds the site
        "test_quality.py",  # ruff and mypy over the whole tree
    }
)
"""Test files (relative to ``tests/``) whose tests start processes, servers or a browser."""
OUT_OF_PROCESS_DIRS = ("fleet/",)
"""Test folders of the same kind: the fleet runs a real Redis and real worker processes."""
REAL_SERVER_FIXTURES = frozenset(
    {
        "redis_address",
        "own_redis",
        "broker_url",
        "start_worker",
        "open_backend",
        "postgres_databases",
    }
)
"""Fixtures that bring up a real server or worker process, wherever a test uses them."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every pure or in-process test ``unit`` (``pytest -m unit``: the quick loop).

    A test is ``unit`` unless it is ``slow`` or ``browser``, lives in a file or folder that
    starts processes, servers or a browser, or uses a fixture that does. Nothing is skipped:
    without ``-m`` every test runs, as CI runs them.
    """
    for item in items:
        where = item.path.relative_to(TESTS).as_posix() if item.path.is_relative_to(TESTS) else ""
        if (
            item.get_closest_marker("slow") is None
            and item.get_closest_marker("browser") is None
            and where not in OUT_OF_PROCESS_FILES
            and not where.startswith(OUT_OF_PROCESS_DIRS)
            and REAL_SERVER_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
        ):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "dispatcher"


@pytest.fixture
def make_dispatcher(state_dir: Path, recorder: Recorder) -> Iterator[Callable[..., TaskDispatcher]]:
    """Build dispatchers on ``state_dir`` with the recorder; closes whatever is left open."""
    made: list[TaskDispatcher] = []

    def make(**options: Any) -> TaskDispatcher:
        options.setdefault("task_manager_factory", recorder)
        options.setdefault("timezone", "Asia/Shanghai")
        dispatcher = TaskDispatcher(options.pop("dispatcher_dir", state_dir), **options)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        if not dispatcher.closed and not dispatcher.running:
            dispatcher.close()


@pytest.fixture
def clock() -> Iterator[Any]:
    """A frozen clock at 2026-01-08 07:00 Asia/Shanghai; move it with ``clock.move_to``."""
    with freeze_time(datetime(2026, 1, 8, 7, 0, tzinfo=SHANGHAI), real_asyncio=True) as frozen:
        yield frozen


@pytest.fixture
async def started(
    make_dispatcher: Callable[..., TaskDispatcher],
) -> AsyncIterator[TaskDispatcher]:
    """A started dispatcher (stopped at the end)."""
    dispatcher = make_dispatcher()
    await dispatcher.start()
    yield dispatcher
    await dispatcher.stop()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """``running(*run_args, env=None)``: ``task-dispatcher run`` on ``tmp_path / "store"`` in a
    process of its own (closed at the end)."""
    started: list[Running] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Running:
        started.append(Running(tmp_path / "store", *args, env=env))
        return started[-1]

    yield start
    for process in started:
        process.close()
