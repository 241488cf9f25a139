"""The PostgreSQL store (the ``postgres`` extra): the foundation of failover.

A cluster's state (one row per task, the record as ``jsonb`` with the seed's field names,
account order, records kept unrestorable, applied run events and the run history) lives in
PostgreSQL; each durable change is one transaction, fenced by the epoch of the leader's
lease. Nothing here is imported by :mod:`jobstores` itself: only a program that uses the
store loads ``psycopg``.

- :mod:`~jobstores.postgres.schema`: the tables, created on first use and versioned;
- :mod:`~jobstores.postgres.lease`: leadership of a cluster, a lease with a fencing epoch;
- :mod:`~jobstores.postgres.state`: loading the state and committing a change;
- :mod:`~jobstores.postgres.interchange`: ``dispatch_config.json`` in and out;
- :mod:`~jobstores.postgres.backend`: the state behind the ``StateStore`` port (``store=`` a
  ``postgresql://`` URL), owned through the lease.
"""

from jobstores.postgres.backend import PostgresStorage, masked_url, split_store_url
from jobstores.postgres.connection import connector
from jobstores.postgres.errors import (
    NewerSchemaError,
    NotLeadingError,
    PostgresStoreError,
    StaleLeaderError,
)
from jobstores.postgres.interchange import ImportSummary, export_document, import_document
from jobstores.postgres.lease import (
    DEFAULT_CLUSTER,
    DEFAULT_LEASE,
    Fence,
    Leadership,
    LeaseHolder,
    read_lease,
)
from jobstores.postgres.schema import SCHEMA_VERSION, ensure_schema
from jobstores.postgres.state import FullState, PostgresState, StoredState, TaskRow

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_LEASE",
    "SCHEMA_VERSION",
    "Fence",
    "FullState",
    "ImportSummary",
    "Leadership",
    "LeaseHolder",
    "NewerSchemaError",
    "NotLeadingError",
    "PostgresState",
    "PostgresStorage",
    "PostgresStoreError",
    "StaleLeaderError",
    "StoredState",
    "TaskRow",
    "connector",
    "ensure_schema",
    "export_document",
    "import_document",
    "masked_url",
    "read_lease",
    "split_store_url",
]
