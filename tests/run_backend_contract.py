"""The contract every run backend keeps, under a real dispatcher and its run ledger.

The scenarios are collected by one test module per backend kind, each with its ``harness``
fixture: ``tests/scheduler/test_run_backend_contract.py`` (the local backend and the stub) and
``tests/fleet/test_run_backend_contract.py`` (Celery: real Redis, a real worker process).

A run's outcome is applied once; a duplicate outcome changes nothing; an outcome that comes
after its run was closed (lost) is dropped; events out of order (finished before started)
end in the finished state; after a dispatcher restart a run in flight is recovered (remote
backends: its outcome applied once; the local one: closed without counting, as its run died
with the process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet_probe import read_probe
from fleet_support import eventually, probe_task
from stub_backend import StubRunBackend, StubWorld

from scheduler import TaskDispatcher
from tasks import TaskRecord, TaskStatus
from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest

__all__ = [
    "Harness",
    "test_a_run_enters_the_core_when_it_opens_and_when_it_ends",
    "test_a_run_in_flight_at_a_restart_is_recovered_and_its_outcome_applied_once",
    "test_an_outcome_after_the_run_was_declared_lost_is_dropped",
    "test_an_outcome_is_applied_once_and_a_duplicate_changes_nothing",
    "test_finished_before_started_ends_finished",
]


class _Recording:
    """The dispatcher's inbox, noting the finishing events the backend itself delivered."""

    def __init__(self, inbox: RunInbox, delivered: dict[str, RunEvent]) -> None:
        self._inbox = inbox
        self._delivered = delivered

    async def deliver(self, event: RunEvent) -> None:
        await self._inbox.deliver(event)
        if event.kind.finished:
            self._delivered[event.run_id] = event

    async def deliver_batch(self, events: Sequence[RunEvent]) -> None:
        await self._inbox.deliver_batch(events)  # type: ignore[attr-defined]
        for event in events:
            if event.kind.finished:
                self._delivered[event.run_id] = event


class Harness:
    """One kind of backend, made anew for each dispatcher (over the same runs' world)."""

    def __init__(
        self, kind: str, make: Callable[[], RunBackend], probe: Path, world: StubWorld | None = None
    ) -> None:
        self.kind = kind
        self._make = make
        self.probe = probe
        """The probe managers' log (the local and Celery backends run ``fleet_probe``)."""
        self.backend: RunBackend | None = None
        self.inbox: RunInbox | None = None
        """The dispatcher's own inbox (its ledger): what the test delivers to directly."""
        self.delivered: dict[str, RunEvent] = {}
        """Run id -> the finishing event the backend delivered for it."""
        self.runs: dict[str, str] = {}
        """Task id -> the id of its last run sent to the backend."""
        self.world = world if world is not None else StubWorld()

    def dispatcher(self, directory: Path) -> TaskDispatcher:
        backend = self._make()
        original = backend.open

        async def open(inbox: RunInbox) -> None:
            self.inbox = inbox
            await original(_Recording(inbox, self.delivered))

        backend.open = open  # type: ignore[method-assign]
        send = backend.submit

        async def submit(request: RunRequest) -> RunEvent | None:
            self.runs[request.task_id] = request.run_id
            return await send(request)

        backend.submit = submit  # type: ignore[method-assign]
        self.backend = backend
        return TaskDispatcher(directory, run_backend=backend, timezone="UTC")

    def executions(self, task_id: str) -> int:
        """How many times a run of ``task_id`` was executed (the stub: sent)."""
        if self.kind == "stub":
            return sum(1 for request in self.world.sent if request.task_id == task_id)
        if not self.probe.exists():
            return 0
        lines = read_probe(self.probe)
        return sum(1 for line in lines if line["task_id"] == task_id and line["phase"] == "start")

    async def executing(self, task_id: str) -> None:
        """Return once a run of ``task_id`` executes."""
        await eventually(lambda: self.executions(task_id) >= 1, 30, f"a run of {task_id}")

    async def outcome(self, run_id: str) -> RunEvent:
        """The backend's own finishing event of ``run_id``, once the dispatcher took it (the
        stub's runs end here, as succeeded)."""
        if isinstance(self.backend, StubRunBackend) and run_id in self.world.out:
            await self.backend.finish(run_id)
        event: RunEvent = await eventually(
            lambda: self.delivered.get(run_id), 30, f"the outcome of {run_id}"
        )
        return event


class _CountingCore:
    """Wraps the dispatcher's task core: every command applied, in order (the core still
    applies each one; this only notes its kind and task)."""

    def __init__(self, dispatcher: TaskDispatcher) -> None:
        self.applied: list[tuple[str, str]] = []
        core = dispatcher._store._core
        apply = core.apply

        def counting(command: Any, now: datetime) -> Any:
            self.applied.append((type(command).__name__, _task_of(command)))
            return apply(command, now)

        core.apply = counting  # type: ignore[method-assign]

    def of(self, task_id: str) -> list[str]:
        """The commands applied for ``task_id``'s runs (not the scheduler's planning)."""
        return [
            name
            for name, task in self.applied
            if task == task_id and name not in ("AddTasks", "Planned", "Exhausted")
        ]


def _task_of(command: Any) -> str:
    if hasattr(command, "task_id"):
        return str(command.task_id)
    if hasattr(command, "event"):
        return str(command.event.task_id)
    return ",".join(record.task_id for record in command.records)


def _dump(record: TaskRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


def _event(
    record: TaskRecord, run_id: str, kind: RunEventKind, error: str | None = None
) -> RunEvent:
    return RunEvent(run_id, record.task_id, kind, at=datetime.now(UTC), worker="w9", error=error)


async def _first_run(
    dispatcher: TaskDispatcher, harness: Harness, seconds: float
) -> tuple[str, str]:
    """Add a task whose first run is due now; its task id and run id, once it executes."""
    task_id = await dispatcher.add_task(**probe_task(harness.probe, "a", seconds=seconds))
    run_id: str = await eventually(
        lambda: harness.runs.get(task_id), 30, f"a run of {task_id} sent"
    )
    await harness.executing(task_id)
    return task_id, run_id


async def test_an_outcome_is_applied_once_and_a_duplicate_changes_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    async with harness.dispatcher(tmp_path / "ops") as dispatcher:
        task_id, run_id = await _first_run(dispatcher, harness, seconds=0.0)
        event = await harness.outcome(run_id)
        done = dispatcher.get_task(task_id)
        assert event.kind is RunEventKind.SUCCEEDED
        assert (done.run_count, done.failure_count, done.active_run) == (1, 0, None)
        assert done.status is TaskStatus.PENDING
        assert done.last_execution_time is not None
        assert harness.executions(task_id) == 1
        # The same outcome again (a redelivered message), and a conflicting copy.
        assert harness.inbox is not None
        await harness.inbox.deliver(event)
        await harness.inbox.deliver(
            _event(done, run_id, RunEventKind.FAILED, "RuntimeError: a late copy")
        )
        assert _dump(dispatcher.get_task(task_id)) == _dump(done)
        assert harness.executions(task_id) == 1


async def test_an_outcome_after_the_run_was_declared_lost_is_dropped(
    harness: Harness, tmp_path: Path
) -> None:
    async with harness.dispatcher(tmp_path / "ops") as dispatcher:
        task_id, run_id = await _first_run(dispatcher, harness, seconds=1.0)
        record = dispatcher.get_task(task_id)
        assert harness.inbox is not None
        await harness.inbox.deliver(
            _event(record, run_id, RunEventKind.LOST, "WorkerLostError: no heartbeat")
        )
        lost = dispatcher.get_task(task_id)
        assert (lost.run_count, lost.failure_count, lost.active_run) == (1, 1, None)
        assert lost.last_error == "WorkerLostError: no heartbeat"
        # The run ends after all (its worker was only slow): its outcome comes too late.
        late = await harness.outcome(run_id)
        assert late.kind is RunEventKind.SUCCEEDED
        assert _dump(dispatcher.get_task(task_id)) == _dump(lost)
        assert harness.executions(task_id) == 1


async def test_finished_before_started_ends_finished(harness: Harness, tmp_path: Path) -> None:
    async with harness.dispatcher(tmp_path / "ops") as dispatcher:
        task_id, run_id = await _first_run(dispatcher, harness, seconds=1.0)
        record = dispatcher.get_task(task_id)
        assert harness.inbox is not None
        await harness.inbox.deliver(_event(record, run_id, RunEventKind.SUCCEEDED))
        await harness.inbox.deliver(_event(record, run_id, RunEventKind.STARTED))
        done = dispatcher.get_task(task_id)
        assert (done.run_count, done.failure_count, done.active_run) == (1, 0, None)
        assert done.status is TaskStatus.PENDING
        assert done.last_worker == "w9"
        # The backend's own events for the run (started, then its end) change nothing now.
        await harness.outcome(run_id)
        assert _dump(dispatcher.get_task(task_id)) == _dump(done)


async def test_a_run_in_flight_at_a_restart_is_recovered_and_its_outcome_applied_once(
    harness: Harness, tmp_path: Path
) -> None:
    directory = tmp_path / "ops"
    first = harness.dispatcher(directory)
    async with first:
        task_id, run_id = await _first_run(first, harness, seconds=1.5)
        await first.stop(grace_period=0)
    again = harness.dispatcher(directory)
    if not harness.backend or not harness.backend.remote:
        # Local runs die with the process: the run is closed without counting.
        cut = again.get_task(task_id)
        assert (cut.run_count, cut.failure_count, cut.active_run) == (0, 0, None)
        return
    assert again.get_task(task_id).active_run is not None  # still out, on its worker
    async with again:
        event = await harness.outcome(run_id)
        assert event.kind is RunEventKind.SUCCEEDED
        done = again.get_task(task_id)
        assert (done.run_count, done.failure_count, done.active_run) == (1, 0, None)
        assert harness.executions(task_id) == 1  # recovered, never sent again
        assert harness.inbox is not None
        await harness.inbox.deliver(event)
        assert _dump(again.get_task(task_id)) == _dump(done)


async def test_a_run_enters_the_core_when_it_opens_and_when_it_ends(
    harness: Harness, tmp_path: Path
) -> None:
    """A local run is two commands (opened, finished); a remote one three (opened, its
    ``started`` event, finished): its end settles it, completion included."""
    async with harness.dispatcher(tmp_path / "ops") as dispatcher:
        counting = _CountingCore(dispatcher)
        task_id, run_id = await _first_run(dispatcher, harness, seconds=0.0)
        await harness.outcome(run_id)
        await dispatcher.run_pending()  # every run submitted so far is over
        remote = harness.backend is not None and harness.backend.remote
        assert counting.of(task_id) == (
            ["RunOpened", "RunReported", "RunReported"] if remote else ["RunOpened", "RunReported"]
        )
        done = dispatcher.get_task(task_id)
        assert (done.run_count, done.active_run, done.status) == (1, None, TaskStatus.PENDING)
