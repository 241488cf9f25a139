"""The systemd units in ``deploy/systemd``: every command they start parses, with the options
the example environment files give (a unit naming an option that does not exist fails)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.cli import main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNITS = {
    "task-dispatcher@.service": ("dispatcher.env.example", "default"),
    "task-dispatcher-worker@.service": ("worker.env.example", "mac_intel"),
}


def environment(name: str) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (DEPLOY / name).read_text().splitlines()
        if line and not line.startswith("#")
    )
    return dict(pairs)


@pytest.mark.parametrize("unit", list(UNITS))
def test_the_unit_starts_a_command_that_parses(unit: str) -> None:
    env_file, instance = UNITS[unit]
    text = (DEPLOY / unit).read_text()
    assert "EnvironmentFile=/etc/task-dispatcher/" in text
    (start,) = re.findall(r"^ExecStart=(.+)$", text, re.MULTILINE)
    env = environment(env_file)
    command = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], start)
    command = command.replace("%i", instance).replace("%H", "host-a")
    program, *args = shlex.split(command)
    assert program.endswith("/task-dispatcher")
    result = CliRunner().invoke(main, [*args, "--help"], env=env)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
