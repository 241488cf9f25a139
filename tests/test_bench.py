"""The benchmark's measurements run alone: a step that reads the stores builds them when the
step that builds them (``add_one_by_one``) is left out. No timing is checked: figures come
from ``python -m bench`` runs, never from tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.run import build_stores, cold_start, run, this_process

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("steps", [["cold_start"], ["memory"]])
async def test_steps_that_read_the_stores_run_without_the_step_that_builds_them(
    steps: list[str],
) -> None:
    rows = await run([20], [], steps)
    assert rows
    for row in rows:
        assert row.n == 20
        assert row.values["ours"] is not None
    cold = [row for row in rows if row.metric.startswith("cold start")]
    assert len(cold) == ("cold_start" in steps)
    for row in cold:
        assert row.values["sqlalchemy"] is not None  # the peer's store was built too


async def test_memory_shows_the_store_without_the_lines_it_keeps_for_the_next_write() -> None:
    # Below KEEP_LINES_BELOW tasks each task's encoded line (hundreds of bytes) is kept after
    # a snapshot written at a commit; the second row is the same store once they are let go.
    measured, bare = await run([50], [], ["memory"])
    assert measured.metric == "memory per task (tracemalloc)"
    assert bare.metric == "  the same, ours without the lines kept for the next write"
    ours, without = measured.values["ours"], bare.values["ours"]
    assert ours is not None
    assert without is not None
    assert ours - without > 500  # bytes per task: about one encoded line each
    assert measured.values["sqlalchemy"] is not None
    assert bare.values["sqlalchemy"] == measured.values["sqlalchemy"]


async def test_building_the_stores_leaves_no_task_or_job_alive(tmp_path: Path) -> None:
    # The peers' shutdowns let their jobs go on the loop's next turn: the build waits for it,
    # so that the next timed call neither carries them nor frees them. Above 10,000 tasks the
    # SQLite peer is filled from a scheduler holding every job in memory.
    alive = this_process().leftovers  # what earlier tests of this process still hold
    await build_stores(10_001, tmp_path)
    assert this_process().leftovers <= alive


async def test_each_side_of_the_cold_start_is_timed_in_a_fresh_process(tmp_path: Path) -> None:
    await build_stores(200, tmp_path)
    row, alone = await cold_start(200, tmp_path)
    assert row.values["ours"] is not None
    assert row.values["sqlalchemy"] is not None
    ours, theirs = row.started["ours"], row.started["sqlalchemy"]
    building = alone.started["ours"]
    assert len({ours.pid, theirs.pid, building.pid, os.getpid()}) == 4
    assert ours.leftovers == theirs.leftovers == building.leftovers == 0
    # The records built alone are set against the peer's whole start, in the same run.
    assert alone.values["ours"] is not None
    assert alone.values["sqlalchemy"] == row.values["sqlalchemy"]


def test_the_fleet_reports_its_median_round_and_every_rounds_ratio() -> None:
    """One round's ratio swings by a third on a shared machine: the table shows the median
    round (the lower middle one of an even count) and each round's ratio in turn."""
    from bench.fleet import FleetResult, fleet_table, median_round

    def burst(ours: float, bare: float, cpu: float) -> tuple[FleetResult, FleetResult]:
        return (
            FleetResult(ours, 900.0, 1800.0, cpu, 1.2),
            FleetResult(bare, 700.0, 1400.0, 0.5, 0.9),
        )

    bursts = [burst(500, 1000, 1.1), burst(700, 1000, 0.9), burst(600, 1000, 1.0)]
    ours, _, ratios = median_round(bursts)
    assert ratios == [0.5, 0.7, 0.6]
    assert (ours.runs_per_s, ours.cpu_here) == (600, 1.0)
    assert median_round([*bursts, burst(800, 1000, 0.8)])[0].runs_per_s == 600
    paced = (FleetResult(50, 4.0, 20.0), FleetResult(50, 3.0, 10.0))
    table = fleet_table(1000, bursts, paced, 0.02).splitlines()
    assert (
        table[2]
        == "| 1,000 | all due at once: runs/s (median of 3 rounds) | 600/s | 1,000/s | 0.60x |"
    )
    assert table[3] == (
        "| 1,000 | all due at once: a/b of each round, in turn | 0.50x, 0.70x, 0.60x | | "
        "0.50x to 0.70x |"
    )
    assert (
        "| 1,000 | all due at once: CPU per 1,000 runs, dispatcher (a) / publisher (b) | "
        "1.00 s | 0.50 s | 2.00x |" in table
    )
    assert "| 200 | due at 50/s: due -> start p99 | 20.0 ms | 10.0 ms | 2.00x |" in table
