"""Every command through click's test runner, including the error exits."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from helpers import SHANGHAI, read_state, recording_factory

from scheduler import TaskDispatcher
from scheduler.cli import main, parse_hours, parse_interval


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result]:
    directory = tmp_path / "store"

    def invoke(*args: str, expect: int = 0) -> Result:
        result = CliRunner().invoke(
            main, ["--dir", str(directory), "--timezone", "Asia/Shanghai", *args]
        )
        assert result.exit_code == expect, (result.output, result.stderr, result.exception)
        return result

    return invoke


def add(cli: Callable[..., Result], *extra: str) -> str:
    result = cli(
        "add",
        "--type",
        "shell",
        "--account",
        "acc",
        "--interval",
        "1h",
        "--kw",
        "command=date",
        *extra,
    )
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600),
        ("90s", 90),
        ("30m", 1800),
        ("1h", 3600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("0.5", 0.5),
    ],
)
def test_parse_interval(text: str, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "1x", "h", "1h 30", "-5m", ".5h", "1" * 100_000 + "x", "1." * 50_000 + "h"]
)
def test_parse_interval_rejects(text: str) -> None:
    # The long ones made the pattern backtrack from every digit (minutes); now milliseconds.
    import click

    with pytest.raises(click.BadParameter):
        parse_interval(text)


@pytest.mark.parametrize(
    ("text", "window"), [("8-22", (8, 22)), ("22-6", (22, 6)), (" 0 - 24 ", (0, 24))]
)
def test_parse_hours(text: str, window: tuple[int, int]) -> None:
    assert parse_hours(text) == window


def test_add_prints_the_id_and_saves_every_flag(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli(
        "add",
        "--sys-type",
        "mac_intel",
        "--type",
        "shell",
        "--account",
        "acc",
        "--account-name",
        "Account",
        "--interval",
        "30m",
        "--hours",
        "22-6",
        "--until",
        "2099-01-31",
        "--id",
        "nightly",
        "--kw",
        "command=echo hi",
        "--kw-json",
        "timeout=5",
        "--kw-json",
        "shell=true",
        "--kwargs-json",
        '{"env": {"A": "1"}}',
    )
    assert result.stdout == "nightly\n"
    (task,) = read_state(tmp_path / "store")["tasks"]
    assert task["sys_type"] == "mac_intel"
    assert task["account_name"] == "Account"
    assert task["interval"] == 1800
    assert task["valid_time_range"] == [22, 6]
    assert task["task_end_time"] == "2099-01-31"
    assert task["kwargs"] == {
        "env": {"A": "1"},
        "command": "echo hi",
        "timeout": 5,
        "shell": True,
        "account_id": "acc",
        "account_name": "Account",
        "task_id": "nightly",
        "task_type": "shell",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "0"], "interval"),
        (["--interval", "soon"], "interval"),
        (["--hours", "8-8"], "valid_time_range"),
        (["--hours", "eight"], "hour window"),
        (["--until", "2001-01-01"], "task_end_time"),
        (["--until", "someday"], "date"),
        (["--type", "unknown-type"], "unknown task type"),
        (["--kwargs-json", "[1]"], "JSON object"),
        (["--kw", "novalue"], "key=value"),
        (["--hours", "24-0"], "valid_time_range"),
        (["--interval", "1e-7"], "interval"),
        (["--interval", "0.5"], "interval"),
        (["--until", "20991301"], "date"),
        (["--account", " padded"], "account_id"),
        (["--kw", "status=paused"], "'status' is a task record field"),
        (["--kw", "run_count=3"], "'run_count' is a task record field"),
        (["--kw", "kwargs=x"], "'kwargs' is a task record field"),
        (["--kw", "interval=5"], "'interval' is set with --interval"),
        (["--kw", "account_id=x"], "'account_id' is set with --account"),
        (["--kw-json", "next_execution_time=null"], "'next_execution_time' is a task record"),
        (["--kw-json", "retries=three"], "retries: 'three' is not JSON"),
        (["--kwargs-json", '{"sys_type": "mac"}'], "'sys_type' is set with --sys-type"),
    ],
)
def test_add_rejects_bad_input_with_exit_2(
    cli: Callable[..., Result], tmp_path: Path, args: list[str], message: str
) -> None:
    base = {"--type": "shell", "--account": "acc", "--interval": "1h"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [item for pair in base.items() for item in pair]
    keywords = ("--kw", "--kw-json", "--kwargs-json")
    extra = [a for a in args if a not in flat] if any(k in args for k in keywords) else []
    result = cli("add", *flat, *extra, "--kw", "command=date", expect=2)
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "store" / "dispatch_config.json").exists()


def test_list_filters_and_json(cli: Callable[..., Result]) -> None:
    first = add(cli, "--kw", "api_token=s3cret")
    other = cli(
        "add", "--type", "shell", "--account", "other", "--interval", "1h", "--kw", "command=date"
    ).stdout.strip()
    cli("pause", other)
    table = cli("list").stdout
    assert first in table
    assert other in table
    assert "paused" in table
    only = cli("list", "--account", "acc").stdout
    assert first in only
    assert other not in only
    paused = cli("list", "--status", "paused").stdout
    assert other in paused
    assert first not in paused
    records = orjson.loads(cli("list", "--json").stdout)
    assert {r["task_id"] for r in records} == {first, other}
    by_id = {r["task_id"]: r for r in records}
    assert by_id[first]["kwargs"]["api_token"] == "***"
    assert set(by_id[first]) >= {
        "task_id",
        "account_id",
        "status",
        "interval",
        "valid_time_range",
        "next_execution_time",
        "kwargs",
        "sys_type",
    }
    shown = orjson.loads(cli("list", "--json", "--show-secrets").stdout)
    assert {r["task_id"]: r for r in shown}[first]["kwargs"]["api_token"] == "s3cret"


@pytest.mark.parametrize(("given", "shown"), [("90m", "1h30m"), ("90", "1m30s"), ("36h", "1d12h")])
def test_list_shows_the_interval_as_the_dashboard_does(
    cli: Callable[..., Result], given: str, shown: str
) -> None:
    from scheduler.web.views import task_row
    from tasks.model import TaskRecord

    add(cli, "--interval", given)
    (record,) = orjson.loads(cli("list", "--json").stdout)
    row = task_row(TaskRecord.model_validate(record), SHANGHAI, 0)
    assert row.interval == shown
    (line,) = [line for line in cli("list").stdout.splitlines() if record["task_id"] in line]
    assert f" {shown} " in line
    assert parse_interval(shown) == record["interval"]  # what --interval reads back


@pytest.mark.parametrize("paused", [False, True])
def test_show_previews_the_runs_the_dashboards_task_page_shows(
    clock: Any, cli: Callable[..., Result], paused: bool
) -> None:
    """One preview and one time format: ``show`` and the task page list the same runs,
    under the same label (a paused task's "if resumed now")."""
    from scheduler.web.views import next_runs
    from tasks.display import format_time
    from tasks.model import TaskRecord

    task_id = add(cli, "--hours", "8-22", "--interval", "5400")
    if paused:
        cli("pause", task_id)
    (data,) = orjson.loads(cli("list", "--json").stdout)
    record = TaskRecord.model_validate(data, context={"zone": SHANGHAI})
    label, runs = next_runs(record, SHANGHAI, datetime.now(SHANGHAI), 4)
    assert label == ("if resumed now" if paused else "next runs")
    page = [format_time(run, SHANGHAI) for run in runs]
    assert page[:2] == ["2026-01-08 08:00:00", "2026-01-08 09:30:00"]  # 07:00 now, every 1h30m
    shown = cli("show", task_id, "--runs", "4").stdout.splitlines()
    start = next(i for i, line in enumerate(shown) if line.strip().startswith(f"{label}:"))
    assert [line.split(": ", 1)[-1].strip() for line in shown[start : start + 4]] == page


def test_list_on_an_empty_store_says_how_to_add(cli: Callable[..., Result]) -> None:
    assert "add --type shell" in cli("list").stdout


def test_show_previews_the_next_runs_with_window_and_end(cli: Callable[..., Result]) -> None:
    task_id = add(cli, "--hours", "8-22", "--interval", "6h", "--kw", "password=hunter2")
    output = cli("show", task_id).stdout
    assert f"task_id: {task_id}" in output
    assert "hunter2" not in output
    assert '"password":"***"' in output
    times = re.findall(r"\d{4}-\d\d-\d\d (\d\d):\d\d:\d\d", output.split("next runs:")[1])
    assert len(times) == 5
    assert all(8 <= int(hour) < 22 for hour in times)
    cli("pause", task_id)
    assert "if resumed now:" in cli("show", task_id).stdout


def test_show_respects_the_end_date(cli: Callable[..., Result], tmp_path: Path) -> None:
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    tomorrow = (datetime.now(ZoneInfo("Asia/Shanghai")) + timedelta(days=1)).date().isoformat()
    task_id = add(cli, "--interval", "1d", "--until", tomorrow)
    tail = cli("show", task_id).stdout.split("next runs:")[1]
    assert 1 <= len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", tail)) <= 2


def test_pause_resume_reorder_remove(cli: Callable[..., Result], tmp_path: Path) -> None:
    first, second = add(cli), add(cli)
    assert cli("pause", first).stdout.strip() == f"{first}: paused"
    assert read_state(tmp_path / "store")["tasks"][0]["status"] == "paused"
    assert cli("resume", first).stdout.startswith(f"{first}: pending, next run")
    assert cli("reorder", second, "0").stdout.strip() == f"acc: {second} {first}"
    assert read_state(tmp_path / "store")["account_tasks"] == {"acc": [second, first]}
    assert cli("remove", first).stdout.strip() == f"{first}: removed"
    assert [t["task_id"] for t in read_state(tmp_path / "store")["tasks"]] == [second]


@pytest.mark.parametrize(
    "command",
    [
        ["pause", "nope"],
        ["resume", "nope"],
        ["remove", "nope"],
        ["reorder", "nope", "0"],
        ["show", "nope"],
    ],
)
def test_unknown_ids_exit_2_with_one_line(cli: Callable[..., Result], command: list[str]) -> None:
    add(cli)
    result = cli(*command, expect=2)
    assert result.stderr.count("\n") == 1
    assert "nope" in result.stderr


def test_reorder_out_of_range_exits_2(cli: Callable[..., Result]) -> None:
    task_id = add(cli)
    assert "position" in cli("reorder", task_id, "4", expect=2).stderr


def test_validate_reports_every_problem_and_changes_nothing(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    good = add(cli)
    path = tmp_path / "store" / "dispatch_config.json"
    assert cli("validate").stdout.strip().endswith(": ok")
    document = orjson.loads(path.read_bytes())
    document["tasks"][0]["interval"] = -1
    document["tasks"][0]["status"] = "sleeping"
    document["tasks"].append(
        {**document["tasks"][0], "task_id": "twin", "interval": 5, "status": "pending"}
    )
    document["account_tasks"]["acc"].append("ghost")
    broken = orjson.dumps(document)
    path.write_bytes(broken)
    result = cli("validate", expect=1)
    assert f"task {good}: interval: must be positive" in result.stdout
    assert f"task {good}: status:" in result.stdout
    assert "task twin: account_id: not listed in account_tasks" in result.stdout
    assert "account_tasks: acc: lists ghost" in result.stdout
    assert path.read_bytes() == broken
    other = tmp_path / "other.json"
    other.write_text("{nope")
    assert "not valid JSON" in cli("validate", str(other), expect=1).stdout


def test_options_after_the_command_and_from_the_environment(tmp_path: Path) -> None:
    directory = tmp_path / "elsewhere"
    result = CliRunner().invoke(
        main,
        [
            "add",
            "--dir",
            str(directory),
            "--type",
            "shell",
            "--account",
            "a",
            "--interval",
            "1h",
            "--kw",
            "command=date",
        ],
    )
    assert result.exit_code == 0, result.output
    listed = CliRunner(env={"TASK_DISPATCHER_DIR": str(directory)}).invoke(main, ["list", "--json"])
    assert [r["task_id"] for r in orjson.loads(listed.stdout)] == [result.stdout.strip()]


def add_host_task(directory: Path, *extra: str) -> Result:
    """Add an ``xhs_type`` task through the host factory ``helpers:recording_factory``."""
    args = [
        "--dir",
        str(directory),
        "--factory",
        "helpers:recording_factory",
        "add",
        "--type",
        "xhs_type",
        "--account",
        "a",
        "--interval",
        "1h",
        *extra,
    ]
    return CliRunner().invoke(main, args)


def test_a_host_factory_by_import_path(tmp_path: Path) -> None:
    directory = tmp_path / "host"
    recording_factory.created.clear()
    result = add_host_task(directory)
    assert result.exit_code == 0, result.output
    assert recording_factory.created[0]["task_type"] == "xhs_type"
    bad = CliRunner().invoke(main, ["--dir", str(directory), "--factory", "nowhere:thing", "list"])
    assert bad.exit_code == 0  # read-only commands never import the factory
    bad = CliRunner().invoke(
        main,
        [
            "--dir",
            str(directory),
            "--factory",
            "nowhere:thing",
            "add",
            "--type",
            "x",
            "--account",
            "a",
            "--interval",
            "1h",
        ],
    )
    assert bad.exit_code == 2
    assert "nowhere" in bad.stderr


def test_editing_host_tasks_needs_no_factory(tmp_path: Path) -> None:
    directory = tmp_path / "host"
    assert add_host_task(directory, "--id", "h1").exit_code == 0
    result = CliRunner().invoke(main, ["--dir", str(directory), "pause", "h1"])
    assert result.exit_code == 0, result.output
    assert read_state(directory)["tasks"][0]["status"] == "paused"
    assert read_state(directory)["tasks"][0]["kwargs"]["task_type"] == "xhs_type"


def test_modifying_commands_refuse_while_the_directory_is_owned(
    cli: Callable[..., Result], tmp_path: Path, recorder: Any
) -> None:
    task_id = add(cli)
    owner = TaskDispatcher(tmp_path / "store", timezone="Asia/Shanghai")
    try:
        for command in (["pause", task_id], ["remove", task_id], ["reorder", task_id, "0"]):
            result = cli(*command, expect=2)
            assert "in use by another dispatcher" in result.stderr
            assert str(tmp_path / "store") in result.stderr
        assert task_id in cli("list").stdout
        assert task_id in cli("show", task_id).stdout
        assert cli("validate").exit_code == 0
    finally:
        owner.close()
    cli("pause", task_id)


def test_kw_values_are_strings_and_kw_json_values_are_typed(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    cli(
        "add", "--type", "shell", "--account", "acc", "--interval", "1h", "--id", "t",
        "--kw", "command=true", "--kw", "api_token=123456", "--kw", "note=[1]",
        "--kw-json", "retries=3", "--kw-json", "flags=[1, true]", "--kw-json", "shell=false",
    )  # fmt: skip
    kwargs = read_state(tmp_path / "store")["tasks"][0]["kwargs"]
    assert kwargs["command"] == "true"
    assert kwargs["api_token"] == "123456"
    assert kwargs["note"] == "[1]"
    assert (kwargs["retries"], kwargs["flags"], kwargs["shell"]) == (3, [1, True], False)


def test_until_in_compact_form_is_a_whole_day(cli: Callable[..., Result], tmp_path: Path) -> None:
    add(cli, "--until", "20990101")
    assert read_state(tmp_path / "store")["tasks"][0]["task_end_time"] == "2099-01-01"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "--account", "a", "--interval", "1h"], "Missing option '--type'"),
        (["add", "--nope"], "No such option '--nope'"),
        (["list", "--status", "sleeping"], "Invalid value for '--status'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["--nope", "list"], "No such option '--nope'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    cli: Callable[..., Result], args: list[str], message: str
) -> None:
    result = cli(*args, expect=2)
    assert result.stderr.startswith("task-dispatcher: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def test_reorder_to_a_negative_position_is_a_range_error(cli: Callable[..., Result]) -> None:
    task_id = add(cli)
    result = cli("reorder", task_id, "-1", expect=2)
    assert "position: must be from 0 to 0 for account 'acc'" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "command", [["pause", "t"], ["resume", "t"], ["remove", "t"], ["reorder", "t", "0"]]
)
def test_editing_a_mistyped_directory_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    typo = tmp_path / "stroe"
    result = CliRunner().invoke(main, ["--dir", str(typo), *command])
    assert result.exit_code == 2
    assert f"no dispatcher directory '{typo}'" in result.stderr
    assert not typo.exists()


def test_validate_reports_what_cannot_run_as_written(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    first, second = add(cli, "--id", "first"), add(cli, "--id", "second")
    path = tmp_path / "store" / "dispatch_config.json"
    document = orjson.loads(path.read_bytes())
    document["timezone"] = "Mars/Olympus"
    document["tasks"][0]["kwargs"]["sys_type"] = "mac"
    document["tasks"][0]["kwargs"]["status"] = "paused"
    document["tasks"][1]["kwargs"]["task_id"] = first
    path.write_bytes(orjson.dumps(document))
    result = CliRunner().invoke(main, ["--dir", str(tmp_path / "store"), "validate"])
    assert result.exit_code == 1
    assert "file: timezone: unknown time zone 'Mars/Olympus'" in result.stdout
    assert f"task {first}: kwargs.sys_type: is a record field" in result.stdout
    assert f"task {first}: kwargs.status: is a record field" in result.stdout
    assert f"task {second}: kwargs.task_id: names task '{first}', not this task" in result.stdout


def test_list_and_show_mark_a_past_next_run_as_overdue(
    clock: Any, cli: Callable[..., Result]
) -> None:
    from helpers import at

    task_id = add(cli, "--hours", "8-22")  # at 07:00: first run 08:00
    clock.move_to(at(2026, 1, 8, 9, 30))
    assert "08:00:00 (overdue: runs as soon as the dispatcher runs)" in cli("list").stdout
    assert "overdue: runs as soon as the dispatcher runs" in cli("show", task_id).stdout
    clock.move_to(at(2026, 1, 8, 23, 0))
    expected = "overdue: outside its hours now, next run 2026-01-09 08:00:00"
    assert expected in cli("list").stdout
    assert expected in cli("show", task_id).stdout
    clock.move_to(at(2026, 1, 8, 7, 30))
    assert "overdue" not in cli("list").stdout


def test_list_and_show_say_when_a_jittered_run_really_starts(
    clock: Any, cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers import at

    monkeypatch.setattr("random.random", lambda: 0.5)
    task_id = add(cli, "--hours", "8-22", "--policy", "jitter=1200")  # 08:00, starts 08:10
    clock.move_to(at(2026, 1, 8, 8, 5))  # planned time past, drawn start ahead
    listed, shown = cli("list").stdout, cli("show", task_id).stdout
    assert "08:00:00 (jittered: starts 2026-01-08 08:10:00)" in listed
    assert "jittered: starts 2026-01-08 08:10:00" in shown
    assert "overdue" not in listed + shown
    clock.move_to(at(2026, 1, 8, 8, 15))  # the start passed too: overdue
    assert "08:00:00 (overdue: runs as soon as the dispatcher runs)" in cli("list").stdout


# ---------------------------------------------------------------------- update and policies


def test_update_changes_a_task_in_place(cli: Callable[..., Result], tmp_path: Path) -> None:
    task_id = add(cli, "--policy", "retries=2", "--policy", "jitter=0")
    result = cli(
        "update",
        task_id,
        "--interval",
        "2h",
        "--hours",
        "9-21",
        "--until",
        "2099-01-31",
        "--kw",
        "command=echo again",
        "--policy",
        "run_timeout=30",
    )
    assert result.stdout.startswith(f"{task_id}: pending, next run ")
    shown = json.loads(cli("list", "--json").stdout)[0]
    assert shown["interval"] == 7200
    assert shown["valid_time_range"] == [9, 21]
    assert shown["task_end_time"] == "2099-01-31"
    assert shown["kwargs"]["command"] == "echo again"
    assert shown["kwargs"]["account_id"] == "acc"
    assert shown["run_policy"]["retries"] == 2
    assert shown["run_policy"]["run_timeout"] == 30
    cli("update", task_id, "--no-end")
    assert json.loads(cli("list", "--json").stdout)[0]["task_end_time"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--interval", "0"), "interval"),
        (("--policy", "retries=-1"), "run_policy.retries"),
        (("--policy", "retires=1"), "run_policy.retires"),
        ((), "nothing to change"),
        (("--until", "2099-01-01", "--no-end"), "not both"),
    ],
)
def test_update_rejects_bad_input_with_exit_2(
    cli: Callable[..., Result], args: tuple[str, ...], message: str
) -> None:
    task_id = add(cli)
    result = cli("update", task_id, *args, expect=2)
    assert message in result.stderr


def test_update_of_an_unknown_task(cli: Callable[..., Result]) -> None:
    add(cli)
    assert "nope" in cli("update", "nope", "--interval", "1h", expect=2).stderr


def test_run_refuses_a_bad_notify_url(cli: Callable[..., Result]) -> None:
    add(cli)
    result = cli("run", "--no-live", "--notify-url", "ftp://x", expect=2)
    assert "url" in result.stderr


def test_show_previews_jittered_runs_as_spans(cli: Callable[..., Result]) -> None:
    task_id = add(cli, "--policy", "jitter=300")
    shown = cli("show", task_id, "--runs", "3").stdout
    assert "(jittered from " in shown
    spans = re.findall(r"between (\S+ \S+) and (\S+ \S+)", shown)
    assert len(spans) == 2, shown
    for start, end in spans:
        gap = datetime.fromisoformat(end) - datetime.fromisoformat(start)
        assert gap == timedelta(minutes=5)


def test_an_answer_of_an_unknown_shape_is_one_line_not_a_pydantic_report(
    cli: Callable[..., Result],
) -> None:
    # A real listener answering a task request with something else (another version, a
    # proxy): the command says what is wrong in one line.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"tasks": [], "total": 0}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = cli("--url", url, "show", "t1", expect=2)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    assert result.stderr == "task-dispatcher: error: unexpected data: task_id: Field required\n"
