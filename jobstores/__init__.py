"""The JSON job store: task records in ``dispatch_config.json``, served to APScheduler, kept
by a :class:`StateStore` (the journal by default, or the whole-file snapshot)."""

from jobstores.journal import JournalStorage
from jobstores.jsonfile import STATE_FILENAME, JsonJobStore, SaveHealth
from jobstores.owned import OwnedStore
from jobstores.state import StateStore, StoredState
from jobstores.storage import SnapshotStorage
from jobstores.stores import resolve_store

__all__ = [
    "STATE_FILENAME",
    "JournalStorage",
    "JsonJobStore",
    "OwnedStore",
    "SaveHealth",
    "SnapshotStorage",
    "StateStore",
    "StoredState",
    "resolve_store",
]
