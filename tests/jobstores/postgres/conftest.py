"""A real PostgreSQL for the store's tests: a fresh database per test run, a cluster per test.

The server is ``$TASK_DISPATCHER_TEST_POSTGRES`` (a libpq URL of a role that may create
databases), by default the local one (``postgresql://postgres@127.0.0.1:5432/postgres``).
Without one the tests are skipped, except when ``$CI`` is set: then they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from jobstores.postgres import Fence, Leadership, PostgresState, connector

ADMIN_DSN = os.environ.get(
    "TASK_DISPATCHER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)


def _dsn_of(database: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=database)


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


@pytest.fixture(scope="session")
def postgres_dsn(postgres_databases: Databases) -> str:
    """The database of this test run (tests share it, each in a cluster of its own)."""
    return postgres_databases.create()


@pytest.fixture
def empty_database(postgres_databases: Databases) -> str:
    """A database of this test's own, without any table."""
    return postgres_databases.create()


@pytest.fixture
def cluster() -> str:
    """A cluster name of this test's own."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def connect(postgres_dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    return connector(postgres_dsn, timeout=5)


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def make_leadership(
    connect: Callable[[], psycopg.Connection[Any]], cluster: str
) -> Iterator[Callable[..., Leadership]]:
    """Leaderships on this test's cluster (stopped, without releasing, at the end)."""
    made: list[Leadership] = []

    def make(**options: Any) -> Leadership:
        options.setdefault("clock", FakeClock())
        leadership = Leadership(options.pop("connect", connect), cluster, **options)
        made.append(leadership)
        return leadership

    yield make
    for leadership in made:
        leadership.stop(release=False)


@pytest.fixture
def state(connect: Callable[[], psycopg.Connection[Any]], cluster: str) -> Iterator[PostgresState]:
    store = PostgresState(connect, cluster)
    yield store
    store.close()


@pytest.fixture
def fence(make_leadership: Callable[..., Leadership]) -> Fence:
    """The fence of a leader of this test's cluster (its clock never moves)."""
    leader = make_leadership(holder="leader")
    assert leader.try_acquire()
    return leader.fence()
