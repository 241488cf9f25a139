"""``PostgresStorage``: the PostgreSQL state behind today's storage backend protocol.

A thin adapter: it turns a :class:`~jobstores.table.StateImage` into one fenced
:meth:`~jobstores.postgres.state.PostgresState.commit` and the stored state into the
:class:`~jobstores.format.Document` the JSON loader returns. Every SQL statement, the schema,
the lease and the fencing live in :mod:`jobstores.postgres.state`,
:mod:`jobstores.postgres.schema` and :mod:`jobstores.postgres.lease`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from jobstores.format import Document
from jobstores.postgres.lease import Leadership
from jobstores.postgres.state import FullState, PostgresState, TaskRow
from jobstores.table import StateImage

__all__ = ["PostgresStorage"]


class PostgresStorage:
    """A cluster's state in PostgreSQL, committed under ``leadership``'s lease.

    Every commit carries the fencing epoch of the lease held at that instant
    (:meth:`~jobstores.postgres.lease.Leadership.fence`): an instance that does not lead
    now, or was taken over, raises an ``OSError`` and changes nothing. The database holds
    every change once a commit returns, so a commit never needs the whole state: a full
    image is written whole only when it is the first one after loading (the owner asks for
    one after repairing what it loaded).
    """

    def __init__(
        self, state: PostgresState, leadership: Leadership, *, timezone_key: str | None = None
    ) -> None:
        self.state = state
        self.leadership = leadership
        self.path = Path(f"postgresql-{state.cluster}")
        """What messages name the store by (there is no file)."""
        self.timezone_key = timezone_key
        """The zone the state records for its hour windows."""
        self._replace_next = True

    def load(self) -> tuple[Document | None, bool]:
        """The cluster's state (None: none yet); never from a backup."""
        stored = self.state.load()
        self._replace_next = True
        return (None if stored is None else stored.document()), False

    def commit(self, image: StateImage, saved_at: datetime) -> None:
        """Make ``image`` durable in one fenced transaction (raises an ``OSError``)."""
        fence = self.leadership.fence()
        if image.full and self._replace_next:
            self.state.commit(
                fence,
                saved_at=saved_at,
                timezone=self.timezone_key,
                extra=image.extra,
                full=FullState(
                    list(map(TaskRow.of, image.records)), image.kept, image.account_tasks
                ),
            )
            self._replace_next = False
            return
        self.state.commit(
            fence,
            saved_at=saved_at,
            timezone=self.timezone_key,
            extra=image.extra,
            changes=(
                (task_id, None if record is None else TaskRow.of(record))
                for task_id, record in image.changes
            ),
            orders=image.orders,
            moves=image.moves,
        )

    def wants_full_image(self, *, closing: bool = False) -> bool:
        """Never: the database holds every change once it is committed."""
        return False

    def fold_due_in(self) -> float | None:
        """Never: there is nothing to fold."""
        return None

    def close(self) -> None:
        """Close the state's connection (the lease is its owner's to release)."""
        self.state.close()
