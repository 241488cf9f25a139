"""A dispatcher's standing in a cluster whose store is shared: leader or standby.

A store that several dispatchers share (PostgreSQL) is owned through a lease with a fencing
epoch (:class:`jobstores.postgres.lease.Leadership`, reached as the store's ``leadership``).
:func:`standing_of` finds it; :class:`Standing` is what the dispatcher asks of it:

- :attr:`Standing.role`: ``"leader"`` while the lease is valid by this instance's own
  monotonic clock, else ``"standby"``;
- :meth:`Standing.leading`: asked by the runner just before a run starts or is sent;
- :meth:`Standing.check_change`: a change asked of a standby raises
  :class:`~tasks.errors.NotLeaderError` naming the leader's URL;
- ``on_step_down``: called (once, on the loop) when the lease is lost, so that the dispatcher
  stops planning at once.

A store of one owner (the JSON file) has no standing: the dispatcher is always the leader,
and none of these checks runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from tasks.errors import NotLeaderError

__all__ = ["Gated", "LeaseView", "Standing", "standing_of"]

logger = logging.getLogger(__name__)


class LeaseView(Protocol):
    """What the dispatcher reads of a store's lease (see
    :class:`jobstores.postgres.lease.Leadership`)."""

    cluster: str
    holder: str
    url: str | None
    lease: float
    on_step_down: Callable[[str], None] | None

    @property
    def epoch(self) -> int | None: ...

    def is_leader_now(self) -> bool: ...


class Standing:
    """A dispatcher's view of its store's lease: its role, and what it may do now."""

    def __init__(self, lease: LeaseView, where: str) -> None:
        self.lease = lease
        self.where = where
        """The shared state, as messages name it (its URL masked, and the cluster)."""
        self.epoch: int | None = lease.epoch
        """The epoch this dispatcher led in (kept after a step-down, for messages)."""
        self.stepped_down = asyncio.Event()
        """Set once this dispatcher lost the lease (on the loop it was bound to)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_step_down: Callable[[], None] | None = None
        self.reason: str | None = None
        """Why it stopped leading (None: it leads)."""
        self._also = lease.on_step_down  # a callback the lease had already is kept
        lease.on_step_down = self._lost

    @property
    def host_callback(self) -> Callable[[str], None] | None:
        """The lease's ``on_step_down`` callback from before this standing (the host's)."""
        return self._also

    @property
    def role(self) -> str:
        """``"leader"`` while the lease is valid at this instant, else ``"standby"``."""
        return "leader" if self.lease.is_leader_now() else "standby"

    def leading(self) -> bool:
        """Whether a run may start or be sent at this instant (the lease is valid)."""
        return self.lease.is_leader_now()

    def check_change(self) -> None:
        """Raise :class:`~tasks.errors.NotLeaderError` unless this dispatcher leads now."""
        if not self.lease.is_leader_now():
            raise NotLeaderError(
                f"this dispatcher does not lead {self.where}"
                + (f" ({self.reason})" if self.reason else "")
                + "; send changes to the leader",
                leader_url=None,
            )

    def bind(self, loop: asyncio.AbstractEventLoop, on_step_down: Callable[[], None]) -> None:
        """Call ``on_step_down()`` on ``loop`` when the lease is lost (at once if it was)."""
        self._loop = loop
        self._on_step_down = on_step_down
        if self.reason is not None:
            loop.call_soon_threadsafe(self._stepped_down)

    def _lost(self, reason: str) -> None:
        # On the lease's thread (or the loop's): only hand the work over to the loop.
        self.reason = reason
        if self._also is not None:
            self._also(reason)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stepped_down)

    def _stepped_down(self) -> None:
        if self.stepped_down.is_set():
            return
        self.stepped_down.set()
        logger.warning(
            "%s: this dispatcher stands by now (%s): it plans and starts no run",
            self.where,
            self.reason,
        )
        if self._on_step_down is not None:
            self._on_step_down()

    def describe(self) -> dict[str, Any]:
        """``role``, ``epoch`` and ``leader`` (``id``, ``url``) for the health report."""
        leads = self.lease.is_leader_now()
        return {
            "role": "leader" if leads else "standby",
            "epoch": self.lease.epoch if leads else self.epoch,
            "leader": {"id": self.lease.holder, "url": self.lease.url} if leads else None,
        }


class Gated(Protocol):
    """A runner whose runs start only while ``leading()`` (a
    :class:`~scheduler.runner.TaskRunner`)."""

    leading: Callable[[], bool] | None


def standing_of(store: object, runner: Gated) -> Standing | None:
    """The standing of a dispatcher on ``store`` (None: a store of one owner, which always
    leads); ``runner`` starts runs only while it leads from then on."""
    lease = getattr(store, "leadership", None)
    if lease is None:
        return None
    standing = Standing(lease, str(getattr(store, "where", store)))
    runner.leading = standing.leading
    return standing
