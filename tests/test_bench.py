"""The benchmark's measurements run alone: a step that reads the stores builds them when the
step that builds them (``add_one_by_one``) is left out. No timing is checked: figures come
from ``python -m bench`` runs, never from tests."""

from __future__ import annotations

import pytest

from bench.run import run

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
