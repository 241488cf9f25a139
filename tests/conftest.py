"""Shared fixtures: a recording task manager factory, dispatcher directories, a frozen clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from helpers import SHANGHAI, Recorder

from scheduler import TaskDispatcher


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
