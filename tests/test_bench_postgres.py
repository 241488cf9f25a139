"""The benchmark's PostgreSQL case runs at a tiny size and prints its table (no timing is
checked: figures come from ``python -m bench`` runs, never from tests)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres_support import ADMIN_DSN, Databases, postgres_databases

from bench.postgres import build, cold_start, peer_url, store_url, takeover
from bench.run import this_process

__all__ = ["postgres_databases"]  # a fixture of every test here

ROOT = Path(__file__).resolve().parent.parent
BENCH = (sys.executable, "-m", "bench")


def bench_databases() -> set[str]:
    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
        rows: list[Any] = admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'td\\_bench\\_%'"
        ).fetchall()
    return {name for (name,) in rows}


@pytest.mark.timeout(300)
def test_the_postgres_case_prints_every_ratio_and_drops_its_databases(
    postgres_databases: Databases,
) -> None:
    before = bench_databases()
    ran = subprocess.run(
        [*BENCH, "--postgres", ADMIN_DSN, "--sizes", "20", "--steps", "mutations", "cold_start"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ran.returncode == 0, ran.stderr
    assert "| (a) ours on PostgreSQL | (b) SQLAlchemyJobStore on PostgreSQL | a/b |" in ran.stdout
    rows = [line for line in ran.stdout.splitlines() if line.startswith("| 20 |")]
    measured = [row.split("|")[2].strip() for row in rows]
    assert measured == [
        "durable pause/resume of one task: p50",
        "durable pause/resume of one task: p99",
        "one awaited add_task, sequential, into the loaded store: p50",
        "one awaited add_task, sequential, into the loaded store: p99",
        "the same, the peer's add_job off the event loop (to_thread): p50",
        "cold start on a store of N tasks",
        "of which pydantic building the N records, against the peer's whole start",
    ]
    assert all(re.search(r"\| \d+\.\d\dx \|$", row) for row in rows), ran.stdout
    assert bench_databases() <= before  # the run's databases are dropped


@pytest.mark.timeout(300)
def test_the_takeover_step_kills_a_leader_and_times_the_standby(
    postgres_databases: Databases, tmp_path: Path
) -> None:
    before = bench_databases()
    rows = takeover(20, ADMIN_DSN, tmp_path, kills=2)
    assert [row.metric.split(":")[-1] for row in rows] == [" p50", " p99", " p50", " p99"]
    assert all((row.values["ours"] or 0) > 0 for row in rows)
    assert bench_databases() <= before


def test_each_side_of_the_cold_start_is_timed_in_a_fresh_process(
    postgres_databases: Databases, tmp_path: Path
) -> None:
    our_url = store_url(postgres_databases.create())
    their_url = peer_url(postgres_databases.create())

    async def measure() -> Any:
        alive = this_process().leftovers  # what earlier tests of this process still hold
        await build(200, our_url, their_url, tmp_path)
        assert this_process().leftovers <= alive  # what the build held is let go
        return await cold_start(200, our_url, their_url, tmp_path)

    row, alone = asyncio.run(measure())
    assert row.values["ours"] is not None
    assert row.values["sqlalchemy"] is not None
    ours, theirs = row.started["ours"], row.started["sqlalchemy"]
    building = alone.started["ours"]
    assert len({ours.pid, theirs.pid, building.pid, os.getpid()}) == 4
    assert ours.leftovers == theirs.leftovers == building.leftovers == 0
    # The records built alone are set against the peer's whole start, in the same run.
    assert alone.values["ours"] is not None
    assert alone.values["sqlalchemy"] == row.values["sqlalchemy"]
