"""``ChangeLog``: what a save takes, what a failed save puts back, and when a change is durable."""

from __future__ import annotations

from helpers import record

from jobstores.changelog import ChangeLog


def test_a_save_takes_the_latest_record_of_each_change_and_a_new_log_starts() -> None:
    log = ChangeLog()
    first, second = record("a"), record("a", interval=60)
    log.added("a")
    log.changed("a", first)
    log.changed("a", second)
    log.changed("b", None)
    log.moved("acc", "c")
    batch, moved = log.take(version=3)
    assert (list(batch), batch.version, moved) == ([("a", second), ("b", None)], 3, {"acc": {"c"}})
    assert log.unsaved() == {"a", "b"}  # in flight until durable
    assert log.take(version=3)[0].latest == {"a": second, "b": None}  # never saved: again
    assert log.saved(3) is not None
    assert log.unsaved() == set()


def test_a_failed_save_puts_its_changes_back_in_front_of_the_newer_ones() -> None:
    log = ChangeLog()
    old, new = record("a"), record("a", interval=60)
    log.changed("a", old)
    log.changed("x", record("x"))
    log.moved("acc", "x")
    log.take(version=1)  # this save fails: saved() never comes
    log.changed("x", None)  # removed, then added again: replayed as a removal first
    log.added("x")
    log.changed("x", new)
    log.moved("acc", "y")
    batch, moved = log.take(version=2)
    assert list(batch) == [("a", old), ("x", None), ("x", new)]
    assert moved == {"acc": {"x", "y"}}


def test_a_task_removed_then_added_before_a_save_is_replayed_removal_first() -> None:
    log = ChangeLog()
    log.changed("t", None)
    log.added("t")
    again = record("t")
    log.changed("t", again)
    log.added("u")  # a new task: no removal to replay
    log.changed("u", record("u"))
    batch, _ = log.take(version=1)
    assert [pair for pair in batch if pair[0] == "t"] == [("t", None), ("t", again)]
    assert [pair[1] is None for pair in batch if pair[0] == "u"] == [False]


def test_a_save_older_than_the_capture_in_flight_leaves_it_in_flight() -> None:
    log = ChangeLog()
    log.changed("a", record("a"))
    log.take(version=5)
    assert log.saved(4) is None
    assert log.unsaved() == {"a"}
    assert log.saved(5) is not None


def test_touch_asks_for_the_whole_state_until_a_save_of_that_version_is_durable() -> None:
    log = ChangeLog()
    log.take(version=6)
    log.touch(7)  # while the capture of 6 is being written
    log.saved(6)
    assert log.touched
    log.take(version=7)
    log.saved(7)
    assert not log.touched
