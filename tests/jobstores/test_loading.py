"""Loading: the seed's own files, corrupt files, backups, unrestorable tasks, newer formats."""

from __future__ import annotations

import logging
import os
import stat
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from helpers import (
    BACKENDS,
    SHANGHAI,
    Recorder,
    has_compact_fields,
    read_state,
    record,
    seed_file,
    seed_task,
    store_options,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobstores import JsonJobStore, loading
from jobstores.format import decode_document, encode_document, encode_journal_line, encode_task
from jobstores.loading import restore
from scheduler import TaskDispatcher
from scheduler.errors import NewerFormatError
from tasks import TaskRecord, TaskStatus, lifecycle
from tasks.schedule import Schedule

NOW = datetime(2026, 1, 8, 10, 45, tzinfo=SHANGHAI)

SEED_TASK = seed_task()


def open_store(directory: Path, recorder: Recorder) -> JsonJobStore:
    return JsonJobStore(directory, timezone=SHANGHAI, now=NOW)


def test_a_seed_format_file_with_naive_datetimes_loads(tmp_path: Path, recorder: Recorder) -> None:
    (tmp_path / "dispatch_config.json").write_bytes(seed_file([SEED_TASK]))
    store = open_store(tmp_path, recorder)
    try:
        record = store.table.get("task_id_1")
        assert record.last_execution_time == datetime(2026, 1, 8, 10, 30, tzinfo=SHANGHAI)
        assert record.next_execution_time == datetime(2026, 1, 8, 11, 30, tzinfo=SHANGHAI)
        assert record.created_at.utcoffset() is not None
        assert record.task_end_time == date(2026, 2, 8)
        assert record.valid_time_range == (8, 22)
        assert (record.sys_type, record.kwargs) == ("mac_intel", SEED_TASK["kwargs"])
        store.table.touch()
        store.save()
        saved = read_state(tmp_path)["tasks"][0]
        assert saved["last_execution_time"] == "2026-01-08T10:30:00+08:00"
    finally:
        store.close()


def test_a_record_missing_its_next_time_gets_one(tmp_path: Path, recorder: Recorder) -> None:
    task = {**SEED_TASK, "next_execution_time": None}
    (tmp_path / "dispatch_config.json").write_bytes(seed_file([task]))
    store = open_store(tmp_path, recorder)
    try:
        assert store.table.get("task_id_1").next_execution_time == datetime(
            2026, 1, 8, 11, 30, tzinfo=SHANGHAI
        )
    finally:
        store.close()


def test_a_record_past_its_end_is_completed(tmp_path: Path, recorder: Recorder) -> None:
    task = {**SEED_TASK, "task_end_time": "2026-01-07"}
    (tmp_path / "dispatch_config.json").write_bytes(seed_file([task]))
    store = open_store(tmp_path, recorder)
    try:
        assert store.table.get("task_id_1").status is TaskStatus.COMPLETED
    finally:
        store.close()


def test_no_file_is_an_empty_store(tmp_path: Path, recorder: Recorder) -> None:
    store = open_store(tmp_path / "new", recorder)
    try:
        assert store.table.records() == []
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    finally:
        store.close()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[1, 2, 3]",
        b'{"version": "1.0", "tasks": {"a": 1}}',
        b"\xff\xfe\x00garbage",
    ],
)
def test_a_corrupt_file_is_set_aside_and_the_store_starts_empty(
    tmp_path: Path, recorder: Recorder, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dispatch_config.json").write_bytes(content)
    with caplog.at_level(logging.ERROR):
        store = open_store(tmp_path, recorder)
    try:
        assert store.table.records() == []
        aside = list(tmp_path.glob("dispatch_config.json.corrupt-*"))
        assert len(aside) == 1
        assert aside[0].read_bytes() == content
        assert not (tmp_path / "dispatch_config.json").exists()
        assert any("aside" in r.message for r in caplog.records)
    finally:
        store.close()


def test_a_corrupt_file_is_restored_from_the_backup(
    tmp_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(tmp_path, recorder)
    store.add_tasks([record("a")])
    store.save()
    store.add_tasks([record("b")])
    store.save()  # the backup now holds the state with "a" only
    store.close()
    (tmp_path / "dispatch_config.json").write_bytes(b'{"tasks": [tor')
    with caplog.at_level(logging.ERROR):
        again = open_store(tmp_path, recorder)
    try:
        assert [r.task_id for r in again.table.records()] == ["a"]
        assert any("restored 1 task(s) from the backup" in r.message for r in caplog.records)
        assert len(list(tmp_path.glob("dispatch_config.json.corrupt-*"))) == 1
        # The main file is whole again.
        assert [t["task_id"] for t in read_state(tmp_path)["tasks"]] == ["a"]
    finally:
        again.close()


def test_one_unrestorable_task_among_good_ones_is_kept_verbatim(
    tmp_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    bad_interval = {**SEED_TASK, "task_id": "bad_1", "interval": "often"}
    not_an_object = ["what", "is", "this"]
    good = {
        **SEED_TASK,
        "task_id": "good_1",
        "kwargs": {**SEED_TASK["kwargs"], "task_id": "good_1"},
    }
    duplicate = {**good, "account_name": "dup"}
    tasks = [bad_interval, good, not_an_object, duplicate]
    (tmp_path / "dispatch_config.json").write_bytes(
        seed_file(tasks, {"account_1": ["bad_1", "good_1"]})
    )
    with caplog.at_level(logging.ERROR):
        store = open_store(tmp_path, recorder)
    try:
        assert [r.task_id for r in store.table.records()] == ["good_1"]
        assert store.table.kept_records() == [bad_interval, not_an_object, duplicate]
        assert any(
            "bad_1 could not be restored" in r.message and "interval" in r.message
            for r in caplog.records
        )
        store.save()
        saved = read_state(tmp_path)
        assert saved["tasks"][1:] == [bad_interval, not_an_object, duplicate]
        assert saved["account_tasks"] == {"account_1": ["good_1", "bad_1"]}
    finally:
        store.close()


def test_a_task_whose_factory_raises_is_kept(tmp_path: Path, recorder: Recorder) -> None:
    other = {**SEED_TASK, "task_id": "other", "kwargs": {"task_type": "gone", "task_id": "other"}}

    def factory(**kwargs: Any) -> Any:
        if kwargs["task_type"] == "xhs_type":
            raise RuntimeError("no such automation")
        return recorder(**kwargs)

    (tmp_path / "dispatch_config.json").write_bytes(seed_file([SEED_TASK, other]))
    dispatcher = TaskDispatcher(tmp_path, task_manager_factory=factory, timezone=SHANGHAI)
    try:
        assert [r.task_id for r in dispatcher.list_tasks()] == ["other"]
        assert dispatcher._store.table.kept_records() == [SEED_TASK]
    finally:
        dispatcher.close()


def test_unknown_keys_survive_a_round_trip(tmp_path: Path, recorder: Recorder) -> None:
    task = {**SEED_TASK, "note": "added by hand"}
    (tmp_path / "dispatch_config.json").write_bytes(seed_file([task]))
    store = open_store(tmp_path, recorder)
    try:
        store.table.touch()
        store.save()
        assert read_state(tmp_path)["tasks"][0]["note"] == "added by hand"
    finally:
        store.close()


def test_account_tasks_disagreeing_with_tasks_is_repaired(
    tmp_path: Path, recorder: Recorder
) -> None:
    second = {**SEED_TASK, "task_id": "t2", "kwargs": {**SEED_TASK["kwargs"], "task_id": "t2"}}
    (tmp_path / "dispatch_config.json").write_bytes(
        seed_file([SEED_TASK, second], {"account_1": ["ghost", "t2"], "nobody": ["task_id_1"]})
    )
    store = open_store(tmp_path, recorder)
    try:
        assert store.table.account_tasks() == {"account_1": ["t2", "task_id_1"]}
    finally:
        store.close()


@pytest.mark.parametrize("version", ["1.1", "2.0", 2, "1.1-rc1", "one"])
def test_a_newer_format_is_refused_and_left_untouched(
    tmp_path: Path, recorder: Recorder, version: Any
) -> None:
    # A version that does not parse (a pre-release, say) is refused the same way: treating
    # it as corruption would set the file aside and, without a backup, start empty.
    content = seed_file([SEED_TASK], version=version)
    (tmp_path / "dispatch_config.json").write_bytes(content)
    with pytest.raises(NewerFormatError, match=f"version '{version}'"):
        open_store(tmp_path, recorder)
    assert (tmp_path / "dispatch_config.json").read_bytes() == content
    assert list(tmp_path.glob("*.corrupt-*")) == []
    # The lock was released: the directory is usable once the file is dealt with.
    (tmp_path / "dispatch_config.json").unlink()
    open_store(tmp_path, recorder).close()


def test_files_are_owner_only_and_temp_files_are_cleaned(
    tmp_path: Path, recorder: Recorder
) -> None:
    (tmp_path / ".dispatch_config.json.999.tmp").write_bytes(b"half a save")
    store = open_store(tmp_path, recorder)
    try:
        assert not (tmp_path / ".dispatch_config.json.999.tmp").exists()
        store.table.touch()
        store.save()
        store.table.touch()
        store.save()
        for name in ("dispatch_config.json", "dispatch_config.json.bak"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    finally:
        store.close()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"valid_time_range": [24, 0]}, "valid_time_range"),
        ({"interval": 1e-7}, "interval"),
        ({"interval": 0.5}, "interval"),
        ({"account_id": " account_1"}, "account_id"),
    ],
)
def test_a_record_that_cannot_run_is_kept_unrestored(
    tmp_path: Path,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
    field: str,
) -> None:
    bad = {**SEED_TASK, "task_id": "bad", **changes}
    good = {**SEED_TASK, "kwargs": {**SEED_TASK["kwargs"]}}
    (tmp_path / "dispatch_config.json").write_bytes(seed_file([bad, good]))
    with caplog.at_level(logging.ERROR):
        store = open_store(tmp_path, recorder)
    try:
        assert [r.task_id for r in store.table.records()] == ["task_id_1"]
        assert store.table.kept_records() == [bad]
        assert any(
            "task bad could not be restored" in r.message and field in r.message
            for r in caplog.records
        )
    finally:
        store.close()


def test_top_level_extra_keys_survive_saves(tmp_path: Path, recorder: Recorder) -> None:
    document = orjson.loads(seed_file([SEED_TASK]))
    document = {
        "comment": "ops team: edit with care",
        **document,
        "owner": {"team": "growth", "pager": [1, 2]},
    }
    (tmp_path / "dispatch_config.json").write_bytes(orjson.dumps(document))
    store = open_store(tmp_path, recorder)
    try:
        for _ in range(2):
            store.table.touch()
            assert store.save()
        saved = read_state(tmp_path)
        assert saved["comment"] == "ops team: edit with care"
        assert saved["owner"] == {"team": "growth", "pager": [1, 2]}
        assert saved["version"] == "1.0"
        assert [t["task_id"] for t in saved["tasks"]] == ["task_id_1"]
    finally:
        store.close()
    again = open_store(tmp_path, recorder)
    try:
        again.table.touch()
        again.save()
        assert read_state(tmp_path)["comment"] == "ops team: edit with care"
    finally:
        again.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_file_this_library_wrote_is_trusted_without_validation(
    tmp_path: Path, recorder: Recorder, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=NOW, **store_options(kind, tmp_path))
    store.add_tasks([record(f"t{i}", at=NOW, note=i) for i in range(3)])
    store.save()
    store.close()
    assert (tmp_path / "dispatch_config.json").read_bytes().endswith(b'"\n}\n')
    assert read_state(tmp_path)["checksum"]

    validations = []
    original = TaskRecord.model_validate.__func__  # type: ignore[attr-defined]

    def counted(cls: type[TaskRecord], *args: Any, **kwargs: Any) -> TaskRecord:
        validations.append(args[0].get("task_id"))
        return original(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(TaskRecord, "model_validate", classmethod(counted))
    again = JsonJobStore(tmp_path, timezone=SHANGHAI, now=NOW, **store_options(kind, tmp_path))
    try:
        assert validations == []
        assert [r.task_id for r in again.table.records()] == ["t0", "t1", "t2"]
        assert again.table.get("t2").model_extra == {"note": 2}
        assert again.table.get("t1").next_execution_time == NOW
    finally:
        again.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_hand_edit_breaks_the_checksum_and_every_task_is_validated(
    tmp_path: Path, recorder: Recorder, kind: str
) -> None:
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=NOW, **store_options(kind, tmp_path))
    store.add_tasks([record("t1", at=NOW), record("t2", at=NOW)])
    store.save()
    store.close()
    path = tmp_path / "dispatch_config.json"
    data = path.read_bytes()
    edited = data.replace(b'"interval":3600', b'"interval":-5', 1)
    assert edited != data
    path.write_bytes(edited)
    again = JsonJobStore(tmp_path, timezone=SHANGHAI, now=NOW, **store_options(kind, tmp_path))
    try:
        assert [r.task_id for r in again.table.records()] == ["t2"]
        assert [raw["task_id"] for raw in again.table.kept_records()] == ["t1"]
        again.table.touch()
        again.save()
        # A file holding a task that was never validated is not sealed: its next load
        # validates again.
        assert "checksum" not in read_state(tmp_path)
    finally:
        again.close()


@pytest.mark.parametrize("kind", BACKENDS)
def test_loaded_records_share_equal_values(tmp_path: Path, recorder: Recorder, kind: str) -> None:
    store = JsonJobStore(tmp_path, timezone=SHANGHAI, now=NOW, **store_options(kind, tmp_path))
    store.add_tasks([record(f"t{i}", at=NOW, account=f"acc{i % 2}") for i in range(4)])
    store.save()
    store.close()
    again = JsonJobStore(tmp_path, timezone=SHANGHAI, now=NOW, **store_options(kind, tmp_path))
    try:
        first, *others = again.table.records()
        for other in others:
            assert other.created_at is first.created_at
            assert other.next_execution_time is first.next_execution_time
            assert other.valid_time_range is first.valid_time_range
        assert others[1].account_id is first.account_id
        assert others[0].account_id == "acc1"
        assert others[0].account_id is not first.account_id
        assert first.created_at.tzinfo is SHANGHAI
        again.start(BackgroundScheduler(timezone=SHANGHAI), "default")
        assert len(again.get_all_jobs()) == 4  # jobs read records as the scheduler does
        if sys.implementation.name == "cpython":  # fields kept in key-sharing dicts
            assert all(map(has_compact_fields, again.table.records()))
    finally:
        again.close()


def test_a_checksummed_task_laid_out_unexpectedly_is_validated(
    tmp_path: Path, recorder: Recorder
) -> None:
    good = [record(f"t{i}", at=NOW).to_json_dict() for i in range(2)]
    odd = record("odd", at=NOW).to_json_dict()
    odd = {"interval": -5, **{k: v for k, v in odd.items() if k != "interval"}}
    parts = encode_document(
        map(encode_task, [good[0], odd, good[1]]),
        {"acc": ["t0", "odd", "t1"]},
        NOW,
        "Asia/Shanghai",
        sealed=True,
    )
    (tmp_path / "dispatch_config.json").write_bytes(b"".join(parts))
    assert read_state(tmp_path)["checksum"]
    store = open_store(tmp_path, recorder)
    try:
        assert [r.task_id for r in store.table.records()] == ["t0", "t1"]
        assert store.table.kept_records() == [odd]
    finally:
        store.close()


def test_validated_records_share_equal_values_too(tmp_path: Path, recorder: Recorder) -> None:
    tasks = [{**SEED_TASK, "task_id": f"t{i}", "next_execution_time": None} for i in range(3)]
    (tmp_path / "dispatch_config.json").write_bytes(seed_file(tasks))  # no checksum
    store = open_store(tmp_path, recorder)
    try:
        first, *others = store.table.records()
        for other in others:
            assert other.account_id is first.account_id
            assert other.kwargs["xhs_account_id"] is first.kwargs["xhs_account_id"]
            # planned at load (changed there): its new time is shared as well
            assert other.next_execution_time is first.next_execution_time
    finally:
        store.close()


# ---------------------------------------------------------------------- pydantic's JSON path

_ZONES = [SHANGHAI, ZoneInfo("America/New_York"), UTC]
_JSON_TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63) + 1, 2**63 - 1)
    | _JSON_TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_JSON_TEXT, inner, max_size=3),
    max_leaves=6,
)
_TIMES = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2090, 1, 1),
    timezones=st.sampled_from(_ZONES),
)


@st.composite
def _saved_records(draw: st.DrawFn) -> dict[str, Any]:
    """A record as this library saves it: every field drawn from what it may hold."""
    task_id = draw(
        st.text(st.characters(codec="utf-8", categories=("L", "N")), min_size=1, max_size=6)
    )
    start, end = draw(
        st.tuples(st.integers(0, 24), st.integers(0, 24)).filter(
            lambda pair: pair[0] != pair[1] and pair != (24, 0)
        )
    )
    made = record(
        task_id,
        account=draw(st.sampled_from(["acc", "账号1", "a b"])),
        at=draw(st.none() | _TIMES),
        interval=draw(st.integers(1, 10**6) | st.floats(1.5, 10**6).filter(lambda f: f % 1)),
        valid_time_range=(start, end),
        status=draw(st.sampled_from(list(TaskStatus))),
        task_end_time=draw(st.none() | st.dates() | _TIMES),
        last_execution_time=draw(st.none() | _TIMES),
        created_at=draw(_TIMES),
        run_count=draw(st.integers(0, 10**9)),
        kwargs={
            "task_id": task_id,
            **draw(st.dictionaries(st.sampled_from(["q", "n", "nested"]), _JSON_VALUES)),
        },
        **draw(st.dictionaries(st.sampled_from(["note", "comment"]), _JSON_VALUES, max_size=1)),
    )
    return made.to_json_dict()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(saved=st.lists(_saved_records(), min_size=1, max_size=4), zone=st.sampled_from(_ZONES))
def test_records_loaded_from_a_sealed_file_are_the_validated_ones(
    saved: list[dict[str, Any]], zone: ZoneInfo
) -> None:
    # The one load path of a sealed file (pydantic's JSON path, equal values shared)
    # makes exactly the records that validating each saved object makes.
    data = b"".join(encode_document(map(encode_task, saved), {}, NOW, "UTC", sealed=True))
    document = decode_document(data, Path("dispatch_config.json"), defer_tasks=True)
    assert document.trusted
    assert document.tasks_deferred
    assert document.tasks == []
    restored = restore(
        document.tasks, zone, now=NOW, trusted=lambda raw: True, sealed=document.sealed_tasks
    )
    assert restored.kept == [] or len({raw["task_id"] for raw in saved}) < len(saved)
    validated: dict[str, TaskRecord] = {}
    for raw in saved:
        validated.setdefault(raw["task_id"], TaskRecord.model_validate(raw, context={"zone": zone}))
    for loaded in restored.records:
        expected = lifecycle.loaded(validated[loaded.task_id], Schedule.of(loaded, zone), NOW)
        assert loaded == expected
        assert loaded.model_extra == expected.model_extra
        for name, value in expected.__dict__.items():
            assert type(getattr(loaded, name)) is type(value), name
            if isinstance(value, datetime):
                assert getattr(loaded, name).tzinfo is zone, name


def test_a_sealed_file_is_parsed_once(tmp_path: Path, recorder: Recorder) -> None:
    saved = [record(f"t{i}", at=NOW).to_json_dict() for i in range(3)]
    data = b"".join(
        encode_document(map(encode_task, saved), {"acc": ["t0", "t1", "t2"]}, NOW, sealed=True)
    )
    path = tmp_path / "dispatch_config.json"
    path.write_bytes(data)
    whole = decode_document(data, path)
    deferred = decode_document(data, path, defer_tasks=True)
    assert (deferred.tasks, whole.tasks_deferred, whole.sealed_tasks) == ([], False, None)
    assert orjson.loads(deferred.sealed_tasks or b"") == whole.tasks
    for name in ("version", "saved_at", "timezone", "account_tasks", "extra", "journal_seq"):
        assert getattr(deferred, name) == getattr(whole, name), name
    parses = []
    original = orjson.loads

    def counted(text: Any) -> Any:
        parses.append(len(text))
        return original(text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(orjson, "loads", counted)
        store = open_store(tmp_path, recorder)
    try:
        assert [r.task_id for r in store.table.records()] == ["t0", "t1", "t2"]
        assert max(parses) < len(data) // 2  # the frame alone: never the tasks
        assert deferred.parse_tasks() == whole.tasks
    finally:
        store.close()


def test_a_record_refused_at_load_is_kept_as_read_from_a_sealed_file(tmp_path: Path) -> None:
    # Valid, but its manager cannot be created: kept unrestored, exactly as the file holds it.
    saved = [record(f"t{i}", at=NOW).to_json_dict() for i in range(3)]
    saved[1]["kwargs"]["fail_create"] = True
    data = b"".join(encode_document(map(encode_task, saved), {}, NOW, sealed=True))
    path = tmp_path / "dispatch_config.json"
    path.write_bytes(data)
    document = decode_document(data, path, defer_tasks=True)

    def accept(made: TaskRecord) -> None:
        if made.kwargs.get("fail_create"):
            raise ValueError("the factory refused it")

    restored = restore(
        document.tasks, SHANGHAI, now=NOW, accept=accept, sealed=document.sealed_tasks
    )
    assert [r.task_id for r in restored.records] == ["t0", "t2"]
    assert restored.kept == [(saved[1], "t1")]


def test_a_journal_put_on_a_sealed_file_loads_the_put_record(tmp_path: Path) -> None:
    saved = [record(f"t{i}", at=NOW).to_json_dict() for i in range(3)]
    data = b"".join(encode_document(map(encode_task, saved), {}, NOW, sealed=True))
    (tmp_path / "dispatch_config.json").write_bytes(data)
    put = {**saved[1], "run_count": 7}
    (tmp_path / f"{loading.JOURNAL_PREFIX}{1:012d}").write_bytes(
        encode_journal_line(1, "put", put, commit=True)
    )
    document, _, journal = loading.read_state(tmp_path, repair=False, defer_tasks=True)
    assert document is not None
    assert journal.lines == 1
    assert not document.tasks_deferred  # parsed to fold the journal in
    assert document.sealed_tasks is None  # its tasks are not the sealed ones any more
    restored = restore(document.tasks, SHANGHAI, now=NOW, trusted=lambda raw: True)
    assert [r.run_count for r in restored.records] == [0, 7, 0]
