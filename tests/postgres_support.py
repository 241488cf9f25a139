"""A real PostgreSQL for tests: fresh databases, dropped at the end of the test run.

The server is ``$TASK_DISPATCHER_TEST_POSTGRES`` (a libpq URL of a role that may create
databases), by default the local one (``postgresql://postgres@127.0.0.1:5432/postgres``).
Without one the tests are skipped, except when ``$CI`` is set: then they fail. A conftest
makes :func:`postgres_databases` a fixture by importing it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

ADMIN_DSN = os.environ.get(
    "TASK_DISPATCHER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)


def _dsn_of(database: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=database)


def url_of(dsn: str) -> str:
    """The ``postgresql://`` URL of a connection string (for ``store=`` and ``--store``)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    user = info.get("user", "postgres")
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    return f"postgresql://{user}@{host}:{port}/{info['dbname']}"


class Databases:
    """Creates databases for this test run; drops every one at the end."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self) -> str:
        """A new, empty database; its connection string."""
        name = f"td_test_{uuid.uuid4().hex[:12]}"
        with _admin() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return _dsn_of(name)

    def drop_all(self) -> None:
        with _admin() as admin:
            for name in self.created:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[Databases]:
    """The run's database factory (the server must answer)."""
    try:
        _admin().close()
    except psycopg.Error as exc:
        message = f"no PostgreSQL at {ADMIN_DSN}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: a missing server is a failure)")
        pytest.skip(message)
    databases = Databases()
    try:
        yield databases
    finally:
        databases.drop_all()
