"""The document's encoding, piece by piece."""

from __future__ import annotations

import orjson
import pytest

from jobstores.format import encode_account_tasks


@pytest.mark.parametrize(
    "account_tasks",
    [
        {},
        {"acc": []},
        {"acc": ["t1"]},
        {"a": ["t1", "t2"], "b": [], "c": ["t3"]},
        {"账号": ["任务-1", 'quote"and\\slash']},
        {f"account_{i}": [f"task-{i}-{j}" for j in range(i % 5)] for i in range(40)},
    ],
)
def test_account_tasks_encoded_an_account_at_a_time_are_the_whole_encoding(
    account_tasks: dict[str, list[str]],
) -> None:
    whole = orjson.dumps(account_tasks, option=orjson.OPT_INDENT_2).replace(b"\n", b"\n  ")
    pauses: list[None] = []
    assert encode_account_tasks(account_tasks, lambda: pauses.append(None)) == whole
    assert encode_account_tasks(account_tasks) == whole
    assert orjson.loads(whole) == account_tasks


def test_a_writer_is_paused_every_few_accounts() -> None:
    account_tasks = {f"account_{i}": [f"task-{i}"] for i in range(100)}
    pauses: list[None] = []
    encode_account_tasks(account_tasks, lambda: pauses.append(None))
    assert len(pauses) == 6  # after every 16 accounts, none before the first


def test_a_background_writer_pauses_once_per_slice_of_work_not_once_per_piece(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Encoding 1,000 accounts makes 62 pieces; a pause at each one made a save on a busy
    dispatcher wait for the interpreter 62 times. It sleeps once per PAUSE_EVERY of work."""
    import time

    from jobstores import pacing

    now = [100.0]
    sleeps: list[float] = []
    monkeypatch.setattr(pacing, "_clock", lambda: now[0])
    monkeypatch.setattr(time, "sleep", sleeps.append)
    monkeypatch.setattr(pacing, "_held", type(pacing._held)())  # this thread starts afresh
    accounts = {f"account-{i}": [f"task-{i}"] for i in range(1_000)}

    encode_account_tasks(accounts, pacing.pause)  # no time passes: the work is one slice
    assert sleeps == []

    def slow() -> None:  # each piece takes 0.4 ms
        now[0] += 0.0004
        pacing.pause()

    encode_account_tasks(accounts, slow)  # 62 pieces, 24.8 ms: a sleep every 3 pieces
    assert len(sleeps) == 20
    assert set(sleeps) == {pacing.PAUSE}
