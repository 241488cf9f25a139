"""TaskRecord: validation, conversion, transitions, JSON form."""

from __future__ import annotations

import re
import sys
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import SHANGHAI, T0, has_compact_fields, record
from pydantic import ValidationError

from tasks import TaskRecord, TaskStatus
from tasks.model import (
    check_json_value,
    kwargs_problems,
    new_task_id_problem,
    parse_end_time,
    share_record_values,
)


def test_json_form_is_plain_and_readable() -> None:
    data = record("a", task_end_time=date(2026, 2, 8), last_execution_time=T0).to_json_dict()
    assert data["valid_time_range"] == [8, 22]
    assert data["task_end_time"] == "2026-02-08"
    assert data["last_execution_time"] == "2026-01-08T08:00:00+08:00"
    assert data["status"] == "pending"
    assert data["interval"] == 3600


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-02-08", date(2026, 2, 8)),
        ("20260208", date(2026, 2, 8)),  # compact ISO: the whole day, not a midnight cut-off
        (" 2026-02-08 ", date(2026, 2, 8)),
        ("2026-02-08T12:00", datetime(2026, 2, 8, 12, 0, tzinfo=SHANGHAI)),
        ("2026-02-08T12:00:00+08:00", datetime(2026, 2, 8, 12, 0, tzinfo=SHANGHAI)),
        (datetime(2026, 2, 8, 12, 0), datetime(2026, 2, 8, 12, 0, tzinfo=SHANGHAI)),
        (None, None),
    ],
)
def test_end_time_forms(value: Any, expected: Any) -> None:
    raw = record("a").to_json_dict() | {"task_end_time": value}
    parsed = TaskRecord.model_validate(raw, context={"zone": SHANGHAI}).task_end_time
    assert parsed == expected
    assert type(parsed) is type(expected)


def test_naive_datetimes_need_a_zone() -> None:
    raw = record("a").to_json_dict() | {"created_at": "2026-01-08T00:00:00"}
    with pytest.raises(ValidationError, match="timezone-aware"):
        TaskRecord.model_validate(raw)
    parsed = TaskRecord.model_validate(raw, context={"zone": SHANGHAI})
    assert parsed.created_at == datetime(2026, 1, 8, tzinfo=SHANGHAI)


@pytest.mark.parametrize("shared", [None, {}], ids=["alone", "loaded-together"])
def test_every_instant_field_comes_out_in_the_zone(shared: dict[Any, Any] | None) -> None:
    # Found from the model, so a field added later is covered without touching this test.
    instants = [
        name
        for name, field in TaskRecord.model_fields.items()
        if field.annotation in (datetime, datetime | None)
    ]
    assert len(instants) >= 7
    written = "2026-01-08T09:30:00-05:00"  # 22:30 in Shanghai
    raw = record("a").to_json_dict() | dict.fromkeys(instants, written)
    parsed = TaskRecord.model_validate(raw, context={"zone": SHANGHAI, "shared": shared})
    for name in instants:
        value = getattr(parsed, name)
        assert value.tzinfo is SHANGHAI, name
        assert (value.hour, value.minute) == (22, 30), name


def test_interval_normalised() -> None:
    assert record("a", interval=timedelta(hours=2)).interval == 7200
    assert isinstance(record("a", interval=60.0).interval, int)
    assert record("a", interval=1.5).interval == 1.5


def test_status_round_trips_and_rejects_unknown() -> None:
    raw = record("a").to_json_dict() | {"status": "paused"}
    assert TaskRecord.model_validate(raw, context={"zone": SHANGHAI}).status is TaskStatus.PAUSED
    with pytest.raises(ValidationError, match="status"):
        TaskRecord.model_validate(raw | {"status": "sleeping"}, context={"zone": SHANGHAI})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": [1, {"b": set()}]}, r"kwargs\.a\[1\]\.b: set"),
        ({"a": b"bytes"}, r"kwargs\.a: bytes"),
        ({"n": -(2**64)}, r"kwargs\.n: integer"),
    ],
)
def test_check_json_value(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_json_value(value, "kwargs")


def test_check_json_value_accepts_json() -> None:
    check_json_value({"a": [1, 2.5, "x", None, True, {"b": []}]}, "kwargs")


@pytest.mark.parametrize("text", ["20991301", "2099-01-01 noon", "", "someday"])
def test_parse_end_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="date"):
        parse_end_time(text)


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"valid_time_range": [24, 0]}, "valid_time_range", "never opens"),
        ({"valid_time_range": [True, 5]}, "valid_time_range", "whole numbers from 0 to 24"),
        ({"valid_time_range": [0, 24.0]}, "valid_time_range", "whole numbers from 0 to 24"),
        ({"interval": True}, "interval", "number of seconds"),
        ({"interval": 1000 * 365 * 86400 + 1}, "interval", "at most"),
        ({"interval": 1e-7}, "interval", "at least 1 second"),
        ({"interval": timedelta(milliseconds=999)}, "interval", "at least 1 second"),
        ({"account_id": " acc"}, "account_id", "printable"),
        ({"account_id": "acc\n"}, "account_id", "printable"),
        ({"account_id": "x" * 257}, "account_id", "at most 256"),
    ],
)
def test_record_rejects(changes: dict[str, Any], field: str, message: str) -> None:
    raw = record("a").to_json_dict() | changes
    with pytest.raises(ValidationError, match=message) as raised:
        TaskRecord.model_validate(raw, context={"zone": SHANGHAI})
    assert raised.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(
    "task_id",
    ["账号1-运营", "a b", "50%", "q?", "#1", "a.b", "...", ".x", "a\\b", "%2F", "x" * 256],
)
def test_new_task_ids_that_every_url_can_carry(task_id: str) -> None:
    assert new_task_id_problem(task_id) is None


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("a/b", "contains '/'"),
        ("/", "contains '/'"),
        (".", "relative path segment"),
        ("..", "relative path segment"),
        (" a", "whitespace"),
        ("a\u3000", "whitespace"),  # an ideographic space
        ("a\tb", r"unprintable character '\\t' at position 1"),
        ("a\x00", "unprintable"),
        ("a\u200bb", "unprintable"),  # zero width: looks like "ab", is not
        ("a\nb", "unprintable"),
    ],
)
def test_new_task_ids_that_cannot_be_addressed_are_named(task_id: str, message: str) -> None:
    problem = new_task_id_problem(task_id)
    assert problem is not None
    assert re.search(message, problem), problem
    assert "\n" not in problem  # one line, whatever the id holds


@pytest.mark.parametrize("task_id", ["a/b", ".", ".."])
def test_saved_records_with_such_ids_still_load(task_id: str) -> None:
    # The rule is for new tasks: a file written before it must keep loading.
    raw = record("a").to_json_dict() | {"task_id": task_id}
    assert TaskRecord.model_validate(raw, context={"zone": SHANGHAI}).task_id == task_id


@pytest.mark.parametrize("window", [(24, 5), (0, 24), (23, 0), (22, 6)])
def test_windows_that_open_are_accepted(window: tuple[int, int]) -> None:
    assert record("a", valid_time_range=window).valid_time_range == window


def test_kwargs_problems_name_record_fields_and_foreign_ids() -> None:
    kwargs = {"task_id": "b", "task_type": "xhs_type", "sys_type": "mac", "status": "x", "q": 1}
    assert kwargs_problems(record("a", kwargs=kwargs)) == [
        ("kwargs.sys_type", "is a record field, not a task keyword"),
        ("kwargs.status", "is a record field, not a task keyword"),
        ("kwargs.task_id", "names task 'b', not this task"),
    ]
    assert kwargs_problems(record("a")) == []


TRUSTED_CASES: list[dict[str, Any]] = [
    {},
    {"status": TaskStatus.PAUSED, "paused_reason": "too many failures"},
    {"task_end_time": date(2099, 1, 1), "valid_time_range": (22, 6)},
    {"task_end_time": datetime(2099, 1, 1, 3, tzinfo=SHANGHAI), "interval": 0.5 + 1},
    {"last_execution_time": T0, "next_start_time": T0 + timedelta(seconds=7), "run_count": 3},
    {"run_policy": {"jitter": 5, "retries": 2}, "last_error": "boom", "last_worker": "w1"},
    {
        "active_run": {"run_id": "r1", "scheduled_at": T0, "submitted_at": T0, "attempt": 2},
        "retry": {"at": T0, "attempt": 2, "scheduled_at": T0},
    },
    {"note": "a key added by hand", "kwargs": {"nested": {"a": [1, 2.5, None]}}},
]


@pytest.mark.parametrize("changes", TRUSTED_CASES)
@pytest.mark.parametrize("zone", [SHANGHAI, UTC])
def test_a_trusted_record_is_the_validated_one(changes: dict[str, Any], zone: tzinfo) -> None:
    saved = record("t1", **changes).to_json_dict()
    validated = TaskRecord.model_validate(saved, context={"zone": zone})
    trusted = TaskRecord.trusted(saved, zone)
    assert trusted == validated
    assert trusted.model_extra == validated.model_extra
    for name, value in validated.__dict__.items():
        assert type(trusted.__dict__[name]) is type(value), name
        if isinstance(value, datetime):
            assert trusted.__dict__[name].tzinfo is zone, name


def test_a_record_not_laid_out_as_saved_is_validated() -> None:
    saved = record("t1").to_json_dict()
    reordered = {"interval": -1, **{k: v for k, v in saved.items() if k != "interval"}}
    with pytest.raises(ValidationError, match="interval"):
        TaskRecord.trusted(reordered, UTC)


def _plain_size(values: dict[str, Any]) -> int:
    return sys.getsizeof(dict(values))


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's key-sharing dicts")
def test_records_the_dispatcher_makes_keep_compact_fields() -> None:
    constructed = record("t1", extra_key=[1])
    saved = constructed.to_json_dict()
    made = {
        "validated": TaskRecord.model_validate(saved, context={"zone": SHANGHAI}),
        "trusted": TaskRecord.trusted(saved, SHANGHAI),
        "replaced": constructed.replace(run_count=4, last_error="boom"),
        "snapshot": constructed.snapshot(),
    }
    for how, made_record in made.items():
        assert has_compact_fields(made_record), how
        assert made_record.model_fields_set is constructed.model_fields_set, how
        # Reading it as the store and the API do makes none either.
        made_record.plain(), made_record.to_json_dict(masked=True), made_record.snapshot()
        assert made_record.task_id == "t1", how
        assert made_record.model_extra == {"extra_key": [1]}, how
        assert has_compact_fields(made_record), how
        changed = {"run_count": 4, "last_error": "boom"} if how == "replaced" else {}
        assert made_record.to_json_dict() == {**saved, **changed}, how
    assert made["replaced"].run_count == 4
    assert made["replaced"].last_error == "boom"
    assert constructed.run_count == 0
    assert constructed.last_error is None
    assert made["validated"] == made["trusted"] == made["snapshot"] == constructed
    assert made["validated"].model_dump() == constructed.model_dump()
    made["snapshot"].kwargs["task_id"] = "changed"
    made["snapshot"].model_extra["extra_key"].append(2)  # type: ignore[index]
    assert constructed.kwargs["task_id"] == "t1"
    assert constructed.model_extra == {"extra_key": [1]}


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's key-sharing dicts")
def test_a_record_made_by_calling_the_class_shares_its_field_names() -> None:
    fields = record("t1").__dict__
    # A key-sharing dict holds only its values: about a third of a plain one.
    assert sys.getsizeof(fields) * 2 < _plain_size(fields)
    assert list(fields) == list(TaskRecord.model_fields)


def test_records_share_one_tuple_per_hour_window() -> None:
    first, second = record("t1", valid_time_range=[22, 6]), record("t2", valid_time_range=(22, 6))
    assert first.valid_time_range == (22, 6)
    assert first.valid_time_range is second.valid_time_range
    trusted = TaskRecord.trusted(first.to_json_dict(), UTC)
    assert trusted.valid_time_range is first.valid_time_range


def test_records_trusted_together_share_equal_times() -> None:
    times: dict[str, datetime] = {}
    first = TaskRecord.trusted(record("t1").to_json_dict(), SHANGHAI, times)
    second = TaskRecord.trusted(record("t2").to_json_dict(), SHANGHAI, times)
    assert second.created_at is first.created_at
    assert second.next_execution_time is first.next_execution_time
    assert first.created_at.tzinfo is SHANGHAI
    alone = TaskRecord.trusted(record("t3").to_json_dict(), SHANGHAI)
    assert alone.created_at == first.created_at
    assert alone.created_at is not first.created_at


def test_records_rebuilt_with_shared_values_reuse_them() -> None:
    shared: dict[Any, Any] = {}
    times: dict[str, datetime] = {}
    kwargs = {"xhs_account_id": "acc", "note": "same text", "count": 3}
    made = [
        TaskRecord.rebuilt(
            record(task_id, kwargs={**kwargs, "task_id": task_id}).to_json_dict(),
            UTC,
            times,
            shared,
        )
        for task_id in ("t1", "t2")
    ]
    first, second = made
    assert first is not None
    assert second is not None
    for name in ("account_id", "task_type", "sys_type", "interval"):
        assert getattr(second, name) is getattr(first, name), name
    assert second.kwargs["note"] is first.kwargs["note"]
    assert second.kwargs["xhs_account_id"] is first.account_id
    assert second.kwargs["task_id"] is second.task_id
    assert second.kwargs == {**kwargs, "task_id": "t2"}
    assert second == TaskRecord.model_validate(second.to_json_dict(), context={"zone": UTC})
    assert list(second.__dict__) == list(TaskRecord.model_fields)


@pytest.mark.parametrize(
    "change",
    [
        lambda saved: {"status": saved.pop("status"), **saved},  # out of field order
        lambda saved: {k: v for k, v in saved.items() if k != "retry"},  # a field missing
    ],
)
def test_a_record_laid_out_otherwise_is_rebuilt_as_validated(change: Any) -> None:
    saved = change(record("t1").to_json_dict())
    assert TaskRecord.rebuilt(saved, UTC, {}, {}) == TaskRecord.model_validate(
        saved, context={"zone": UTC}
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda saved: {**saved, "status": "bogus"},
        lambda saved: {**saved, "interval": "3600"},
        lambda saved: {**saved, "kwargs": ["not", "a", "dict"]},
        lambda saved: {**saved, "created_at": "yesterday"},
    ],
)
def test_a_rebuild_refuses_what_it_cannot_convert(damage: Any) -> None:
    # None: the loader validates the object instead (and keeps it unrestored if invalid).
    assert TaskRecord.rebuilt(damage(record("t1").to_json_dict()), UTC, {}, {}) is None


def test_records_rebuilt_together_are_the_validated_ones() -> None:
    saved = [
        record(f"t{index}", **changes).to_json_dict()
        for index, changes in enumerate(TRUSTED_CASES * 3)
    ]
    made = TaskRecord.rebuilt_all(saved, SHANGHAI, {}, {})
    for raw, rebuilt in zip(saved, made, strict=True):
        assert rebuilt is not None
        assert has_compact_fields(rebuilt)
        validated = TaskRecord.model_validate(raw, context={"zone": SHANGHAI})
        assert rebuilt == validated
        assert rebuilt.model_extra == validated.model_extra


def test_a_damaged_record_among_many_is_the_only_one_refused() -> None:
    saved = [record(f"t{index}").to_json_dict() for index in range(9)]
    saved[3]["created_at"] = "yesterday"
    saved[5]["updated_at"] = "0001-01-01T00:00:00+01:00"  # OverflowError in UTC
    saved[7] = {"status": saved[7].pop("status"), **saved[7]}  # out of field order: valid
    kwargs_before = [dict(raw["kwargs"]) for raw in saved]
    made = TaskRecord.rebuilt_all(saved, UTC, {}, {})
    assert [index for index, rebuilt in enumerate(made) if rebuilt is None] == [3, 5]
    assert [raw["kwargs"] for raw in saved] == kwargs_before
    for index, (raw, rebuilt) in enumerate(zip(saved, made, strict=True)):
        if index not in (3, 5):
            assert rebuilt == TaskRecord.model_validate(raw, context={"zone": UTC})


def test_values_shared_across_a_batch_keep_their_types() -> None:
    kwargs: list[dict[str, Any]] = [
        {"n": 1, "flag": True, "text": "same", "items": [1, "same"]},
        {"n": 1.0, "flag": 1, "text": "same", "items": [1, "same"]},
        {"n": True, "flag": 1.0, "text": "same", "other": "t1"},
    ]
    saved = [record(f"t{index}", kwargs=own).to_json_dict() for index, own in enumerate(kwargs)]
    saved[1]["interval"] = 3600.0  # equal to the others' 3600
    made = TaskRecord.rebuilt_all(saved, UTC, {}, {})
    assert None not in made
    for rebuilt, own in zip(made, kwargs, strict=True):
        assert rebuilt is not None
        assert rebuilt.kwargs == own
        assert [type(value) for value in rebuilt.kwargs.values()] == [
            type(value) for value in own.values()
        ]
    first, second, third = made
    assert first is not None
    assert second is not None
    assert third is not None
    # As validated: a float interval of whole seconds is an int.
    assert [type(rebuilt.interval) for rebuilt in made if rebuilt] == [int, int, int]
    assert third.interval is first.interval
    assert second.kwargs["text"] is first.kwargs["text"] is third.kwargs["text"]
    assert third.kwargs["other"] is second.task_id  # a text equal to a task id becomes it


def test_times_loaded_together_are_one_object_per_instant_and_keep_their_fold() -> None:
    # Each distinct time of a load is put in the zone once: equal instants, however
    # written, share the result; a wall time the zone passes twice keeps its fold.
    berlin = ZoneInfo("Europe/Berlin")
    twice = datetime(2026, 10, 25, 2, 30)  # naive, as the seed saved it: 02:30 comes twice
    instant = datetime(2026, 1, 8, tzinfo=UTC)
    written = [(twice, instant), (twice.replace(fold=1), instant.astimezone(SHANGHAI))]
    shared: dict[Any, Any] = {}
    first, second = (
        TaskRecord.model_validate(
            record(f"t{index}").model_dump() | {"created_at": created, "updated_at": updated},
            context={"zone": berlin, "shared": shared},
        )
        for index, (created, updated) in enumerate(written)
    )
    assert (first.created_at.fold, second.created_at.fold) == (0, 1)
    assert first.created_at.utcoffset() == timedelta(hours=2)
    assert second.created_at.utcoffset() == timedelta(hours=1)
    assert second.updated_at is first.updated_at
    assert first.updated_at.tzinfo is berlin
    assert first.updated_at == instant


def test_a_store_larger_than_a_batch_is_rebuilt_whole() -> None:
    saved = [record(f"t{index}").to_json_dict() for index in range(700)]
    saved[300]["status"] = "bogus"
    made = TaskRecord.rebuilt_all(saved, UTC, {}, {})
    assert len(made) == len(saved)
    assert [index for index, rebuilt in enumerate(made) if rebuilt is None] == [300]
    assert [rebuilt.task_id for rebuilt in made if rebuilt] == [
        raw["task_id"] for index, raw in enumerate(saved) if index != 300
    ]
    assert made[0] is not None
    assert made[699] is not None
    assert made[699].created_at is made[0].created_at  # shared across batches too


def test_records_built_apart_share_their_values_in_batches() -> None:
    made = [
        TaskRecord.model_validate(
            record(
                f"t{index}", kwargs={"note": "same text", "task_id": f"t{index}"}
            ).to_json_dict(),
            context={"zone": UTC},
        )
        for index in range(600)
    ]
    share_record_values(made, {})
    first, last = made[0], made[-1]
    assert has_compact_fields(last)
    assert last.account_id is first.account_id
    assert last.kwargs["note"] is first.kwargs["note"]
    assert last.kwargs["task_id"] is last.task_id


def test_records_saved_before_the_last_planned_time_was_kept_are_rebuilt() -> None:
    # Older files lack the field: such a record (extras and all) loads as validated.
    saved = [
        {**record(f"t{index}").to_json_dict(), "comment": f"kept {index}"} for index in range(3)
    ]
    for raw in saved:
        del raw["last_planned_time"]
    made = TaskRecord.rebuilt_all(saved, UTC, {}, {})
    for raw, rebuilt in zip(saved, made, strict=True):
        assert rebuilt is not None
        assert rebuilt.last_planned_time is None
        assert rebuilt.grid_time is None
        assert rebuilt.model_extra == {"comment": raw["comment"]}
        assert rebuilt == TaskRecord.model_validate(raw, context={"zone": UTC})
    moved = {**saved[0], "last_planned_time": "2026-01-08T08:00:00+08:00"}  # out of its place
    assert TaskRecord.rebuilt_all([moved], UTC, {}, {}) == [
        TaskRecord.model_validate(moved, context={"zone": UTC})
    ]
