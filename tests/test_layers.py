"""The packages form one-way layers: tasks <- jobstores <- scheduler."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BELOW = {"tasks": set(), "jobstores": {"tasks"}, "scheduler": {"tasks", "jobstores"}}


def imported_packages(path: Path) -> set[str]:
    """The top-level project packages a module imports (at any depth in the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & BELOW.keys()


@pytest.mark.parametrize("package", sorted(BELOW))
def test_imports_only_point_down(package: str) -> None:
    wrong = {
        str(module.relative_to(ROOT)): sorted(imported - BELOW[package] - {package})
        for module in sorted((ROOT / package).rglob("*.py"))
        if (imported := imported_packages(module)) - BELOW[package] - {package}
    }
    assert wrong == {}
