"""Data the database refuses: a commit failing for the data itself is not retried for ever."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import Recorder
from postgres_support import url_of

from scheduler import SaveFailedError, TaskDispatcher

TASK: dict[str, Any] = {"sys_type": "mac_intel", "task_type": "xhs_type", "interval": 3600}


async def test_a_change_the_database_refuses_is_not_retried_and_the_next_change_saves(
    recorder: Recorder, tmp_path: Path, empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobstores.saver

    monkeypatch.setattr(jobstores.saver, "RETRY_FIRST", 0.0)  # a retry: on the next loop turn
    dispatcher = TaskDispatcher(
        tmp_path,
        task_manager_factory=recorder,
        timezone="Asia/Shanghai",
        store=url_of(empty_database),
    )
    await dispatcher.start()
    try:
        with psycopg.connect(empty_database, autocommit=True) as connection:
            connection.execute(
                "ALTER TABLE td_tasks ADD CONSTRAINT no_forbidden CHECK (account_id <> 'forbidden')"
            )
        with pytest.raises(SaveFailedError, match="saving is not retried") as refused:
            await dispatcher.add_task(**TASK, xhs_account_id="forbidden")
        assert not refused.value.retried
        health = dispatcher.save_health
        assert health.permanent
        assert "CheckViolation" in (health.last_error or "")
        assert dispatcher._store._saver._retry is None  # no retry: it would fail the same way
        # The task removed, the next change saves, the refused one never reached the store.
        dispatcher.remove_task(refused.value.task_ids[0])
        kept = await dispatcher.add_task(**TASK, xhs_account_id="allowed")
        assert dispatcher.save_health.ok
        with psycopg.connect(empty_database) as connection:
            rows = connection.execute("SELECT task_id FROM td_tasks").fetchall()
        assert rows == [(kept,)]
    finally:
        await dispatcher.stop()
