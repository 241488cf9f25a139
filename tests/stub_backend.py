"""A stub run backend for tests: it executes nothing, the test says how each run ends.

It behaves like a fleet (``remote``): the runs it was sent live in a :class:`StubWorld`, which
outlives one backend instance as workers and a broker outlive a dispatcher, so a dispatcher
restarted on a new :class:`StubRunBackend` over the same world recovers them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasks.runs import RunBackend, RunEvent, RunEventKind, RunInbox, RunRequest


@dataclass
class StubWorld:
    """The runs sent (every submit, in order) and those out (sent or recovered, not ended)."""

    sent: list[RunRequest] = field(default_factory=list)
    out: dict[str, RunRequest] = field(default_factory=dict)


class StubRunBackend(RunBackend):
    """Records what it is sent; :meth:`finish` reports a run's ``started`` and its end."""

    name = "stub"
    remote = True

    def __init__(self, world: StubWorld | None = None) -> None:
        self.world = world if world is not None else StubWorld()
        self.inbox: RunInbox | None = None

    async def open(self, inbox: RunInbox) -> None:
        self.inbox = inbox

    async def submit(self, request: RunRequest) -> None:
        self.world.sent.append(request)
        self.world.out[request.run_id] = request

    async def cancel(self, run_id: str) -> bool:
        request = self.world.out.pop(run_id, None)
        if request is None:
            return False
        await self._deliver(request, RunEventKind.CANCELLED)
        return True

    async def recover(self, requests: Sequence[RunRequest]) -> None:
        for request in requests:
            self.world.out.setdefault(request.run_id, request)

    async def close(self, grace_period: float | None) -> None:
        self.inbox = None

    def health(self) -> Mapping[str, Any]:
        return {"backend": self.name, "open_runs": len(self.world.out)}

    async def finish(
        self, run_id: str, kind: RunEventKind = RunEventKind.SUCCEEDED, error: str | None = None
    ) -> None:
        """Run ``run_id`` "somewhere": deliver its ``started`` event, then its end."""
        request = self.world.out.pop(run_id)
        started = await self._deliver(request, RunEventKind.STARTED)
        await self._deliver(request, kind, error=error, started_at=started)

    async def _deliver(
        self,
        request: RunRequest,
        kind: RunEventKind,
        error: str | None = None,
        started_at: datetime | None = None,
    ) -> datetime:
        assert self.inbox is not None, "the backend is not open"
        at = datetime.now(UTC)
        await self.inbox.deliver(
            RunEvent(
                request.run_id,
                request.task_id,
                kind,
                at=at,
                worker="stub",
                error=error,
                started_at=started_at,
            )
        )
        return at
