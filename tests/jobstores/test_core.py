"""The task core as tables: each command -> the record change and the events, at a given time."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from helpers import SHANGHAI, T0, record

from jobstores.commands import (
    AddTasks,
    Command,
    EditTask,
    Exhausted,
    Faulted,
    PauseTask,
    Planned,
    RemoveTask,
    ReorderTask,
    RequestRun,
    ResumeTask,
    RunAbandoned,
    RunOpened,
    RunReported,
    RunSettled,
)
from jobstores.core import Applied, TaskCore
from jobstores.table import TaskTable
from tasks.errors import TaskNotFoundError
from tasks.events import (
    DispatcherEvent,
    RunFailed,
    RunReport,
    RunRetried,
    RunStarted,
    TaskPaused,
)
from tasks.model import ActiveRun, TaskRecord, TaskStatus
from tasks.policy import RunPolicy
from tasks.runs import TIMED_OUT, RunEvent, RunEventKind, RunRequest
from tasks.schedule import Schedule

HOUR = timedelta(hours=1)
NOW = T0 + timedelta(minutes=1)
P, R, E, PA, C = (
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.ERROR,
    TaskStatus.PAUSED,
    TaskStatus.COMPLETED,
)
QUEUED = ActiveRun(run_id="r1", scheduled_at=T0, submitted_at=T0)
STARTED = QUEUED.model_copy(update={"started_at": T0})


class Draws:
    """An injected jitter source: hands out ``fraction`` and counts the draws."""

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction
        self.count = 0

    def __call__(self) -> float:
        self.count += 1
        return self.fraction


def core_of(*records: TaskRecord, draws: Draws | None = None) -> TaskCore:
    table = TaskTable()
    table.load(list(records), [], {})
    return TaskCore(table, lambda r: Schedule.of(r, SHANGHAI), draws or Draws())


def kinds(applied: Applied) -> list[str]:
    return [event.kind for event in applied.events]


def run_event(kind: RunEventKind, run_id: str = "r1", **fields: Any) -> RunEvent:
    return RunEvent(run_id, "a", kind, at=NOW, **fields)


def request(run: ActiveRun = STARTED) -> RunRequest:
    return RunRequest(
        run_id=run.run_id,
        task_id="a",
        account_id="acc",
        sys_type="mac_intel",
        task_type="xhs_type",
        kwargs={},
        scheduled_at=run.scheduled_at,
        submitted_at=run.submitted_at,
        attempt=run.attempt,
    )


def ended_rules() -> TaskRecord:
    return record("a", task_end_time=date(2026, 1, 7))


@pytest.mark.parametrize(
    ("before", "command", "after", "events"),
    [
        # pause / resume
        ({"status": P}, PauseTask("a"), (PA, None, None), ["task_paused"]),
        ({"status": PA, "at": None}, PauseTask("a"), (PA, None, None), []),
        ({"status": C, "at": None}, PauseTask("a"), (C, None, None), []),
        ({"status": PA, "at": None}, ResumeTask("a"), (P, NOW, None), ["task_resumed"]),
        (
            {"status": PA, "at": None, "last_planned_time": T0},
            ResumeTask("a"),
            (P, T0 + HOUR, None),
            ["task_resumed"],
        ),
        (
            {"status": PA, "at": None, "task_end_time": date(2026, 1, 7)},
            ResumeTask("a"),
            (C, None, None),
            ["task_resumed", "task_completed"],
        ),
        ({"status": P}, ResumeTask("a"), (P, T0, None), []),
        # edit: planned again; one with no run left is completed
        (
            {"status": P, "last_planned_time": T0},
            EditTask("a", record("a", interval=7200)),
            (P, T0 + 2 * HOUR, None),
            [],
        ),
        ({"status": P}, EditTask("a", ended_rules()), (C, None, None), ["task_completed"]),
        # run now: asked for, nothing else
        ({"status": P}, RequestRun("a"), (P, T0, None), []),
        # the scheduler's side: the next run moved, held without a time, none left, a fault
        ({"status": P}, Planned("a", T0 + HOUR), (P, T0 + HOUR, None), []),
        ({"status": P}, Planned("a", None), (PA, None, None), []),
        ({"status": P}, Exhausted("a"), (C, None, None), ["task_completed"]),
        ({"status": R, "active_run": STARTED}, Exhausted("a"), (R, None, STARTED), []),
        ({"status": PA, "at": None}, Exhausted("a"), (PA, None, None), []),
        ({"status": P}, Faulted("a", "scheduling failed: boom"), (E, None, None), []),
        # runs: opened, reported, abandoned
        (
            {"status": P},
            RunOpened("a", STARTED, True),
            (R, T0, STARTED.model_copy(update={"started_at": NOW})),
            ["run_started"],
        ),
        (
            {"status": P},
            RunOpened("a", STARTED, True, request()),
            (R, T0, STARTED.model_copy(update={"started_at": NOW})),
            ["run_report", "run_started"],  # with the run as sent: its start reported whole
        ),
        ({"status": P}, RunOpened("a", QUEUED, False), (P, T0, QUEUED), []),
        ({"status": P}, RunOpened("a", QUEUED, False, request(QUEUED)), (P, T0, QUEUED), []),
        (
            {"status": P, "active_run": QUEUED},
            RunReported(run_event(RunEventKind.STARTED, worker="w1")),
            (R, T0, QUEUED.model_copy(update={"started_at": NOW})),
            ["run_started"],
        ),
        (
            {"status": R, "active_run": STARTED},
            RunReported(run_event(RunEventKind.SUCCEEDED), request()),
            (P, T0, None),
            ["run_report", "run_succeeded"],
        ),
        (
            {"status": R, "active_run": STARTED},
            RunReported(run_event(RunEventKind.FAILED, error="E: x")),
            (E, T0, None),
            ["run_failed"],
        ),
        (
            {
                "status": R,
                "active_run": STARTED,
                "at": T0 + HOUR,
                "run_policy": RunPolicy(retries=1),
            },
            RunReported(run_event(RunEventKind.FAILED, error="E: x")),
            (P, T0 + HOUR, None),
            ["run_failed", "run_retried"],
        ),
        (
            {"status": R, "active_run": STARTED, "run_policy": RunPolicy(pause_after_failures=1)},
            RunReported(run_event(RunEventKind.FAILED, error="E: x")),
            (PA, None, None),
            ["run_failed", "task_paused"],
        ),
        (
            {"status": R, "active_run": STARTED},
            RunReported(run_event(RunEventKind.FAILED, error="timed out", extra={TIMED_OUT: 5})),
            (E, T0, None),
            ["run_timed_out", "run_failed"],
        ),
        (
            {"status": R, "active_run": STARTED, "at": None},
            RunReported(run_event(RunEventKind.SUCCEEDED)),
            (C, None, None),
            ["run_succeeded", "task_completed"],
        ),
        (
            {"status": P, "active_run": QUEUED},
            RunReported(run_event(RunEventKind.CANCELLED)),
            (P, T0, None),
            [],
        ),
        # a duplicate (the run is not open): no change; its run's events if the run is known
        ({"status": P}, RunReported(run_event(RunEventKind.SUCCEEDED)), (P, T0, None), []),
        (
            {"status": P},
            RunReported(run_event(RunEventKind.SUCCEEDED), request()),
            (P, T0, None),
            ["run_report", "run_succeeded"],
        ),
        ({"status": R, "active_run": STARTED}, RunAbandoned("a", "r1"), (P, T0, None), []),
        ({"status": R, "active_run": STARTED}, RunAbandoned("a", "r2"), (R, T0, STARTED), []),
        (
            {"status": R, "active_run": STARTED},
            RunAbandoned("a", "r1", request()),
            (P, T0, None),
            ["run_report"],  # cut off in this process: reported as lost, not counted
        ),
    ],
)
def test_command(
    before: dict[str, Any], command: Command, after: tuple[Any, ...], events: list[str]
) -> None:
    core = core_of(record("a", **before))
    applied = core.apply(command, NOW)
    new = core.table.get("a")
    assert (new.status, new.next_execution_time, new.active_run) == after
    assert kinds(applied) == events
    assert all(event.at == NOW for event in applied.events)
    assert all(event.task_id == "a" for event in applied.events)


def test_add_remove_and_reorder_change_the_table() -> None:
    core = core_of(record("a"))
    added = core.apply(AddTasks([record("b"), record("c")]), NOW)
    assert kinds(added) == ["task_added", "task_added"]
    assert [change.before for change in added.changes] == [None, None]
    assert core.table.account_tasks() == {"acc": ["a", "b", "c"]}

    moved = core.apply(ReorderTask("c", 0), NOW)
    assert (kinds(moved), core.table.account_tasks()) == ([], {"acc": ["c", "a", "b"]})

    removed = core.apply(RemoveTask("a"), NOW)
    assert kinds(removed) == ["task_removed"]
    assert (removed.record.task_id, removed.changes[0].after) == ("a", None)
    assert core.table.find("a") is None
    with pytest.raises(TaskNotFoundError):
        core.apply(PauseTask("a"), NOW)


def test_an_automatic_pause_says_why() -> None:
    core = core_of(record("a"))
    (event,) = core.apply(PauseTask("a", reason="account banned"), NOW).events
    assert event == TaskPaused(
        at=NOW, task_id="a", account_id="acc", automatic=True, reason="account banned"
    )


def test_run_events_carry_the_run() -> None:
    policy = RunPolicy(retries=1, retry_delay=60)
    core = core_of(record("a", status=R, at=T0 + HOUR, active_run=STARTED, run_policy=policy))
    failed, retried = core.apply(
        RunReported(run_event(RunEventKind.FAILED, error="E: x")), NOW
    ).events
    retry = core.table.get("a").retry
    assert retry is not None
    assert failed == RunFailed(
        at=NOW,
        task_id="a",
        account_id="acc",
        run_id="r1",
        attempt=1,
        scheduled_at=T0,
        error="E: x",
        retry_at=retry.at,
    )
    assert retried == RunRetried(
        at=NOW, task_id="a", account_id="acc", run_id="r1", attempt=2, retry_at=retry.at
    )


def walk(core: TaskCore, commands: Sequence[Command]) -> list[DispatcherEvent]:
    events: list[DispatcherEvent] = []
    for command in commands:
        events += core.apply(command, NOW).events
    return events


def test_completion_after_the_last_run_is_decided_once() -> None:
    """The schedule runs out while its last run waits for its lane: the run's end completes
    the task, in the change that closes the run; nothing after it completes it again."""
    core = core_of(record("a"))
    events = walk(core, [Exhausted("a", run_waiting=True)])
    assert (core.table.get("a").status, events) == (P, [])
    events = walk(
        core,
        [RunOpened("a", STARTED, True), RunReported(run_event(RunEventKind.SUCCEEDED))],
    )
    assert core.table.get("a").status is C
    assert [event.kind for event in events] == ["run_started", "run_succeeded", "task_completed"]
    assert walk(core, [Exhausted("a"), RunSettled("a")]) == []


def test_the_schedule_running_out_while_a_run_is_open_leaves_completion_to_its_end() -> None:
    core = core_of(record("a"))
    walk(core, [RunOpened("a", QUEUED, False)])
    assert walk(core, [Exhausted("a")]) == []  # the open run is the record's: it waits
    assert core.table.get("a").status is P
    events = walk(
        core,
        [
            RunReported(run_event(RunEventKind.STARTED)),
            RunReported(run_event(RunEventKind.CANCELLED)),  # withdrawn: it never ran
        ],
    )
    assert (core.table.get("a").status, [event.kind for event in events]) == (
        C,
        ["run_started", "task_completed"],
    )


def test_a_skipped_last_run_completes_the_task_when_it_settles() -> None:
    core = core_of(record("a"))
    assert walk(core, [Exhausted("a", run_waiting=True)]) == []
    assert core.table.get("a").status is P
    events = walk(core, [RunSettled("a")])
    assert (core.table.get("a").status, [event.kind for event in events]) == (
        C,
        ["task_completed"],
    )


def test_a_run_cut_off_after_the_schedule_ran_out_completes_the_task() -> None:
    core = core_of(record("a"))
    walk(core, [RunOpened("a", STARTED, True), Exhausted("a")])
    events = walk(core, [RunAbandoned("a", "r1")])
    after = core.table.get("a")
    assert (after.status, after.run_count, after.active_run) == (C, 0, None)
    assert [event.kind for event in events] == ["task_completed"]
    assert walk(core, [RunAbandoned("a", "r1")]) == []  # closed already: nothing to close


def test_a_fault_while_a_run_is_out_outlives_that_run() -> None:
    core = core_of(record("a"))
    walk(core, [RunOpened("a", STARTED, True), Faulted("a", "boom")])
    assert core.table.get("a").status is E
    events = walk(core, [RunReported(run_event(RunEventKind.SUCCEEDED))])
    after = core.table.get("a")
    assert (after.status, after.last_error, after.active_run) == (E, "boom", None)
    assert [event.kind for event in events] == ["run_succeeded"]  # not completed meanwhile
    # The run's end settled it: the fault is spent; pausing and resuming plans it again.
    walk(core, [PauseTask("a"), ResumeTask("a")])
    assert core.table.get("a").status is P


def test_a_fault_while_a_run_waits_for_its_lane_outlives_that_run() -> None:
    core = core_of(record("a"))
    walk(core, [Faulted("a", "boom", run_waiting=True)])
    assert core.table.get("a").status is E
    walk(core, [RunSettled("a")])  # skipped at the gate (the task is in error)
    assert (core.table.get("a").status, core.table.get("a").last_error) == (E, "boom")
    walk(core, [PauseTask("a"), ResumeTask("a")])
    assert core.table.get("a").status is P


def test_a_fault_without_a_run_out_is_applied_at_once() -> None:
    core = core_of(record("a"))
    walk(core, [Faulted("a", "boom")])
    walk(core, [PauseTask("a"), ResumeTask("a")])
    assert core.table.get("a").status is P


def test_jitter_is_drawn_once_per_planned_run() -> None:
    draws = Draws(0.5)
    policy = RunPolicy(jitter=600)
    core = core_of(record("a", run_policy=policy, next_start_time=T0), draws=draws)

    core.apply(Planned("a", T0 + HOUR), NOW)
    first = core.table.get("a")
    assert (draws.count, first.next_start_time) == (1, T0 + HOUR + timedelta(seconds=300))

    # Changes that leave the planned run where it is keep its start.
    run = ActiveRun(run_id="r1", scheduled_at=T0 + HOUR, submitted_at=NOW)
    walk(core, [Planned("a", T0 + HOUR), RunOpened("a", run, False), RequestRun("a")])
    assert (draws.count, core.table.get("a").next_start_time) == (1, first.next_start_time)

    draws.fraction = 0.0
    core.apply(Planned("a", T0 + 2 * HOUR), NOW)
    assert (draws.count, core.table.get("a").next_start_time) == (2, T0 + 2 * HOUR)

    # Paused: no start; resumed: one draw for the run planned then.
    core.apply(PauseTask("a"), NOW)
    assert core.table.get("a").next_start_time is None
    core.apply(ResumeTask("a"), NOW)
    assert draws.count == 3
    assert core.table.get("a").next_start_time is not None


def test_nothing_reads_a_clock() -> None:
    """Every record change and event is stamped with the ``now`` given."""
    later = datetime(2030, 5, 1, 12, 0, tzinfo=SHANGHAI)
    core = core_of(record("a", at=later))
    applied = core.apply(PauseTask("a"), later)
    assert applied.record.updated_at == later
    assert [event.at for event in applied.events] == [later]


def test_a_started_run_reports_its_request() -> None:
    core = core_of(record("a"))
    (event,) = core.apply(RunOpened("a", QUEUED, True), NOW).events
    assert event == RunStarted(
        at=NOW, task_id="a", account_id="acc", run_id="r1", attempt=1, scheduled_at=T0
    )


def test_a_run_event_is_reported_whole_with_its_run() -> None:
    """The observers that keep runs (history, metrics) read the stream's report: the run as
    sent and the backend's event, worker and error included, for duplicates too."""
    core = core_of(record("a", status=R, active_run=STARTED))
    failed = run_event(RunEventKind.LOST, error="WorkerLostError: gone", worker="w1")
    events = core.apply(RunReported(failed, request()), NOW).events
    report = events[0]
    assert isinstance(report, RunReport)
    assert (report.request, report.event) == (request(), failed)
    assert (report.task_id, report.account_id, report.at) == ("a", "acc", NOW)
    late = run_event(RunEventKind.SUCCEEDED)
    again = core.apply(RunReported(late, request()), NOW).events  # the run is closed
    assert isinstance(again[0], RunReport)
    assert again[0].event == late
