"""Lint, format and strict typing are part of the test suite: one command checks everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
@pytest.mark.timeout(300)
def test_tooling_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _collected(*options: str) -> set[str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *options,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}


@pytest.mark.timeout(300)
def test_the_quick_loop_holds_the_in_process_tests_only() -> None:
    """``pytest -m unit`` leaves out every test that starts a browser, a server or a process,
    and keeps the rest; without ``-m`` every test is collected."""
    unit, everything = _collected("-m", "unit"), _collected()
    assert {
        "tests/tasks/test_model.py",
        "tests/jobstores/test_loading.py",
        "tests/reliability/test_fuzz_loader.py",
        "tests/scheduler/test_dispatcher.py",
        "tests/scheduler/web/test_pages.py",
    } <= unit
    out_of_process = {
        "tests/fleet/test_backend.py",
        "tests/fleet/test_dispatcher_e2e.py",
        "tests/fleet/test_wire.py",
        "tests/reliability/test_crash.py",
        "tests/reliability/test_soak.py",
        "tests/scheduler/test_cli_process.py",
        "tests/scheduler/test_control_process.py",
        "tests/scheduler/web/test_browser.py",
        "tests/test_docs.py",
        "tests/test_quality.py",
    }
    assert out_of_process <= everything
    assert not out_of_process & unit
