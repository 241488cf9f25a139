"""The documentation site: it builds strictly, and every example on it runs as shown.

Every ``python`` block on a page (and in the README) is a complete program, run in a fresh
directory with a bounded time. Every ``console`` block is a shell session: each ``$`` command
runs in one fresh directory per block, and its output must match what the page shows, with
times and dates compared by shape only. A block that cannot run here (it needs another host,
a broker, or runs until stopped) says so in an ``<!-- illustration: why -->`` line just above
it. A session whose output depends on the hour says the instant and zone it was taken at in a
``<!-- clock: 2026-11-30T01:04:18+08:00 Asia/Shanghai -->`` line: its commands run with the
clock set there (one second later for each command), so the hour windows decide as shown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from browser import DOC_PICTURES
from fleet_support import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

FOREVER = "await asyncio.Event().wait()"
"""A host's "the application runs here" line: the examples run it for a bounded while."""
BOUNDED = "await asyncio.sleep(2)"

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!-- (illustration|clock): (.+\S) -->$")
_EXIT = re.compile(r"^\(exit status (\d+)\)$")
# Times, dates and durations change from run to run: they are compared by shape.
_TIMES = re.compile(
    r"\d{4}-\d\d-\d\d(?:[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?)?|\d\d:\d\d:\d\d"
)

DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[web]' && "
    ".venv/bin/task-dispatcher --dir demo-dispatcher run --demo --listen 127.0.0.1:8765"
)
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest"
)


@dataclass(frozen=True)
class Block:
    """A fenced code block: its page, first line number, language, text and marker."""

    page: Path
    line: int
    language: str
    text: str
    illustration: str | None
    clock: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"{page}:{index + 1}: a code block is never closed"
        above = lines[index - 1] if index else ""
        marker = _MARKER.match(above)
        kind, value = marker.groups() if marker else (None, None)
        found.append(
            Block(
                page,
                index + 1,
                opening.group(1),
                "\n".join(lines[index + 1 : end]) + "\n",
                value if kind == "illustration" else None,
                value if kind == "clock" else None,
            )
        )
        index = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
PYTHON = [block for block in ALL_BLOCKS if block.language == "python"]
CONSOLE = [block for block in ALL_BLOCKS if block.language == "console" and not block.illustration]


def environment() -> dict[str, str]:
    """The examples' environment: this interpreter's scripts first, no dispatcher settings."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("TASK_DISPATCHER")
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(ROOT)
    # A wide terminal, as the pages show tables.
    env["COLUMNS"] = "200"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_the_pages_have_examples() -> None:
    assert len(PYTHON) >= 10
    assert len(CONSOLE) >= 1
    for block in ALL_BLOCKS:
        if block.illustration is not None:
            assert block.language == "console", f"{block.name}: only console blocks are shown unrun"


@pytest.mark.parametrize("block", PYTHON, ids=[block.name for block in PYTHON])
@pytest.mark.timeout(180)
def test_python_example_runs(block: Block, tmp_path: Path) -> None:
    source = block.text
    if FOREVER in source:
        # The host application would run here until stopped: the example runs it for a while.
        assert source.count(FOREVER) == 1, block.name
        source = source.replace(FOREVER, BOUNDED)
    env = environment()
    broker: RedisServer | None = None
    if "TASK_DISPATCHER_BROKER" in source:
        # The fleet's examples take their broker from the environment: a Redis of their own.
        broker = RedisServer(tmp_path).start()
        env["TASK_DISPATCHER_BROKER"] = broker.url()
    script = tmp_path / "example.py"
    script.write_text(source, encoding="utf-8")
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
    finally:
        if broker is not None:
            broker.kill()
    assert result.returncode == 0, f"{block.name}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"{block.name}\n{result.stderr}"


def session(block: Block) -> list[tuple[str, list[str], int]]:
    """The commands of a console block, each with the output and exit status shown."""
    steps: list[tuple[str, list[str], int]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], [], 0))
        elif (exit_status := _EXIT.match(line)) is not None:
            command, output, _ = steps[-1]
            steps[-1] = (command, output, int(exit_status.group(1)))
        else:
            assert steps, f"{block.name}: output before any command"
            steps[-1][1].append(line)
    return steps


def shape(lines: list[str]) -> list[str]:
    """Lines with every time replaced by its shape (digits as 9), trailing blanks dropped."""
    shaped = [_TIMES.sub(lambda m: re.sub(r"\d", "9", m.group()), line).rstrip() for line in lines]
    while shaped and not shaped[-1]:
        shaped.pop()
    return shaped


_CLOCKED = """import os, sys
from freezegun import freeze_time
with freeze_time(os.environ["DOCS_CLOCK"], tick=True, real_asyncio=True):
    from scheduler.cli import main
    sys.argv[0] = "task-dispatcher"
    main()
"""


def clocked(block: Block, bin_dir: Path) -> tuple[datetime, dict[str, str]]:
    """The block's start instant, and an environment whose ``task-dispatcher`` runs with
    the clock set by ``$DOCS_CLOCK`` in the block's zone."""
    assert block.clock is not None
    instant, zone = block.clock.split()
    bin_dir.mkdir()
    (bin_dir / "clocked.py").write_text(_CLOCKED, encoding="utf-8")
    shim = bin_dir / "task-dispatcher"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{bin_dir / "clocked.py"}" "$@"\n')
    shim.chmod(0o755)
    env = environment()
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    env["TZ"] = zone
    return datetime.fromisoformat(instant), env


@pytest.mark.parametrize("block", CONSOLE, ids=[block.name for block in CONSOLE])
@pytest.mark.timeout(300)
def test_console_example_runs_as_shown(block: Block, tmp_path: Path) -> None:
    env = environment()
    start: datetime | None = None
    if block.clock is not None:
        start, env = clocked(block, tmp_path / "bin")
    work = tmp_path / "work"
    work.mkdir()
    for step, (command, shown, status) in enumerate(session(block)):
        if start is not None:
            env["DOCS_CLOCK"] = (start + timedelta(seconds=step)).isoformat()
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = (result.stdout + result.stderr).splitlines()
        where = f"{block.name}: $ {command}\n{result.stdout}{result.stderr}"
        assert result.returncode == status, where
        assert shape(output) == shape(shown), where


@pytest.mark.timeout(300)
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link, a missing picture or an unresolved API reference fails the build."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**environment(), "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads((site / "openapi.json").read_text(encoding="utf-8"))
    assert "/api/v1/tasks" in document["paths"]
    reference = (site / "reference" / "scheduler" / "index.html").read_text(encoding="utf-8")
    assert 'id="scheduler.TaskDispatcher.add_task"' in reference


async def test_the_openapi_document_is_the_served_one(tmp_path: Path) -> None:
    """The site's OpenAPI document is what a dispatcher serves at ``/openapi.json``."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    import httpx

    from scheduler import TaskDispatcher

    document = hooks.openapi_document()
    async with TaskDispatcher(tmp_path / "store", timezone="UTC", history=False) as dispatcher:
        transport = httpx.ASGITransport(app=dispatcher.control_app())
        headers = {"Authorization": f"Bearer {dispatcher.control_token}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=headers
        ) as client:
            served = (await client.get("/openapi.json")).json()
    assert document == served
    table = hooks.endpoint_table(document)
    for path in document["paths"]:
        assert f"`{path}`" in table


def test_the_readme_is_a_front_page() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 125
    # The two commands, exactly as CI and a newcomer run them.
    assert DEMO_COMMAND in text
    assert TEST_COMMAND in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing {target}"


def test_the_dashboard_pictures_are_there_and_shown() -> None:
    """The browser tests write these pictures; the pages must show each one, and a fresh
    clone must have them (a page showing a missing picture also fails the strict build)."""
    shown = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    for picture in DOC_PICTURES.values():
        assert picture.is_file(), f"{picture.relative_to(ROOT)} is missing"
        assert picture.relative_to(DOCS).as_posix() in shown, f"no page shows {picture.name}"
