"""The code's shape, checked on every module: imports only point down, no circle of files,
no class grows past about 300 lines.

An import is every ``import`` / ``from ... import`` anywhere in a module: at the top, inside a
function (a lazy import is still a dependency, taken later) and under ``if TYPE_CHECKING:``.
Type-checking imports count because mypy, run on every commit, reads them: a module that names
another's class in its annotations cannot be understood, checked or changed without it, so a
circle through an annotation is as much a circle of files as any other, only hidden from the
interpreter. A literal ``importlib.import_module("pkg.mod")`` counts too.

An import names the module it reads from (``from tasks import lifecycle`` reads
``tasks.lifecycle``, ``from scheduler.control import NOT_SAVED`` reads the package's
``__init__``). The parent packages Python runs first are not counted: a package's ``__init__``
re-exports its modules, so counting them would make every package a circle.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "scheduler", "jobstores", "tasks")
"""The project's top-level packages (``tests`` and ``docs`` are not layered)."""

# The layers, top to bottom. A module may import modules of its own row and of the rows below
# it, never above; each module belongs to exactly one row (``*``: any module of a package).
# docs/development.md ("Layout") and the README describe them.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # --- interfaces: what users run or mount, each over the layers below
    ("tools",              ("bench", "bench.*")),
    ("package front",      ("scheduler", "scheduler.__main__")),
    # the fleet's commands (``worker``, the broker options of ``run``) live in its folder
    ("cli",                ("scheduler.cli", "scheduler.cli_*", "scheduler.fleet.cli")),
    # The fleet (scheduler/fleet/) is beside serving (neither imports the other); a table puts
    # it above. ``scheduler.worker`` names its Celery app at the documented path, and
    # ``scheduler.backends`` lends ``CeleryRunBackend`` on first use.
    ("fleet",              ("scheduler.fleet", "scheduler.fleet.backend", "scheduler.fleet.lease",
                            "scheduler.fleet.outage", "scheduler.fleet.publish",
                            "scheduler.fleet.stream", "scheduler.fleet.watch",
                            "scheduler.fleet.roster", "scheduler.fleet.openruns",
                            "scheduler.fleet.worker", "scheduler.fleet.wire", "scheduler.worker",
                            "scheduler.backends")),
    # TaskDispatcher: the dispatcher with its control plane, over control/ and web/
    ("serve",              ("scheduler.serve",)),
    ("web",                ("scheduler.web", "scheduler.web.*")),
    ("control",            ("scheduler.control", "scheduler.control.*")),
    # --- scheduler: the facade, and what it wires
    ("dispatcher",         ("scheduler.dispatcher", "scheduler.facade")),
    # the facade's parts: the API's changes and their save policy, start and stop, the run
    # path (with the handoff of runs onto the loop), the relay of events
    ("dispatcher parts",   ("scheduler.parts", "scheduler.changes", "scheduler.saving",
                            "scheduler.lifetime", "scheduler.runpath", "scheduler.handoff",
                            "scheduler.relay")),
    ("runner",             ("scheduler.runner",)),
    ("runs and observers", ("scheduler.ledger", "scheduler.lanes", "scheduler.engine",
                            "scheduler.intake", "scheduler.retries", "scheduler.listeners",
                            "scheduler.history", "scheduler.metrics", "scheduler.runs",
                            "scheduler.leadership")),
    ("local backend",      ("scheduler.backends.local",)),
    # executing one request into its finishing event: the local backend's and the worker's
    ("run execution",      ("scheduler.backends.execution",)),
    ("re-exported names",  ("scheduler.errors", "scheduler.triggers")),
    # --- persistence, then plain data and pure rules
    ("jobstores",          ("jobstores", "jobstores.*")),
    ("tasks",              ("tasks", "tasks.*")),
)  # fmt: skip

CLASS_LINES = 300
"""About where a class holds more than one job."""

# Classes over CLASS_LINES today, each with its length now: the list only shrinks. A class
# may not grow past its number, one that shrank is listed at its new length, and one split
# below the limit (or gone) must leave the list.
BIG_CLASSES: dict[str, int] = {}


@dataclass(frozen=True)
class Import:
    """One import statement's reading of one project module."""

    importer: str
    target: str
    path: str
    line: int
    text: str
    where: str
    """``top``, ``in a function`` or ``for type checking``."""

    def __str__(self) -> str:
        return f"{self.path}:{self.line} `{self.text}` ({self.where})"


def module_paths() -> dict[str, Path]:
    """Every project module by dotted name."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_paths()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, where: str = "top") -> Iterator[tuple[ast.AST, str]]:
    """``node`` and every node under it, each with where it sits (the innermost context wins)."""
    yield node, where
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        where = "in a function"
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for statement in node.body:
            yield from _walk(statement, "for type checking")
        for statement in node.orelse:
            yield from _walk(statement, where)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, where)


def _targets(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The project modules one node reads from."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolved against the importer's package
            package = importer.split(".")
            base = package if is_package else package[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join([*base, *([node.module] if node.module else [])])
        else:
            module = node.module or ""
        names = [
            f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
            for alias in node.names
        ]
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        names = [node.args[0].value]
    else:
        return []
    return sorted({name for name in names if name in MODULES})


def imports_in(importer: str, source: str, path: str, is_package: bool) -> list[Import]:
    """Every import of a project module in ``source``, the text of module ``importer``."""
    found: list[Import] = []
    for node, where in _walk(ast.parse(source)):
        for target in _targets(node, importer, is_package):
            text = " ".join((ast.get_source_segment(source, node) or "").split())
            found.append(Import(importer, target, path, getattr(node, "lineno", 0), text, where))
    return found


def project_imports() -> list[Import]:
    """Every import of a project module by a project module."""
    return [
        found
        for importer, path in MODULES.items()
        for found in imports_in(
            importer,
            path.read_text(encoding="utf-8"),
            str(path.relative_to(ROOT)),
            path.name == "__init__.py",
        )
    ]


IMPORTS = project_imports()


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` (0 is the top) of the one row naming ``module``."""
    rows = [
        index
        for index, (_, patterns) in enumerate(LAYERS)
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)
    ]
    assert len(rows) == 1, (
        f"{module} is in {len(rows)} rows of LAYERS ({[LAYERS[i][0] for i in rows]}): "
        "give it exactly one"
    )
    return rows[0]


def test_every_module_has_one_layer_and_every_row_names_a_module() -> None:
    for module in MODULES:
        layer_of(module)
    stale = [
        pattern
        for _, patterns in LAYERS
        for pattern in patterns
        if not any(fnmatch.fnmatchcase(module, pattern) for module in MODULES)
    ]
    assert stale == [], f"rows of LAYERS that name no module: {stale}"


def upward(imports: list[Import]) -> list[str]:
    """One line per import reading a module of a higher layer than its importer's."""
    return [
        f"{found}: {found.importer} ({LAYERS[layer_of(found.importer)][0]}) imports "
        f"{found.target} ({LAYERS[layer_of(found.target)][0]}), a layer above it"
        for found in imports
        if layer_of(found.target) < layer_of(found.importer)
    ]


def test_imports_only_point_down() -> None:
    wrong = upward(IMPORTS)
    assert not wrong, "imports running up the layers:\n" + "\n".join(wrong)


def cycles(imports: list[Import]) -> list[list[Import]]:
    """Circles of files: one per edge closing a circle in a depth-first walk of the graph,
    as the chain of imports that goes round it (every circle has at least one)."""
    edges: dict[str, list[Import]] = {}
    for found in imports:
        if found.target != found.importer:
            edges.setdefault(found.importer, []).append(found)
    found_cycles: list[list[Import]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Import] = []

    def visit(module: str) -> None:
        state[module] = 1
        for edge in edges.get(module, []):
            if state.get(edge.target) == 1:
                start = next(i for i, step in enumerate(path) if step.importer == edge.target)
                found_cycles.append([*path[start:], edge] if path else [edge])
            elif edge.target not in state:
                path.append(edge)
                visit(edge.target)
                path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return found_cycles


def test_no_circle_of_files() -> None:
    found = cycles(IMPORTS)
    described = [
        " -> ".join([circle[0].importer, *(step.target for step in circle)])
        + "\n"
        + "\n".join(f"    {step}" for step in circle)
        for circle in found
    ]
    assert not found, f"{len(found)} circle(s) of files:\n" + "\n".join(described)


EXTRAS = frozenset({"fastapi", "starlette", "uvicorn", "httpx", "prometheus_client", "jinja2",
                    "celery", "kombu", "redis"})  # fmt: skip
"""What the optional extras (``control``, ``web``, ``celery``) install."""


def loaded_by(module: str) -> set[str]:
    """The modules importing ``module`` runs before it returns: its top-level (not lazy, not
    type-checking) imports, and the packages above each module reached, transitively."""
    top: dict[str, set[str]] = {}
    for found in IMPORTS:
        if found.where == "top":
            top.setdefault(found.importer, set()).add(found.target)
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for reached in [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if reached not in seen:
                seen.add(reached)
                todo.extend(top.get(reached, ()))
    return seen


@functools.cache
def libraries_imported_at_top(module: str) -> frozenset[str]:
    """The top-level names of the outside libraries ``module`` imports as it loads."""
    names: set[str] = set()
    for node, where in _walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if where != "top":
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return frozenset(names - set(PACKAGES))


def test_the_package_imports_no_extra() -> None:
    """``import scheduler`` (``TaskDispatcher`` with its serving methods included) and the
    command line work without the extras: serving imports their libraries when used."""
    for entry in ("scheduler", "scheduler.cli"):
        wrong = {
            module: sorted(libraries_imported_at_top(module) & EXTRAS)
            for module in sorted(loaded_by(entry))
            if libraries_imported_at_top(module) & EXTRAS
        }
        assert wrong == {}, f"importing {entry} loads an extra's library: {wrong}"


def class_lengths() -> dict[str, int]:
    """``path::Class`` -> lines (decorators to last line) of every class, nested ones too."""
    lengths: dict[str, int] = {}
    for path in MODULES.values():
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lengths[f"{relative}::{node.name}"] = (node.end_lineno or first) - first + 1
    return lengths


def test_no_class_over_about_300_lines() -> None:
    lengths = class_lengths()
    problems = [
        f"{name}: {lines} lines (the limit is {CLASS_LINES}): split it by job"
        for name, lines in lengths.items()
        if lines > CLASS_LINES and name not in BIG_CLASSES
    ]
    problems += [
        f"{name}: {lengths[name]} lines, more than the {limit} it had: it may only shrink"
        for name, limit in BIG_CLASSES.items()
        if lengths.get(name, 0) > limit
    ]
    problems += [
        f"{name}: {lengths[name]} lines, fewer than the {limit} listed: list it at its length"
        for name, limit in BIG_CLASSES.items()
        if CLASS_LINES < lengths.get(name, 0) < limit
    ]
    problems += [
        f"{name}: now {lengths.get(name, 'gone')}: take it off BIG_CLASSES"
        for name in BIG_CLASSES
        if lengths.get(name, 0) <= CLASS_LINES
    ]
    assert not problems, "\n".join(problems)


SAMPLE = """
from typing import TYPE_CHECKING
import importlib
from tasks import lifecycle
from . import runner

if TYPE_CHECKING:
    from scheduler.control.app import create_app

def serve():
    from scheduler.web import dashboard_app
    return importlib.import_module("scheduler.serve")
"""


def test_every_kind_of_import_is_seen() -> None:
    seen = {
        (found.target, found.where, found.line)
        for found in imports_in("scheduler.dispatcher", SAMPLE, "sample.py", False)
    }
    assert seen == {
        ("tasks.lifecycle", "top", 4),
        ("scheduler.runner", "top", 5),
        ("scheduler.control.app", "for type checking", 8),
        ("scheduler.web", "in a function", 11),
        ("scheduler.serve", "in a function", 12),
    }


def test_the_checks_see_an_upward_import_and_a_circle() -> None:
    """A lazy import of the control plane from the dispatcher (as it once was) is caught as
    running up, and with the control app's annotation of the dispatcher, as a circle."""
    down = Import("scheduler.control.app", "scheduler.dispatcher", "a.py", 1, "x", "top")
    up = Import("scheduler.dispatcher", "scheduler.control.app", "b.py", 2, "y", "in a function")
    assert upward([down]) == []
    assert len(upward([down, up])) == 1
    assert "b.py:2 `y` (in a function)" in upward([down, up])[0]
    assert cycles([down]) == []
    assert cycles([down, up]) in ([[down, up]], [[up, down]])
