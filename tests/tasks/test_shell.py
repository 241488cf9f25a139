"""The built-in shell task type."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tasks import ShellTask, ShellTaskError, default_registry


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
