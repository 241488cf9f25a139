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
