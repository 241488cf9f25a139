"""``RunPath``: the path a run takes through one dispatcher, wired once.

The engine (APScheduler) finds a task due and hands it to the runner; the runner holds it in
its account's lane (:class:`~scheduler.lanes.AccountLanes`) and sends it to the run backend;
the run ledger applies the run's events to the store. The retry timer and the
:class:`~scheduler.handoff.RunHandoff` (runs the API asks for) feed the runner too.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import tzinfo

from jobstores.jsonfile import JsonJobStore
from scheduler.engine import DispatchExecutor, DispatchScheduler
from scheduler.handoff import RunHandoff
from scheduler.lanes import AccountLanes
from scheduler.ledger import RunLedger
from scheduler.retries import RetryTimer
from scheduler.runner import TaskRunner
from tasks.runs import RunBackend

__all__ = ["RunPath"]


class RunPath:
    """The engine, the runner and its lanes, the ledger, the retry timer and the handoff of
    one store's runs to one backend."""

    def __init__(
        self,
        store: JsonJobStore,
        backend: RunBackend,
        max_concurrent_runs: int,
        timezone: tzinfo,
    ) -> None:
        self.lanes = AccountLanes(
            max_concurrent_runs, store.table.rank, lambda: store.table.order_version
        )
        self.ledger = RunLedger(store, remote=backend.remote)
        self.runner = TaskRunner(store, backend, self.lanes, self.ledger)
        self.scheduler = DispatchScheduler(store, DispatchExecutor(self.runner.submit), timezone)
        self.retries = RetryTimer(store, self.runner.submit)
        self.handoff = RunHandoff(store, self.runner, self.scheduler)
        self.ledger.watch(self.handoff.take_up_manual)

    def wake(self) -> None:
        """Have the engine look at the tasks again now (one was added or changed)."""
        if self.scheduler.running:
            self.scheduler.wakeup()

    def queued_runs(self, accounts: Iterable[str]) -> dict[str, list[str]]:
        """Account id -> ids of ``accounts``' tasks whose due run waits for its lane (on the
        loop)."""
        queued = {account: self.lanes.waiting(account) for account in accounts}
        return {account: ids for account, ids in queued.items() if ids}
