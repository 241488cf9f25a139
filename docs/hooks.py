"""MkDocs hooks: pages made from the code at build time, so they cannot drift from it.

``openapi.json`` is the OpenAPI document of the control API, generated from the
FastAPI app the dispatcher serves (the same app as ``GET /openapi.json``), and the
``<!-- endpoints -->`` marker on the control API page becomes a table of its operations.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

OPENAPI_PATH = "openapi.json"
"""Where the generated OpenAPI document lands in the site."""
ENDPOINTS_MARKER = "<!-- endpoints -->"
"""Replaced by the table of the control API's operations."""
METHODS = ("get", "post", "put", "patch", "delete")
# The docstrings name objects Sphinx-style (:class:`X`); the reference shows just the name.
_ROLE = re.compile(r":(?:class|meth|func|attr|data|exc|mod|obj):(?=<code>)")
_SHORT = re.compile(r"<code>~(?:[\w.]+\.)?(\w+)</code>")


def openapi_document() -> dict[str, Any]:
    """The control API's OpenAPI document, from a dispatcher on a throwaway directory."""
    from scheduler import TaskDispatcher

    with tempfile.TemporaryDirectory() as directory:
        dispatcher = TaskDispatcher(Path(directory) / "store", timezone="UTC", history=False)
        try:
            return dispatcher.control_app().openapi()
        finally:
            dispatcher.close()


def endpoint_table(document: dict[str, Any]) -> str:
    """A Markdown table of every operation in ``document``, in the document's order."""
    rows = ["| method | path | what |", "| --- | --- | --- |"]
    for path, operations in document["paths"].items():
        for method in METHODS:
            operation = operations.get(method)
            if operation is not None:
                summary = operation.get("summary", "").replace("|", "\\|")
                rows.append(f"| `{method.upper()}` | `{path}` | {summary} |")
    return "\n".join(rows)


_document: dict[str, Any] | None = None


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated OpenAPI document to the site."""
    global _document
    _document = openapi_document()
    content = json.dumps(_document, indent=2, ensure_ascii=False) + "\n"
    files.append(File.generated(config, OPENAPI_PATH, content=content))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Put the table of operations where the control API page asks for it."""
    if ENDPOINTS_MARKER in markdown:
        assert _document is not None, "on_files runs before any page"
        markdown = markdown.replace(ENDPOINTS_MARKER, endpoint_table(_document))
    return markdown


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Drop the Sphinx role in front of names in the API reference."""
    return _SHORT.sub(r"<code>\1</code>", _ROLE.sub("", html))
