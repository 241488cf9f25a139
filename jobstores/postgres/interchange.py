"""``dispatch_config.json`` in and out of the PostgreSQL store: the file stays the interchange
format.

:func:`import_document` validates a document's tasks as a dispatcher loading the file would
(the ones that cannot be restored are kept verbatim, each account's order is the one the
dispatcher would hold) and replaces the cluster's state with it in one fenced commit.
:func:`export_document` writes the cluster's state back in the seed's format, as the JSON
store writes it: a file this library wrote comes back byte for byte (its ``saved_at``
included; ``journal_seq``, which counts the lines of a directory's journal, is not kept).
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import NamedTuple

from jobstores.format import decode_document, encode_document, encode_raw, encode_task
from jobstores.loading import restore
from jobstores.postgres.errors import PostgresStoreError
from jobstores.postgres.lease import Fence
from jobstores.postgres.state import FullState, PostgresState, TaskRow
from jobstores.table import TaskTable
from tasks.zones import choose_timezone, zone_key

__all__ = ["ImportSummary", "export_document", "import_document"]


class ImportSummary(NamedTuple):
    """What an import stored."""

    restored: int
    """Tasks stored as records."""
    kept: int
    """Records stored verbatim, as they could not be restored."""


def import_document(
    state: PostgresState,
    fence: Fence,
    data: bytes,
    *,
    source: Path = Path("dispatch_config.json"),
    zone: tzinfo | None = None,
    convert_timezone: bool = False,
    replace: bool = False,
) -> ImportSummary:
    """Replace the cluster's state with the document ``data`` (read from ``source``).

    ``zone`` and ``convert_timezone`` are as for a dispatcher opening the file (None: the
    zone the document records, else the local one). Raises
    :class:`~jobstores.format.CorruptFileError` for bytes that are no document,
    :class:`~tasks.errors.NewerFormatError` for a newer format, and
    :class:`~jobstores.postgres.errors.PostgresStoreError` when the cluster holds tasks
    already and ``replace`` is false; nothing is written then.
    """
    document = decode_document(data, source)
    chosen = choose_timezone(zone, document.timezone, source, convert=convert_timezone)
    restored = restore(
        document.tasks,
        chosen,
        parsed_json=document.parsed_json,
        trusted=(lambda raw: True) if document.trusted else None,
    )
    kept = {id(raw) for raw, _ in restored.kept}
    raws = [raw for raw in document.tasks if id(raw) not in kept]
    # The order the dispatcher holds once it loads the file: the table makes it.
    table = TaskTable("import")
    table.load(restored.records, restored.kept, document.account_tasks)
    order = table.capture().account_tasks
    if not replace:
        current = state.load()
        if current is not None and current.tasks:
            raise PostgresStoreError(
                f"cluster {state.cluster!r} holds {len(current.tasks)} task(s) already; "
                "import replaces them only when asked to"
            )
    saved_at = document.saved_at or datetime.now(UTC).isoformat()
    state.commit(
        fence,
        saved_at=saved_at,
        timezone=zone_key(chosen),
        extra=document.extra,
        full=FullState(
            rows=[TaskRow.from_raw(raw, sealed=document.trusted) for raw in raws],
            kept=[raw for raw, _ in restored.kept],
            account_tasks=order,
        ),
    )
    return ImportSummary(len(raws), len(restored.kept))


def export_document(state: PostgresState, *, now: datetime | None = None) -> bytes:
    """The cluster's state as a ``dispatch_config.json`` document (an empty one if nothing
    was stored). ``now`` stamps a state that records no ``saved_at``."""
    stored = state.load()
    if stored is None:
        return b"".join(encode_document([], {}, now or datetime.now(UTC)))
    saved_at = _instant(stored.saved_at) or now or datetime.now(UTC)
    restored = len(stored.sealed)
    lines = [
        *map(encode_task, stored.tasks[:restored]),
        *map(encode_raw, stored.tasks[restored:]),
    ]
    return b"".join(
        encode_document(
            lines,
            stored.account_tasks,
            saved_at,
            stored.timezone,
            stored.extra,
            sealed=not stored.kept and all(stored.sealed),
        )
    )


def _instant(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
