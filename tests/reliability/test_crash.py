"""Crash consistency: SIGKILL a dispatcher at random instants, many times, and check the file.

A child process adds, pauses, resumes, reorders and removes tasks while runs happen, reporting
each operation before and after the call. After every kill a fresh dispatcher opens the
directory: the file must load, reflect every acknowledged operation (the one in flight may or
may not have landed), hold no task that was never added, keep ``account_tasks`` in step with
``tasks``, and leave no temporary files behind. Below the snapshot threshold the file alone,
read with ``json.load`` before anything opens the directory, must say the same.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from jobstores.jsonfile import SNAPSHOT_BELOW
from scheduler import TaskDispatcher

CHILD = Path(__file__).with_name("crash_child.py")
ROOT = Path(__file__).resolve().parents[2]


SNAPSHOT_BELOW_IN = {"journal": 0, "compact": 0, "threshold": 6}
"""The dispatcher's snapshot_below in each mode (the others: the default)."""


def options(mode: str) -> dict[str, Any]:
    """The dispatcher's options in ``mode``."""
    return {"snapshot_below": SNAPSHOT_BELOW_IN[mode]} if mode in SNAPSHOT_BELOW_IN else {}


@dataclass
class Model:
    """What the acknowledged operations say the state is."""

    order: dict[str, list[str]] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)

    @property
    def ids(self) -> set[str]:
        return {task_id for ids in self.order.values() for task_id in ids}

    def account_of(self, task_id: str) -> str:
        return next(a for a, ids in self.order.items() if task_id in ids)

    def apply(self, op: dict[str, Any]) -> None:
        kind, task_id = op["op"], str(op.get("task_id"))
        if kind == "add":
            self.order.setdefault(op["account"], []).append(task_id)
        elif kind == "remove":
            account = self.account_of(task_id)
            self.order[account].remove(task_id)
            if not self.order[account]:
                del self.order[account]
            self.paused.discard(task_id)
        elif kind == "pause":
            self.paused.add(task_id)
        elif kind == "resume":
            self.paused.discard(task_id)
        elif kind == "reorder":
            ids = self.order[self.account_of(task_id)]
            ids.remove(task_id)
            ids.insert(op["position"], task_id)


class Child:
    def __init__(self, directory: Path, seed: int, mode: str = "journal") -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                str(directory),
                str(seed),
                mode,
                str(options(mode).get("snapshot_below", "")),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.acked: list[dict[str, Any]] = []
        self.intent: dict[str, Any] | None = None
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.endswith("\n"):
                break  # torn by the kill: not acknowledged
            message = json.loads(line)
            if "intent" in message:
                self.intent = message["intent"]
            else:
                if message["ack"]["op"] == "started":
                    self.started.set()
                else:
                    self.acked.append(message["ack"])
                self.intent = None

    def kill_after(self, seconds: float) -> None:
        assert self.started.wait(30), "the child did not start"
        time.sleep(seconds)  # the random instant of the crash: what is being tested
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.reader.join(30)
        assert self.process.stdout is not None
        self.process.stdout.close()


def file_alone(directory: Path) -> Model:
    """What dispatch_config.json alone says (no journal), read as the seed's host reads it."""
    with (directory / "dispatch_config.json").open(encoding="utf-8") as file:
        data = json.load(file)
    return Model(
        order=data["account_tasks"],
        paused={t["task_id"] for t in data["tasks"] if t["status"] == "paused"},
    )


def observe(directory: Path, mode: str = "journal") -> tuple[Model, dict[str, str], list[str]]:
    leftovers = sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))
    dispatcher = TaskDispatcher(
        directory,
        task_manager_factory=lambda **kw: _Noop(),
        timezone="UTC",
        **options(mode),
    )
    try:
        records = dispatcher.list_tasks()
        model = Model(
            order=dispatcher.account_tasks,
            paused={r.task_id for r in records if r.status == "paused"},
        )
        statuses = {r.task_id: r.status.value for r in records}
        assert {r.task_id for r in records} == model.ids, "account_tasks disagrees with tasks"
        for record in records:
            assert record.task_id in model.order[record.account_id]
    finally:
        dispatcher.close()
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")], (os.getpid(), leftovers)
    assert not list(directory.glob("*.corrupt-*")), "the state file was unreadable after a crash"
    return model, statuses, leftovers


class _Noop:
    def run(self) -> None:
        raise AssertionError("observing never runs tasks")


def crash_loop(directory: Path, kills: int, seed: int, mode: str = "journal") -> dict[str, int]:
    rng = random.Random(seed)
    base, _, _ = (
        observe(directory, mode)
        if (directory / "dispatch_config.json").exists()
        else (Model(), {}, [])
    )
    threshold = options(mode).get("snapshot_below", SNAPSHOT_BELOW)
    attempted: set[str] = set()
    stats = {
        "kills": 0,
        "acknowledged": 0,
        "in_flight_landed": 0,
        "max_leftovers": 0,
        "file_alone_checked": 0,
    }
    for round_number in range(kills):
        child = Child(directory, seed * 100_000 + round_number, mode)
        child.kill_after(rng.choice([0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4]))
        stats["kills"] += 1
        stats["acknowledged"] += len(child.acked)
        attempted.update(op["task_id"] for op in child.acked if op["op"] == "add")
        if child.intent and child.intent["op"] == "add":
            attempted.add(child.intent["task_id"])
        expected = copy.deepcopy(base)
        for op in child.acked:
            expected.apply(op)
        with_intent = copy.deepcopy(expected)
        if child.intent is not None:
            with_intent.apply(child.intent)
        if mode != "snapshot" and len(expected.ids) < threshold and child.acked:
            stats["file_alone_checked"] += 1
            alone = file_alone(directory)
            assert any(
                (m.order, m.paused) == (alone.order, alone.paused) for m in (expected, with_intent)
            ), (
                f"round {round_number}: the file alone lags: acknowledged {child.acked[-3:]}, "
                f"in flight {child.intent}\nexpected {expected}\nthe file alone {alone}"
            )
        observed, _, leftovers = observe(directory, mode)
        stats["max_leftovers"] = max(stats["max_leftovers"], len(leftovers))
        assert observed.ids <= attempted, f"tasks never added: {observed.ids - attempted}"
        matches = [
            m
            for m in (expected, with_intent)
            if (m.order, m.paused) == (observed.order, observed.paused)
        ]
        assert matches, (
            f"round {round_number}: acknowledged {child.acked[-3:]}, in flight {child.intent}\n"
            f"expected {expected}\nobserved {observed}"
        )
        if matches[0] is with_intent and child.intent is not None and expected != with_intent:
            stats["in_flight_landed"] += 1
        base = observed
    return stats


MODES = ["journal", "compact", "current", "threshold", "snapshot"]
"""The journal taking every change, the journal folded into the snapshot at almost every
commit (kills land during compactions), a small store (every commit writes the file), a
store crossing its threshold both ways, and the whole-file snapshot backend."""


@pytest.mark.parametrize("mode", MODES)
def test_kill_9_at_random_instants(tmp_path: Path, mode: str) -> None:
    stats = crash_loop(tmp_path / "store", kills=12, seed=1, mode=mode)
    assert stats["kills"] == 12
    assert stats["acknowledged"] > 0
    if mode in ("current", "threshold"):
        assert stats["file_alone_checked"] > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("mode", MODES)
def test_kill_9_two_hundred_times(tmp_path: Path, mode: str) -> None:
    stats = crash_loop(tmp_path / "store", kills=200, seed=7, mode=mode)
    print(f"crash loop ({mode}): {stats}")
    assert stats["kills"] == 200
    assert stats["acknowledged"] > 200
