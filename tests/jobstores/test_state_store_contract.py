"""The ``StateStore`` contract, over every store: what an owner and a reader may rely on.

Each store is one :class:`Kind`: how to make a store object on a place, how its owner
captures images (the journal taking every change, the journal of a small store that writes
the file at every commit, the whole-file snapshot), how to make its writes fail, and how it
names its place. A new store (a database) joins by adding one ``Kind`` to :data:`KINDS`. The
PostgreSQL store runs on a fresh database of each test's own (a place is a cluster there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from helpers import SHANGHAI, T0, record
from postgres_support import Databases, postgres_databases, url_of

from jobstores import JournalStorage, SnapshotStorage, StateStore, StoredState
from jobstores.snapshot import read_snapshot
from jobstores.table import TaskTable
from tasks.errors import DispatcherError, InvalidTaskError, TimezoneMismatchError
from tasks.model import TaskRecord

UTC = ZoneInfo("UTC")


@contextlib.contextmanager
def disk_full() -> Iterator[None]:
    """Every write to a file descriptor fails as on a full disk (nothing reaches the file)."""

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", full)
        yield


@contextlib.contextmanager
def sync_fails() -> Iterator[None]:
    """Every sync fails (what was written may be in the file, never acknowledged)."""

    def failed(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", failed)
        patch.setattr(os, "fdatasync", failed, raising=False)
        yield


FILE_FAILURES = (
    (disk_full, os.strerror(errno.ENOSPC)),
    (sync_fails, os.strerror(errno.EIO)),
)
"""How the JSON stores' durable writes are made to fail, and what their OSError says."""


@dataclass(frozen=True)
class Kind:
    """One store implementation, as the contract drives it."""

    name: str
    make: Callable[[Path], StateStore]
    """A new store object on ``place`` (the same state for every object made on it)."""
    current_below: int
    """The owner's threshold below which every commit carries the whole state."""
    failures: tuple[tuple[Callable[[], contextlib.AbstractContextManager[None]], str], ...]
    """Ways to make the store's durable writes fail with ``OSError`` while entered, each
    with what that error says."""
    where: Callable[[Path], str]
    """What an ownership error must name (the JSON stores: their directory)."""


def _unset(place: Path) -> StateStore:
    raise AssertionError("the PostgreSQL kind is bound to its database by the kind fixture")


KINDS = [
    Kind("journal", JournalStorage, 0, FILE_FAILURES, str),
    Kind("journal-small", JournalStorage, 2000, FILE_FAILURES, str),
    Kind("snapshot", SnapshotStorage, 0, FILE_FAILURES, str),
    Kind("postgresql", _unset, 0, (), str),
    Kind("postgresql-small", _unset, 2000, (), str),
]

__all__ = ["postgres_databases"]  # a fixture of the PostgreSQL kinds


def cluster_of(place: Path) -> str:
    """The cluster a place names in the PostgreSQL kinds' database (as their errors say)."""
    return place.name


@contextlib.contextmanager
def refusing(dsn: str, message: str) -> Iterator[None]:
    """Every commit fails inside the database (a trigger raises ``message``) while entered."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "CREATE FUNCTION td_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$BEGIN RAISE EXCEPTION '{message}'; END$$"
        )
        admin.execute(
            "CREATE TRIGGER td_test_refuse BEFORE INSERT OR UPDATE ON td_clusters "
            "FOR EACH ROW EXECUTE FUNCTION td_test_refuse()"
        )
        try:
            yield
        finally:
            admin.execute("DROP TRIGGER td_test_refuse ON td_clusters")
            admin.execute("DROP FUNCTION td_test_refuse()")


@contextlib.contextmanager
def disconnected(dsn: str) -> Iterator[None]:
    """The store's connections are cut before the commit (as by a restarted server)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = 'task-dispatcher'"
        )
    yield


def _postgres(kind: Kind, databases: Databases) -> Kind:
    from jobstores.postgres.backend import PostgresStorage

    dsn = databases.create()
    url = url_of(dsn)
    return dataclasses.replace(
        kind,
        make=lambda place: PostgresStorage.for_url(url, cluster=cluster_of(place)),
        failures=(
            (lambda: refusing(dsn, "the disk is full"), "the disk is full"),
            (lambda: disconnected(dsn), "committing failed"),
        ),
        where=lambda place: repr(cluster_of(place)),
    )


@pytest.fixture(
    params=[
        # (a real server: out of the quick loop, as tests using its fixture directly are)
        pytest.param(kind, marks=pytest.mark.slow) if kind.name.startswith("postgresql") else kind
        for kind in KINDS
    ],
    ids=[kind.name for kind in KINDS],
)
def kind(request: pytest.FixtureRequest) -> Kind:
    kind: Kind = request.param
    if kind.name.startswith("postgresql"):
        return _postgres(kind, request.getfixturevalue("postgres_databases"))
    return kind


@pytest.fixture
def place(tmp_path: Path) -> Path:
    return tmp_path / "state"


class Owner:
    """What a dispatcher does with its store, minus the scheduling: own, load, change the
    table, commit its images, close."""

    def __init__(self, kind: Kind, place: Path) -> None:
        self.kind = kind
        self.store = kind.make(place)
        self.table = TaskTable()
        self.state: StoredState | None = None

    def open(self, zone: Any = SHANGHAI, **options: Any) -> Owner:
        self.store.acquire()
        self.state = self.store.load(zone, now=T0, **options)
        self.table.load(self.state.records, self.state.kept, self.state.account_tasks)
        self.table.extra.update(self.state.extra)
        return self

    def commit(self) -> None:
        image = self.table.capture(
            full=self.store.wants_full_image(), current_below=self.kind.current_below
        )
        self.store.commit(image, T0)
        self.table.saved(image.version)

    def close(self) -> None:
        self.store.close()
        self.store.release()


@pytest.fixture
def owners(kind: Kind, place: Path) -> Iterator[Callable[[], Owner]]:
    """Opens owners one after the other on ``place``; each is closed at the end (if open)."""
    made: list[Owner] = []

    def open_owner(**options: Any) -> Owner:
        owner = Owner(kind, place).open(**options)
        made.append(owner)
        return owner

    yield open_owner
    for owner in made:
        owner.close()


def reopened(kind: Kind, place: Path, **options: Any) -> StoredState:
    """The state a new owner loads (it closes at once)."""
    owner = Owner(kind, place).open(**options)
    owner.close()
    assert owner.state is not None
    return owner.state


def expected(owner: Owner) -> tuple[list[TaskRecord], dict[str, list[str]]]:
    return owner.table.records(), owner.table.account_tasks()


def ordered(state: StoredState) -> dict[str, list[str]]:
    """The accounts' orders of ``state`` as its owner's table reconciles them."""
    table = TaskTable()
    table.load(state.records, [], state.account_tasks)
    return table.account_tasks()


def test_a_new_store_loads_empty(kind: Kind, place: Path) -> None:
    owner = Owner(kind, place).open()
    state = owner.state
    assert state is not None
    assert (state.records, state.kept, state.account_tasks, state.extra) == ([], [], {}, {})
    assert state.exists is False
    assert state.timezone is SHANGHAI
    assert state.recorded_zone is None
    assert owner.store.timezone_key == "Asia/Shanghai"
    owner.close()
    read = kind.make(place).read()
    assert (read.records, read.kept, read.exists) == ([], [], False)


def test_committed_state_loads_back_equal(kind: Kind, place: Path) -> None:
    owner = Owner(kind, place).open()
    owner.table.add(
        [record("a1", account="a"), record("b1", account="b"), record("a2", account="a")]
    )
    owner.commit()
    owner.table.update("a1", lambda r: r.replace(run_count=3, updated_at=T0 + timedelta(1)))
    owner.commit()
    want = expected(owner)
    owner.close()
    state = reopened(kind, place)
    assert (state.records, ordered(state)) == want
    assert state.exists is True
    assert state.recorded_zone == "Asia/Shanghai"
    assert state.timezone == SHANGHAI


def test_removals_and_reorders_survive(kind: Kind, place: Path) -> None:
    owner = Owner(kind, place).open()
    owner.table.add([record(f"a{i}", account="a") for i in range(40)])
    owner.table.add([record(f"b{i}", account="b") for i in range(5)])
    owner.commit()
    owner.table.remove("a3")
    owner.table.reorder("b4", 0)  # a few moves in one account
    owner.commit()
    for i in range(30):  # many in another: its whole order is written
        owner.table.reorder(f"a{i + 4}", 0)
    owner.table.remove("b2")
    owner.table.add([record("b2", account="b")])  # removed, then added again: last
    owner.commit()
    want = expected(owner)
    assert want[1]["b"][-1] == "b2"
    owner.close()
    state = reopened(kind, place)
    assert (state.records, ordered(state)) == want


def test_kept_records_and_extra_keys_survive_verbatim(kind: Kind, place: Path) -> None:
    invalid = {"task_id": "bad", "account_id": "a", "interval": "often", "x": [1, {"y": None}]}
    refused = record("refused", account="a").to_json_dict()
    owner = Owner(kind, place).open()
    owner.table.add([record("ok", account="a"), record("refused", account="a")])
    owner.table.load([], [(invalid, "bad"), ("not an object", None)], {})
    owner.table.extra.update({"x-host": {"note": "kept", "n": [1, 2]}})
    owner.table.touch()
    owner.commit()
    owner.close()

    def refuse(made: TaskRecord) -> None:
        if made.task_id == "refused":
            raise InvalidTaskError("sys_type", "no manager here")

    again = Owner(kind, place).open(accept=refuse)
    assert again.state is not None
    assert [r.task_id for r in again.state.records] == ["ok"]
    assert again.state.kept == [(refused, "refused"), (invalid, "bad"), ("not an object", None)]
    assert again.state.extra == {"x-host": {"note": "kept", "n": [1, 2]}}
    again.table.add([record("new", account="a")])  # commits of changes only keep them too
    again.commit()
    again.table.update("ok", lambda r: r.replace(run_count=1))
    again.commit()
    again.close()
    state = reopened(kind, place)
    # (where a record kept unrestored lies among the others is the store's to choose)
    assert sorted(r.task_id for r in state.records) == ["new", "ok", "refused"]
    assert state.kept == [(invalid, "bad"), ("not an object", None)]
    assert state.extra == {"x-host": {"note": "kept", "n": [1, 2]}}


def test_ownership_is_exclusive_and_named(kind: Kind, place: Path) -> None:
    first, second = kind.make(place), kind.make(place)
    first.acquire()
    try:
        with pytest.raises(DispatcherError, match=re.escape(kind.where(place))):
            second.acquire()
        first.acquire()  # what this object owns already, it may acquire again
    finally:
        first.release()
    second.acquire()
    try:
        with pytest.raises(DispatcherError, match="in use"):
            first.acquire()
    finally:
        second.release()
        second.release()  # a no-op once released


def test_loading_needs_ownership(kind: Kind, place: Path) -> None:
    with pytest.raises(RuntimeError, match="acquire"):
        kind.make(place).load(SHANGHAI)


def test_a_reader_reads_while_the_owner_holds_it(kind: Kind, place: Path) -> None:
    owner = Owner(kind, place).open()
    owner.table.add([record("a1", account="a"), record("a2", account="a")])
    owner.table.reorder("a2", 0)
    owner.table.extra["x-host"] = 1
    owner.table.touch()
    owner.commit()
    owner.table.update("a1", lambda r: r.replace(run_count=7))
    owner.commit()
    reader = kind.make(place)
    state = reader.read()
    assert state.timezone == SHANGHAI
    assert [(r.task_id, r.run_count) for r in state.records] == [("a1", 7), ("a2", 0)]
    assert ordered(state) == {"a": ["a2", "a1"]}
    assert state.extra == {"x-host": 1}
    snapshot = read_snapshot(place, store=reader)
    assert snapshot.account_tasks == {"a": ["a2", "a1"]}
    assert snapshot.path == reader.path
    # The reader took nothing: the owner still commits, and closes.
    owner.table.remove("a2")
    owner.commit()
    assert [r.task_id for r in kind.make(place).read().records] == ["a1"]
    owner.close()


def test_a_reader_takes_the_recorded_zone_or_refuses_another(kind: Kind, place: Path) -> None:
    owner = Owner(kind, place).open()
    owner.table.add([record("a1", account="a")])
    owner.commit()
    owner.close()
    reader = kind.make(place)
    assert reader.read().timezone == SHANGHAI
    with pytest.raises(TimezoneMismatchError):
        reader.read(UTC)
    assert reader.read(UTC, convert=True).timezone is UTC


def test_the_owner_changes_the_recorded_zone_only_when_asked(kind: Kind, place: Path) -> None:
    owner = Owner(kind, place).open()
    owner.table.add([record("a1", account="a")])
    owner.commit()
    owner.close()
    refused = kind.make(place)
    refused.acquire()
    try:
        with pytest.raises(TimezoneMismatchError, match="Asia/Shanghai"):
            refused.load(UTC)
    finally:
        refused.release()
    converting = Owner(kind, place).open(zone=UTC, convert=True)
    assert converting.state is not None
    assert (converting.state.timezone, converting.state.recorded_zone) == (UTC, "Asia/Shanghai")
    assert converting.store.timezone_key == "UTC"
    converting.table.touch()
    converting.commit()
    converting.close()
    state = reopened(kind, place, zone=None)
    assert (state.timezone, state.recorded_zone) == (UTC, "UTC")


def test_a_failed_commit_leaves_the_previous_durable_state(kind: Kind, place: Path) -> None:
    for failing, says in kind.failures:
        owner = Owner(kind, place).open()
        owner.table.add([record("a1", account="a"), record("a2", account="a")])
        owner.commit()
        before = expected(owner)
        owner.table.update("a1", lambda r: r.replace(run_count=5))
        owner.table.remove("a2")
        owner.table.add([record("a3", account="a")])
        with failing(), pytest.raises(OSError, match=says):
            owner.commit()
        # A crash now: a new owner loads what was durable before the failed commit.
        owner.close()
        state = reopened(kind, place)
        assert (state.records, ordered(state)) == before
        assert [r.run_count for r in state.records] == [0, 0]
        owner = Owner(kind, place).open()  # the next round starts empty again
        for task_id in ("a1", "a2"):
            owner.table.remove(task_id)
        owner.commit()
        owner.close()


def test_after_a_failed_commit_the_next_one_writes_its_changes(kind: Kind, place: Path) -> None:
    for failing, says in kind.failures:
        owner = Owner(kind, place).open()
        owner.table.add([record("a1", account="a")])
        owner.commit()
        owner.table.add([record("a2", account="a")])
        with failing(), pytest.raises(OSError, match=says):
            owner.commit()
        owner.table.update("a1", lambda r: r.replace(run_count=2))
        owner.commit()
        want = expected(owner)
        owner.close()
        state = reopened(kind, place)
        assert (state.records, ordered(state)) == want
        assert [r.run_count for r in state.records] == [2, 0]
        owner = Owner(kind, place).open()  # the next round starts empty again
        for task_id in ("a1", "a2"):
            owner.table.remove(task_id)
        owner.commit()
        owner.close()
