"""A real PostgreSQL for the store's tests: a fresh database per test run, a cluster per test.

The server and the databases: :mod:`postgres_support`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from postgres_support import Databases, postgres_databases

from jobstores.postgres import Fence, Leadership, PostgresState, connector

__all__ = ["postgres_databases"]  # a fixture of every test here


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
