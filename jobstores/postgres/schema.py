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

__all__ = [
    "DDL",
    "FEW",
    "GAP",
    "LOCK_CLASS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STALE_SQLSTATE",
    "ensure_schema",
    "jsonb_text",
    "schema_version",
]

SCHEMA_VERSION = 3
"""The version of the tables this code writes (``td_schema.version``). Version 1 kept each
account's order as one ``text[]``; version 2 refused a record holding a NUL character (valid
JSON, which ``jsonb`` cannot hold); a database at an older version is migrated in place on
first use (:data:`MIGRATIONS`)."""

LOCK_CLASS = 0x7464
"""The first key of every advisory lock the store takes (``td``); the second is 0 for the
schema and a hash of the cluster's name for its fencing lock."""

GAP = 1 << 20
"""The distance between neighbouring positions of an account's order as written whole: a
task moved between two neighbours takes the middle, and an account whose gap is used up is
numbered afresh."""

FEW = 32
"""A change of more tasks than this is applied set-wise (a statement per kind of change for
all of them: a bulk add of 100,000 tasks is a few statements); of fewer, or when a task id
repeats or an account both loses and gains a task, one task after the other."""

STALE_SQLSTATE = "TD001"
"""The SQLSTATE ``td_commit`` raises when the committer's epoch is not the cluster's (its
DETAIL is ``{"epoch": ..., "holder": ...}``, the lease row found)."""

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
CREATE OR REPLACE FUNCTION td_jsonb(t text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    -- jsonb cannot hold U+0000: where the text escapes one, the jsonb holds U+FFFD instead
    -- (record_text keeps the text exactly). An escaped backslash (two of them) is set aside
    -- first, so that only a real \\u0000 escape is replaced.
    SELECT CASE WHEN strpos(t, '\\u0000') = 0 THEN t::jsonb
           ELSE replace(replace(replace(t, '\\\\', chr(1)), '\\u0000', '\\ufffd'),
                        chr(1), '\\\\')::jsonb END
$$;
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
    PRIMARY KEY (cluster, account_id)
);
CREATE TABLE IF NOT EXISTS td_order (
    cluster text NOT NULL,
    account_id text NOT NULL,
    task_id text NOT NULL,
    pos bigint NOT NULL,
    PRIMARY KEY (cluster, account_id, task_id)
);
CREATE INDEX IF NOT EXISTS td_order_pos ON td_order (cluster, account_id, pos);
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
CREATE OR REPLACE FUNCTION td_unlist(c text, a text, t text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM td_order WHERE cluster = c AND account_id = a AND task_id = t;
    IF NOT EXISTS (SELECT FROM td_order WHERE cluster = c AND account_id = a) THEN
        DELETE FROM td_accounts WHERE cluster = c AND account_id = a;
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION td_append(c text, a text, t text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO td_accounts (cluster, account_id) VALUES (c, a) ON CONFLICT DO NOTHING;
    INSERT INTO td_order (cluster, account_id, task_id, pos)
    SELECT c, a, t, coalesce(max(pos), 0) + {gap}
    FROM td_order WHERE cluster = c AND account_id = a
    ON CONFLICT DO NOTHING;
END
$$;
CREATE OR REPLACE FUNCTION td_set_order(c text, a text, ids jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM td_order WHERE cluster = c AND account_id = a;
    IF jsonb_array_length(ids) = 0 THEN
        DELETE FROM td_accounts WHERE cluster = c AND account_id = a;
        RETURN;
    END IF;
    INSERT INTO td_accounts (cluster, account_id) VALUES (c, a) ON CONFLICT DO NOTHING;
    INSERT INTO td_order (cluster, account_id, task_id, pos)
    SELECT c, a, id, n * {gap} FROM jsonb_array_elements_text(ids) WITH ORDINALITY AS e(id, n)
    ON CONFLICT DO NOTHING;
END
$$;
CREATE OR REPLACE FUNCTION td_move(c text, a text, t text, before text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    next_pos bigint;
    prev_pos bigint;
    place bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM td_order WHERE cluster = c AND account_id = a AND task_id = t)
    THEN
        RETURN;
    END IF;
    SELECT pos INTO next_pos FROM td_order
    WHERE cluster = c AND account_id = a AND task_id = before AND task_id <> t;
    IF next_pos IS NULL THEN
        SELECT coalesce(max(pos), 0) + {gap} INTO place FROM td_order
        WHERE cluster = c AND account_id = a AND task_id <> t;
    ELSE
        SELECT max(pos) INTO prev_pos FROM td_order
        WHERE cluster = c AND account_id = a AND pos < next_pos AND task_id <> t;
        IF prev_pos IS NULL THEN
            place := next_pos - {gap};
        ELSIF next_pos - prev_pos < 2 THEN
            -- The gap is used up: number the account afresh, then take the middle.
            UPDATE td_order o SET pos = r.n * {gap}
            FROM (SELECT task_id, row_number() OVER (ORDER BY pos) AS n FROM td_order
                  WHERE cluster = c AND account_id = a) AS r
            WHERE o.cluster = c AND o.account_id = a AND o.task_id = r.task_id;
            SELECT pos INTO next_pos FROM td_order
            WHERE cluster = c AND account_id = a AND task_id = before;
            SELECT max(pos) INTO prev_pos FROM td_order
            WHERE cluster = c AND account_id = a AND pos < next_pos AND task_id <> t;
            place := coalesce(prev_pos + (next_pos - prev_pos) / 2, next_pos - {gap});
        ELSE
            place := prev_pos + (next_pos - prev_pos) / 2;
        END IF;
    END IF;
    UPDATE td_order SET pos = place WHERE cluster = c AND account_id = a AND task_id = t;
END
$$;
CREATE OR REPLACE FUNCTION td_change_each(
    c text, ids text[], accounts text[], texts text[], sealed_flags boolean[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    was text;
    u record;
BEGIN
    FOR u IN SELECT * FROM unnest(ids, accounts, texts, sealed_flags) WITH ORDINALITY
             AS x(id, acc, txt, seal, i) ORDER BY i
    LOOP
        SELECT account_id INTO was FROM td_tasks WHERE cluster = c AND task_id = u.id;
        IF u.acc IS NULL THEN
            DELETE FROM td_tasks WHERE cluster = c AND task_id = u.id;
            IF was IS NOT NULL THEN
                PERFORM td_unlist(c, was, u.id);
            END IF;
        ELSE
            INSERT INTO td_tasks (cluster, task_id, account_id, record, record_text, sealed)
            VALUES (c, u.id, u.acc, td_jsonb(u.txt), u.txt, u.seal)
            ON CONFLICT (cluster, task_id) DO UPDATE SET
                account_id = excluded.account_id, record = excluded.record,
                record_text = excluded.record_text, sealed = excluded.sealed;
            IF was IS DISTINCT FROM u.acc THEN
                IF was IS NOT NULL THEN
                    PERFORM td_unlist(c, was, u.id);
                END IF;
                PERFORM td_append(c, u.acc, u.id);
            END IF;
        END IF;
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION td_change_all(
    c text, ids text[], accounts text[], texts text[], sealed_flags boolean[]
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    olds text[];
BEGIN
    IF (SELECT count(DISTINCT id) FROM unnest(ids) AS x(id)) <> cardinality(ids) THEN
        RETURN false;
    END IF;
    SELECT array_agg(t.account_id ORDER BY x.i) INTO olds
    FROM unnest(ids) WITH ORDINALITY AS x(id, i)
    LEFT JOIN td_tasks AS t ON t.cluster = c AND t.task_id = x.id;
    IF EXISTS (SELECT FROM unnest(accounts, olds) AS x(acc, was)
               WHERE was IS NOT NULL AND was IS DISTINCT FROM acc
                 AND was IN (SELECT y.acc FROM unnest(accounts, olds) AS y(acc, was)
                             WHERE y.acc IS NOT NULL AND y.acc IS DISTINCT FROM y.was)) THEN
        RETURN false;  -- an account both loses and gains a task: applied one by one
    END IF;
    DELETE FROM td_tasks AS t USING unnest(ids, accounts) AS x(id, acc)
    WHERE x.acc IS NULL AND t.cluster = c AND t.task_id = x.id;
    INSERT INTO td_tasks (cluster, task_id, account_id, record, record_text, sealed)
    SELECT c, id, acc, td_jsonb(txt), txt, seal
    FROM unnest(ids, accounts, texts, sealed_flags) WITH ORDINALITY AS x(id, acc, txt, seal, i)
    WHERE acc IS NOT NULL ORDER BY i
    ON CONFLICT (cluster, task_id) DO UPDATE SET
        account_id = excluded.account_id, record = excluded.record,
        record_text = excluded.record_text, sealed = excluded.sealed;
    DELETE FROM td_order AS o USING unnest(ids, accounts, olds) AS x(id, acc, was)
    WHERE x.was IS NOT NULL AND x.was IS DISTINCT FROM x.acc
      AND o.cluster = c AND o.account_id = x.was AND o.task_id = x.id;
    DELETE FROM td_accounts AS a
    WHERE a.cluster = c
      AND a.account_id IN (SELECT was FROM unnest(accounts, olds) AS x(acc, was)
                           WHERE was IS NOT NULL AND was IS DISTINCT FROM acc)
      AND NOT EXISTS (SELECT FROM td_order AS o
                      WHERE o.cluster = c AND o.account_id = a.account_id);
    INSERT INTO td_accounts (cluster, account_id)
    SELECT c, acc FROM unnest(accounts, olds) WITH ORDINALITY AS x(acc, was, i)
    WHERE acc IS NOT NULL AND acc IS DISTINCT FROM was
    GROUP BY acc ORDER BY min(i)
    ON CONFLICT DO NOTHING;
    INSERT INTO td_order (cluster, account_id, task_id, pos)
    SELECT c, x.acc, x.id,
           coalesce(m.top, 0) + {gap} * row_number() OVER (PARTITION BY x.acc ORDER BY x.i)
    FROM unnest(ids, accounts, olds) WITH ORDINALITY AS x(id, acc, was, i)
    LEFT JOIN (SELECT a.acc, (SELECT max(pos) FROM td_order AS o
                              WHERE o.cluster = c AND o.account_id = a.acc) AS top
               FROM (SELECT DISTINCT acc FROM unnest(accounts) AS y(acc)) AS a) AS m
           ON m.acc = x.acc
    WHERE x.acc IS NOT NULL AND x.acc IS DISTINCT FROM x.was
    ON CONFLICT DO NOTHING;
    RETURN true;
END
$$;
CREATE OR REPLACE FUNCTION td_commit(
    c text, holder_id text, epoch_of bigint, stamp text, tz_name text, extra_text text,
    ids text[], accounts text[], texts text[], sealed_flags boolean[],
    orders jsonb, moves jsonb, applied jsonb
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    found_epoch bigint;
    found_holder text;
    item jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock_shared({lock}, hashtext(c));
    SELECT epoch, holder INTO found_epoch, found_holder FROM td_leases WHERE cluster = c;
    IF coalesce(found_epoch, 0) <> epoch_of OR found_holder IS DISTINCT FROM holder_id THEN
        RAISE EXCEPTION 'stale leader' USING ERRCODE = '{stale}',
            DETAIL = jsonb_build_object('epoch', coalesce(found_epoch, 0),
                                        'holder', found_holder)::text;
    END IF;
    INSERT INTO td_clusters (cluster, saved_at, timezone, extra)
    VALUES (c, stamp, tz_name, extra_text)
    ON CONFLICT (cluster) DO UPDATE SET
        saved_at = excluded.saved_at, timezone = excluded.timezone, extra = excluded.extra;
    IF coalesce(cardinality(ids), 0) > {few} THEN
        IF NOT td_change_all(c, ids, accounts, texts, sealed_flags) THEN
            PERFORM td_change_each(c, ids, accounts, texts, sealed_flags);
        END IF;
    ELSIF cardinality(ids) > 0 THEN
        PERFORM td_change_each(c, ids, accounts, texts, sealed_flags);
    END IF;
    FOR item IN SELECT value FROM jsonb_array_elements(orders) WITH ORDINALITY ORDER BY ordinality
    LOOP
        PERFORM td_set_order(c, item->>0, item->1);
    END LOOP;
    FOR item IN SELECT value FROM jsonb_array_elements(moves) WITH ORDINALITY ORDER BY ordinality
    LOOP
        PERFORM td_move(c, item->>0, item->>1, item->>2);
    END LOOP;
    INSERT INTO td_applied_runs (cluster, run_id, kind)
    SELECT c, pair->>0, pair->>1 FROM jsonb_array_elements(applied) AS pair
    ON CONFLICT DO NOTHING;
END
$$;
"""
DDL = (
    DDL.replace("{gap}", str(GAP))
    .replace("{few}", str(FEW))
    .replace("{lock}", str(LOCK_CLASS))
    .replace("{stale}", STALE_SQLSTATE)
)
"""The tables of version :data:`SCHEMA_VERSION`.

``td_tasks`` holds one row per restored task: ``record`` is the record as ``jsonb`` with the
seed's field names, ``record_text`` the same object as the state file's line holds it (key
order and all, so an export is byte for byte the file; a NUL character, which ``jsonb``
cannot hold, is U+FFFD in ``record`` and kept exactly in ``record_text``, see
:func:`jsonb_text`), ``sealed`` whether this library
validated it (it is then loaded without being validated again), ``seq`` its place in the
file. Someone editing ``record`` alone (in SQL, by hand) has ``td_tasks_edited`` make
``record_text`` the edited record's text and the record one to validate again when loaded.
``td_kept`` holds the records that could not be restored, verbatim; ``td_accounts`` each
account's place in ``account_tasks``; ``td_order`` one row per task id of an account's order
(unrestorable ids last), sorted by ``pos``: a task added takes the next position, one moved
the middle of its new neighbours, so no change rewrites an account's whole order.
``td_commit(...)`` applies one change of the leader in the database, in one statement (one
round trip): it checks the fencing epoch first (raising :data:`STALE_SQLSTATE`), then writes
the task rows, the account orders (``td_append``, ``td_unlist``, ``td_set_order``,
``td_move``), the applied run events and the cluster's ``saved_at``.
``td_clusters`` holds the rest of the document (``saved_at``, ``timezone``, the top-level
keys this code does not interpret); ``td_leases`` the leadership of each cluster (see
:mod:`jobstores.postgres.lease`); ``td_applied_runs`` the run events applied; ``td_runs`` the
run history, one row per run.
"""


def jsonb_text(text: str) -> str:
    """The JSON ``text`` as the ``record`` column (``jsonb``) can hold it: the same text, but
    for each ``\\u0000`` escape (a NUL character), which becomes ``\\ufffd`` (U+FFFD), as
    ``td_jsonb`` does in the database."""
    if "\\u0000" not in text:
        return text
    return text.replace("\\\\", "\x01").replace("\\u0000", "\\ufffd").replace("\x01", "\\\\")


def schema_version(connection: psycopg.Connection[Any]) -> int | None:
    """The version of the tables in the database (None: there are none yet)."""
    row = connection.execute("SELECT to_regclass('td_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return None
    found = connection.execute("SELECT version FROM td_schema").fetchone()
    return None if found is None else int(found[0])


MIGRATIONS = {
    1: f"""
INSERT INTO td_order (cluster, account_id, task_id, pos)
SELECT a.cluster, a.account_id, e.id, e.n * {GAP}
FROM td_accounts AS a, unnest(a.task_ids) WITH ORDINALITY AS e(id, n)
ORDER BY a.cluster, a.account_id, e.n
ON CONFLICT DO NOTHING;
DELETE FROM td_accounts AS a
WHERE NOT EXISTS (SELECT FROM td_order AS o
                  WHERE o.cluster = a.cluster AND o.account_id = a.account_id);
ALTER TABLE td_accounts DROP COLUMN task_ids;
DROP FUNCTION IF EXISTS td_moved(text[], text, text);
""",
    2: "",
}
"""What brings the tables of a version to the next one, run after :data:`DDL` (which creates
what is new and replaces every function) in the same transaction: version 1's
``td_accounts.task_ids`` arrays become ``td_order`` rows (an id listed twice keeps its first
place); version 2 needs only :data:`DDL`'s functions (``td_jsonb``)."""


def ensure_schema(connection: psycopg.Connection[Any]) -> int:
    """Create the tables if there are none, or bring older ones to this version (in one
    transaction, :data:`MIGRATIONS`); return their version.

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
        for version in range(found or SCHEMA_VERSION, SCHEMA_VERSION):
            connection.execute(MIGRATIONS[version])
        connection.execute(
            "INSERT INTO td_schema (version) VALUES (%s) "
            "ON CONFLICT (only_row) DO UPDATE SET version = excluded.version",
            (SCHEMA_VERSION,),
        )
    return SCHEMA_VERSION
