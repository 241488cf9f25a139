"""The errors of the PostgreSQL store."""

from __future__ import annotations

from jobstores.state import NotOwnerError
from tasks.errors import DispatcherError
from tasks.secrets import mask_text

__all__ = [
    "NewerSchemaError",
    "NotLeadingError",
    "PostgresStoreError",
    "StaleLeaderError",
    "describe",
]


def describe(exc: BaseException) -> str:
    """``"Type: message"`` of a database error on one line, credentials masked."""
    return mask_text(" ".join(f"{type(exc).__name__}: {exc}".split()))


class PostgresStoreError(DispatcherError, OSError):
    """The PostgreSQL store could not do what was asked; nothing durable changed.

    An ``OSError``, as every failed commit of a storage backend is: the saver keeps the
    change in memory and tries again (see :mod:`jobstores.saver`), unless :attr:`transient`
    is False.
    """

    transient: bool = True
    """False when the database refused the data itself (a data or integrity error, SQLSTATE
    class 22 or 23): trying the same again fails the same way, so the saver does not retry."""


class NewerSchemaError(PostgresStoreError):
    """The database holds a schema version newer than this code writes: it is left as is."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"the PostgreSQL store has schema version {found}, newer than this "
            f"task-dispatcher writes ({supported}); upgrade task-dispatcher"
        )
        self.found = found
        self.supported = supported


class StaleLeaderError(PostgresStoreError, NotOwnerError):
    """A commit carried a fencing epoch that is no longer the cluster's: another instance
    took over since. The commit is refused whole; the instance must stop leading."""

    def __init__(self, cluster: str, epoch: int, current: int, holder: str | None) -> None:
        by = f" by {holder!r}" if holder else ""
        super().__init__(
            f"cluster {cluster!r}: commit with epoch {epoch} refused, the cluster is at epoch "
            f"{current}{by}; this instance no longer leads and changed nothing"
        )
        self.cluster = cluster
        self.epoch = epoch
        self.current = current
        self.holder = holder


class NotLeadingError(PostgresStoreError, NotOwnerError):
    """A change was asked of an instance that does not hold a valid lease at this instant."""

    def __init__(self, cluster: str, reason: str) -> None:
        super().__init__(f"cluster {cluster!r}: this instance does not lead ({reason})")
        self.cluster = cluster
