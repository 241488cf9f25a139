"""The built-in shell task type."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from tasks import ShellTask, ShellTaskError, default_registry
from tasks.shell import OUTPUT_LOGGER


def shell_task(**kwargs: object) -> ShellTask:
    return ShellTask(sys_type="local", task_id="t", **kwargs)  # type: ignore[arg-type]


async def test_a_successful_command(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    await shell_task(command=["touch", str(marker)]).run()
    assert marker.exists()


async def test_a_string_command_is_split_without_a_shell(tmp_path: Path) -> None:
    await shell_task(command=f"touch '{tmp_path}/a b'").run()
    assert (tmp_path / "a b").exists()


async def test_shell_true_runs_through_the_shell(tmp_path: Path) -> None:
    await shell_task(command=f"echo hi > {tmp_path}/out", shell="true", cwd=str(tmp_path)).run()
    assert (tmp_path / "out").read_text() == "hi\n"


async def test_a_non_zero_exit_fails_with_status_and_stderr_tail() -> None:
    task = shell_task(
        command=[
            sys.executable,
            "-c",
            "import sys; sys.stderr.write('x' * 900 + 'END'); sys.exit(3)",
        ]
    )
    with pytest.raises(ShellTaskError, match=r"exit status 3; stderr: \.\.\.x+END$") as raised:
        await task.run()
    assert len(str(raised.value)) < 600


async def test_a_timeout_fails_the_run() -> None:
    task = shell_task(
        command=[
            sys.executable,
            "-c",
            "import sys, time; sys.stderr.write('slow'); sys.stderr.flush(); time.sleep(30)",
        ],
        timeout=0.5,
    )
    with pytest.raises(ShellTaskError, match=r"timed out after 0\.5s; stderr: slow"):
        await task.run()


async def test_env_is_added() -> None:
    task = shell_task(command='test "$DEMO" = yes', shell=True, env={"DEMO": "yes"})
    await task.run()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "command"),
        ({"command": ""}, "command"),
        ({"command": 5}, "command"),
        ({"command": "date", "shell": "maybe"}, "shell"),
        ({"command": "date", "timeout": -1}, "timeout"),
    ],
)
def test_bad_kwargs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shell_task(**kwargs)


def test_shell_is_registered() -> None:
    assert "shell" in default_registry
    manager = default_registry(sys_type="local", task_type="shell", task_id="t", command="date")
    assert isinstance(manager, ShellTask)


async def test_what_a_run_printed_is_logged_masked_bounded_on_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = (
        "print('x' * 100_000); print('ok password=hunter2 \\x1b[31mred'); "
        "print('https://me:pa55@example.com/ done')"
    )
    with caplog.at_level(logging.DEBUG, logger=OUTPUT_LOGGER):
        await shell_task(command=[sys.executable, "-c", script]).run()
    (line,) = [r.getMessage() for r in caplog.records if r.name == OUTPUT_LOGGER]
    assert line.startswith("task t printed: ...")
    assert line.endswith("ok password=*** ?[31mred | https://me:***@example.com/ done")
    assert "hunter2" not in line
    assert "pa55" not in line
    assert len(line) < 600


async def test_nothing_printed_is_nothing_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=OUTPUT_LOGGER):
        await shell_task(command="true").run()
    assert not [r for r in caplog.records if r.name == OUTPUT_LOGGER]
