"""``KeptRecords``: unrestorable records stay as read, keep their ids taken and their place."""

from __future__ import annotations

from jobstores.kept import KeptRecords


def test_kept_records_stay_as_read_and_keep_their_ids_taken() -> None:
    kept = KeptRecords()
    first, second, nameless = {"task_id": "k1", "x": 1}, {"task_id": "k2"}, {"junk": True}
    kept.load([(first, "k1"), (second, "k2"), (nameless, None)])
    assert kept.records() == [first, second, nameless]
    assert kept.records()[0] is first  # as read, not rebuilt
    assert len(kept) == 3
    assert ("k1" in kept, "k2" in kept, "k3" in kept, None in kept) == (True, True, False, False)


def test_kept_ids_are_placed_per_account_in_the_order_given() -> None:
    kept = KeptRecords()
    kept.load([({}, "k1"), ({}, "k2"), ({}, "k3")])
    kept.place("a", "k2")
    kept.place("b", "k3")
    kept.place("a", "k1")
    assert (kept.order_of("a"), kept.order_of("b"), kept.order_of("c")) == (
        ["k2", "k1"],
        ["k3"],
        [],
    )
    assert dict(kept.orders()) == {"a": ["k2", "k1"], "b": ["k3"]}
