"""The PostgreSQL store's tables, created on first use and versioned.

Every table carries the ``cluster`` it belongs to, so several clusters may share one
database. ``td_schema`` holds the one version number of the tables; a database at a newer
version is refused (:class:`~jobstores.postgres.errors.NewerSchemaError`) and left as is.

Concurrent first uses (two instances started at once on an empty database) are serialised by
a transaction-level advisory lock, so exactly one creates the tables and the other sees them.
"""

from __future__ import annotations

from typing import Any

import psycopg

from jobstores.postgres.errors import NewerSchemaError

__all__ = ["DDL", "LOCK_CLASS", "SCHEMA_VERSION", "ensure_schema", "schema_version"]

SCHEMA_VERSION = 1
"""The version of the tables this code writes (``td_schema.version``)."""

LOCK_CLASS = 0x7464
"""The first key of every advisory lock the store takes (``td``); the second is 0 for the
schema and a hash of the cluster's name for its fencing lock."""

DDL = """
CREATE TABLE IF NOT EXISTS td_schema (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS td_leases (
    cluster text PRIMARY KEY,
    epoch bigint NOT NULL,
    holder text,
    holder_url text,
    expires_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS td_clusters (
    cluster text PRIMARY KEY,
    saved_at text,
    timezone text,
    extra text NOT NULL DEFAULT '{}'
);
CREATE SEQUENCE IF NOT EXISTS td_seq;
CREATE TABLE IF NOT EXISTS td_tasks (
    cluster text NOT NULL,
    task_id text NOT NULL,
    seq bigint NOT NULL DEFAULT nextval('td_seq'),
    account_id text NOT NULL,
    record jsonb NOT NULL,
    record_text text NOT NULL,
    sealed boolean NOT NULL,
    PRIMARY KEY (cluster, task_id)
);
CREATE INDEX IF NOT EXISTS td_tasks_order ON td_tasks (cluster, seq);
CREATE OR REPLACE FUNCTION td_record_edited() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.record IS DISTINCT FROM OLD.record
            AND NEW.record_text IS NOT DISTINCT FROM OLD.record_text THEN
        NEW.record_text := NEW.record::text;
        NEW.sealed := false;
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER td_tasks_edited BEFORE UPDATE ON td_tasks
    FOR EACH ROW EXECUTE FUNCTION td_record_edited();
CREATE TABLE IF NOT EXISTS td_kept (
    cluster text NOT NULL,
    seq bigint NOT NULL DEFAULT nextval('td_seq'),
    task_id text,
    raw text NOT NULL,
    PRIMARY KEY (cluster, seq)
);
CREATE TABLE IF NOT EXISTS td_accounts (
    cluster text NOT NULL,
    account_id text NOT NULL,
    seq bigint NOT NULL DEFAULT nextval('td_seq'),
    task_ids text[] NOT NULL,
    PRIMARY KEY (cluster, account_id)
);
CREATE TABLE IF NOT EXISTS td_applied_runs (
    cluster text NOT NULL,
    run_id text NOT NULL,
    kind text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster, run_id, kind)
);
CREATE TABLE IF NOT EXISTS td_runs (
    id bigserial PRIMARY KEY,
    cluster text NOT NULL,
    run_id text NOT NULL,
    task_id text NOT NULL,
    account_id text NOT NULL,
    sys_type text NOT NULL,
    task_type text NOT NULL,
    attempt integer NOT NULL,
    scheduled_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    duration double precision,
    outcome text NOT NULL,
    error text,
    worker text,
    extra jsonb,
    ts timestamptz NOT NULL,
    trigger text NOT NULL,
    UNIQUE (cluster, run_id)
);
CREATE INDEX IF NOT EXISTS td_runs_task_ts ON td_runs (cluster, task_id, ts);
CREATE INDEX IF NOT EXISTS td_runs_account_ts ON td_runs (cluster, account_id, ts);
CREATE INDEX IF NOT EXISTS td_runs_ts ON td_runs (cluster, ts);
CREATE OR REPLACE FUNCTION td_moved(ids text[], task text, before text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p IS NULL THEN r || task ELSE r[:p - 1] || task || r[p:] END
    FROM (SELECT r, array_position(r, before) AS p
          FROM (SELECT array_remove(ids, task) AS r) AS removed) AS found
$$;
"""
"""The tables of version :data:`SCHEMA_VERSION`.

``td_tasks`` holds one row per restored task: ``record`` is the record as ``jsonb`` with the
seed's field names, ``record_text`` the same object as the state file's line holds it (key
order and all, so an export is byte for byte the file), ``sealed`` whether this library
validated it (it is then loaded without being validated again), ``seq`` its place in the
file. Someone editing ``record`` alone (in SQL, by hand) has ``td_tasks_edited`` make
``record_text`` the edited record's text and the record one to validate again when loaded.
``td_kept`` holds the records that could not be restored, verbatim; ``td_accounts`` each
account's task order (unrestorable ids last) and the account's place in ``account_tasks``;
``td_moved(ids, task, before)`` is ``ids`` with ``task`` placed before ``before`` (last when
``before`` is null or not there): a reordered task, applied in the database.
``td_clusters`` holds the rest of the document (``saved_at``, ``timezone``, the top-level
keys this code does not interpret); ``td_leases`` the leadership of each cluster (see
:mod:`jobstores.postgres.lease`); ``td_applied_runs`` the run events applied; ``td_runs`` the
run history, one row per run.
"""


def schema_version(connection: psycopg.Connection[Any]) -> int | None:
    """The version of the tables in the database (None: there are none yet)."""
    row = connection.execute("SELECT to_regclass('td_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    found = connection.execute("SELECT version FROM td_schema").fetchone()
    return None if found is None else int(found[0])


def ensure_schema(connection: psycopg.Connection[Any]) -> int:
    """Create the tables if there are none (in one transaction); return their version.

    Raises :class:`NewerSchemaError` when the database is at a newer version. The connection
    must not be inside a transaction (it is used in autocommit or between transactions).
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
        found = schema_version(connection)
        if found is not None and found > SCHEMA_VERSION:
            raise NewerSchemaError(found, SCHEMA_VERSION)
        if found == SCHEMA_VERSION:
            return found
        connection.execute(DDL)
        connection.execute(
            "INSERT INTO td_schema (version) VALUES (%s) "
            "ON CONFLICT (only_row) DO UPDATE SET version = excluded.version",
            (SCHEMA_VERSION,),
        )
    return SCHEMA_VERSION
