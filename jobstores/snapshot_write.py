"""``SnapshotWriter``: the journal's snapshot, ``dispatch_config.json``, written whole.

The state image is encoded a chunk of tasks at a time (letting the event loop have its turn
between chunks) into the seed's document, recording the last journal line it holds
(``journal_seq``), and replaces the file with the atomic protocol of :mod:`jobstores.durable`
(the previous one kept as the backup). A snapshot written at a commit, on the saving thread,
reuses the encoded lines of the tasks unchanged since the last such snapshot.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from jobstores.durable import write_atomic
from jobstores.format import CHUNK, encode_document_chunks, encode_raw, encode_task
from jobstores.pacing import let_go, pause
from jobstores.storage import EncodedTasks
from jobstores.table import StateImage

__all__ = ["KEEP_LINES_BELOW", "SnapshotWriter"]

KEEP_LINES_BELOW = 10_000
"""A snapshot written at a commit keeps its tasks' encoded lines for the next one, up to this
many tasks (a small store writes one at every commit; a large one rarely does)."""


class SnapshotWriter:
    """Writes state images as the snapshot file (see the module)."""

    def __init__(self, path: Path, backup_path: Path) -> None:
        self.path = path
        self.backup_path = backup_path
        self._encoded = EncodedTasks()
        """Lines of the last snapshot written at a commit (on the saving thread only)."""

    def forget_lines(self) -> None:
        """Let the kept lines go (the store is large: commits append lines again)."""
        self._encoded.clear()

    def write(
        self,
        image: StateImage,
        saved_at: datetime,
        seq: int,
        timezone_key: str | None,
        *,
        now: bool = False,
    ) -> int:
        """Write the snapshot of ``image`` (holding the journal's lines up to ``seq``);
        ``now``: at a commit, on the saving thread. Returns the file's size in bytes."""
        records = image.records
        chunks = []
        if now and len(records) < KEEP_LINES_BELOW:
            lines = self._encoded.encode(records)
            chunks = [b",\n".join(lines[at : at + CHUNK]) for at in range(0, len(lines), CHUNK)]
        else:
            for at in range(0, len(records), CHUNK):
                if at:
                    pause()  # let the event loop have its turn
                chunks.append(b",\n".join(encode_task(r.plain()) for r in records[at : at + CHUNK]))
        if image.kept:
            chunks.append(b",\n".join(map(encode_raw, image.kept)))
        parts = encode_document_chunks(
            chunks,
            image.account_tasks,
            saved_at,
            timezone_key,
            image.extra,
            seq,
            sealed=not image.kept,
            pause=pause,
        )
        write_atomic(self.path, parts, backup=self.backup_path)
        size = sum(map(len, parts))
        chunks.clear()  # parts holds the same chunks: let go of them once, piecemeal
        let_go(parts)
        return size
