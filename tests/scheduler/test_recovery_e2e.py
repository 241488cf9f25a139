"""End-to-end with a frozen clock: the seed's own files, corrupt files, unrestorable tasks, DST."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from freezegun import freeze_time
from helpers import Recorder, at, read_state, seed_file, seed_task

from scheduler import TaskDispatcher
from tasks import TaskStatus

MakeDispatcher = Callable[..., TaskDispatcher]


def write_seed_file(directory: Path, tasks: list[Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dispatch_config.json").write_bytes(seed_file(tasks))


def early(task_id: str, **changes: Any) -> dict[str, Any]:
    """The seed's task, last run at 07:30 and next due at 08:30 (naive, the zone's clock)."""
    return seed_task(
        task_id,
        last_execution_time="2026-01-08T07:30:00",
        next_execution_time="2026-01-08T08:30:00",
        updated_at="2026-01-08T07:30:00",
        **changes,
    )


async def test_a_seed_file_with_naive_times_runs_on_the_zone_clock(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    write_seed_file(state_dir, [early("task_id_1")])
    dispatcher = make_dispatcher()
    record = dispatcher.get_task("task_id_1")
    assert record.next_execution_time == at(2026, 1, 8, 8, 30)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 29))
    await dispatcher.run_pending()
    assert recorder.runs == []
    clock.move_to(at(2026, 1, 8, 8, 30))
    await dispatcher.run_pending()
    assert recorder.run_ids() == ["task_id_1"]
    assert recorder.created[0] == {"sys_type": "mac_intel", **early("task_id_1")["kwargs"]}
    await dispatcher.stop()
    saved = read_state(state_dir)["tasks"][0]
    assert saved["last_execution_time"] == "2026-01-08T08:30:00+08:00"
    assert saved["next_execution_time"] == "2026-01-08T09:30:00+08:00"


async def test_a_corrupt_file_is_set_aside_and_the_dispatcher_works(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    state_dir.mkdir(parents=True)
    (state_dir / "dispatch_config.json").write_text('{"version": "1.0", "tasks": [{"task_id": ')
    dispatcher = make_dispatcher()
    assert dispatcher.list_tasks() == []
    (aside,) = state_dir.glob("dispatch_config.json.corrupt-*")
    assert aside.read_text().endswith('"task_id": ')
    task_id = await dispatcher.add_task(sys_type="s", task_type="t", account_id="a", interval=60)
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 7, 0))
    await dispatcher.run_pending()
    assert recorder.run_ids() == [task_id]
    await dispatcher.stop()
    assert aside.exists()


async def test_one_unrestorable_task_among_good_ones(
    clock: Any, make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    broken = early("broken", valid_time_range=[8, 8])
    write_seed_file(state_dir, [early("good_1"), broken, early("good_2")])
    dispatcher = make_dispatcher()
    assert [r.task_id for r in dispatcher.list_tasks()] == ["good_1", "good_2"]
    await dispatcher.start()
    clock.move_to(at(2026, 1, 8, 8, 30))
    await dispatcher.run_pending()
    assert sorted(recorder.run_ids()) == ["good_1", "good_2"]
    await dispatcher.stop()
    saved = read_state(state_dir)
    assert broken in saved["tasks"]
    assert [t["task_id"] for t in saved["tasks"]] == ["good_1", "good_2", "broken"]
    assert saved["account_tasks"] == {"account_1": ["good_1", "good_2", "broken"]}


async def test_a_daily_task_across_spring_forward_in_new_york(
    make_dispatcher: MakeDispatcher, recorder: Recorder, state_dir: Path
) -> None:
    ny = ZoneInfo("America/New_York")
    with freeze_time(datetime.datetime(2026, 3, 7, 9, 0, tzinfo=ny), real_asyncio=True) as frozen:
        dispatcher = make_dispatcher(timezone="America/New_York")
        task_id = await dispatcher.add_task(
            sys_type="s", task_type="t", account_id="a", interval=86400, valid_time_range=[8, 22]
        )
        await dispatcher.start()
        await dispatcher.run_pending()
        # 24 h of elapsed time after 09:00 EST is 10:00 EDT on the 8th.
        expected = datetime.datetime(2026, 3, 8, 10, 0, tzinfo=ny)
        assert dispatcher.get_task(task_id).next_execution_time == expected
        frozen.move_to(datetime.datetime(2026, 3, 8, 9, 59, tzinfo=ny))
        await dispatcher.run_pending()
        assert recorder.count(task_id) == 1
        frozen.move_to(expected)
        await dispatcher.run_pending()
        assert recorder.count(task_id) == 2
        assert dispatcher.get_task(task_id).status is TaskStatus.PENDING
        await dispatcher.stop()
    saved = read_state(state_dir)["tasks"][0]
    assert saved["last_execution_time"] == "2026-03-08T10:00:00-04:00"


async def test_a_window_opening_in_the_skipped_hour_in_berlin(
    make_dispatcher: MakeDispatcher, recorder: Recorder
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    with freeze_time(
        datetime.datetime(2026, 3, 29, 0, 30, tzinfo=berlin), real_asyncio=True
    ) as frozen:
        dispatcher = make_dispatcher(timezone="Europe/Berlin")
        task_id = await dispatcher.add_task(
            sys_type="s", task_type="t", account_id="a", interval=3600, valid_time_range=[2, 5]
        )
        opening = dispatcher.get_task(task_id).next_execution_time
        assert opening is not None
        # 02:00 does not exist that night: the window opens at 03:00 CEST (01:00 UTC).
        assert opening.astimezone(datetime.UTC) == datetime.datetime(
            2026, 3, 29, 1, 0, tzinfo=datetime.UTC
        )
        await dispatcher.start()
        frozen.move_to(opening)
        await dispatcher.run_pending()
        frozen.move_to(opening + datetime.timedelta(hours=1))
        await dispatcher.run_pending()
        frozen.move_to(opening + datetime.timedelta(hours=2))  # 05:00 CEST: closed
        await dispatcher.run_pending()
        assert [run.at.astimezone(berlin).hour for run in recorder.runs] == [3, 4]
        await dispatcher.stop()
