"""``AccountOrder``: positions and ranks after appends, moves and removals, small and large
accounts alike, and the moves a save writes replaying into the current order."""

from __future__ import annotations

import threading

import pytest
from helpers import record
from hypothesis import given, settings
from hypothesis import strategies as st

from jobstores.order import MOVES_PER_ACCOUNT, RANKED_ORDER, UNKNOWN_POSITION, AccountOrder


def order_of(accounts: dict[str, list[str]]) -> AccountOrder:
    order = AccountOrder(threading.RLock())
    for account, ids in accounts.items():
        for task_id in ids:
            order.append(account, task_id)
    return order


def positions(order: AccountOrder, account: str) -> list[int]:
    return [order.position(account, task_id) for task_id in order.of(account)]


def test_appending_places_each_task_last_in_its_own_account() -> None:
    order = order_of({"a": ["a1", "a2"], "b": ["b1"]})
    order.append("a", "a3")
    assert order.accounts() == {"a": ["a1", "a2", "a3"], "b": ["b1"]}
    assert [order.position("a", t) for t in ("a1", "a2", "a3")] == [0, 1, 2]
    assert order.position("b", "b1") == 0
    assert order.size("a") == 3


def test_moving_a_task_shifts_the_ones_between_and_bumps_the_version() -> None:
    order = order_of({"a": ["t0", "t1", "t2", "t3"]})
    version = order.version
    order.move("a", "t3", 1)
    assert order.of("a") == ["t0", "t3", "t1", "t2"]
    assert positions(order, "a") == [0, 1, 2, 3]
    order.move("a", "t0", 3)
    assert order.of("a") == ["t3", "t1", "t2", "t0"]
    assert order.version == version + 2


def test_removing_a_task_closes_the_gap_and_an_empty_account_goes() -> None:
    order = order_of({"a": ["t0", "t1", "t2"], "b": ["u0"]})
    version = order.version
    order.remove("a", "t1")
    assert order.of("a") == ["t0", "t2"]
    assert order.position("a", "t2") == 1
    assert order.position("a", "t1") == UNKNOWN_POSITION
    order.remove("b", "u0")
    assert order.accounts() == {"a": ["t0", "t2"]}
    assert order.size("b") == 0
    assert order.position("b", "u0") == order.rank("b", "u0") == UNKNOWN_POSITION
    assert order.version == version + 2


def test_a_large_account_ranks_its_tasks_in_their_order_through_every_change() -> None:
    ids = [f"t{i}" for i in range(RANKED_ORDER + 10)]
    order = order_of({"a": ids})
    assert order.rank("a", "t5") < order.rank("a", "t6")  # ranks built on first ask
    order.append("a", "new")
    order.move("a", "new", 0)
    order.move("a", "t0", 7)
    order.remove("a", "t3")
    current = order.of("a")
    assert current[0] == "new"
    assert current[6] == "t0"
    assert "t3" not in current
    assert positions(order, "a") == list(range(len(current)))
    ranks = [order.rank("a", task_id) for task_id in current]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)


def test_moves_between_close_neighbours_rank_the_account_afresh() -> None:
    ids = [f"t{i}" for i in range(RANKED_ORDER + 1)]
    order = order_of({"a": ids})
    order.rank("a", "t0")
    for _ in range(80):  # halving the gap between t0 and t1 until no number fits
        order.move("a", ids[-1], 1)
        ids.insert(1, ids.pop())
    assert order.of("a") == ids
    ranks = [order.rank("a", task_id) for task_id in ids]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)


def test_load_places_tasks_as_the_hint_does_and_reports_what_it_cannot_place() -> None:
    order = AccountOrder(threading.RLock())
    loaded = [record("a1", account="a"), record("a2", account="a"), record("a3", account="a")]
    records = {r.task_id: r for r in [*loaded, record("b1", account="b")]}
    unplaced = order.load(records, {"a": ["a2", "gone", "a1", "b1"], "c": ["c1"]})
    # a3 is not in the hint: last, in file order; b is not in the hint at all
    assert order.accounts() == {"a": ["a2", "a1", "a3"], "b": ["b1"]}
    assert unplaced == [("a", "gone"), ("a", "b1"), ("c", "c1")]


def replay(
    before: dict[str, list[str]],
    orders: dict[str, list[str]],
    moves: list[tuple[str, str, str | None]],
) -> dict[str, list[str]]:
    result = {account: list(ids) for account, ids in before.items()}
    result.update({account: list(ids) for account, ids in orders.items()})
    for account, task_id, following in moves:
        ids = result[account]
        ids.remove(task_id)
        ids.insert(len(ids) if following is None else ids.index(following), task_id)
    return result


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=RANKED_ORDER + 20),
    steps=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0)), max_size=90),
)
def test_the_reorders_a_save_writes_replay_into_the_current_order(
    size: int, steps: list[tuple[int, int]]
) -> None:
    ids = [f"t{i}" for i in range(size)]
    order = order_of({"a": ids})
    before = order.accounts()
    moved: set[str] = set()
    for pick, to in steps:
        task_id = order.of("a")[pick % size]
        order.move("a", task_id, to % size)
        moved.add(task_id)
    orders, moves = order.reorders({"a": moved} if moved else {}, order.of)
    assert replay(before, orders, moves) == order.accounts()
    assert ("a" in orders) == (len(moved) > MOVES_PER_ACCOUNT)


@pytest.mark.parametrize("position", [0, 2, 4])
def test_a_move_to_the_same_place_changes_no_position(position: int) -> None:
    order = order_of({"a": ["t0", "t1", "t2", "t3", "t4"]})
    task_id = order.of("a")[position]
    order.move("a", task_id, position)
    assert order.of("a") == ["t0", "t1", "t2", "t3", "t4"]
