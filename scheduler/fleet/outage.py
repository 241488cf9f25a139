"""``BrokerOutage``: whether the Celery backend's broker is reachable, as its loops and its
submissions find it.

An outage starts at the first failure (one ERROR; a failure just after a recovery is the
same outage, a WARNING), is retried with backoff (0.5 s doubling to 2 s: once the broker is
back, runs due are refused for at most that long), counts the runs refused meanwhile (logged
once a minute and when it ends) and ends at the first success (a WARNING, and the backend's
``on_recovery``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from scheduler.fleet.openruns import utcnow
from tasks.runs import describe_error

__all__ = ["BrokerOutage"]

logger = logging.getLogger("scheduler.backends.celery")  # the backend's log, as it always was

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 2.0
"""Seconds between reconnection attempts at most: once the broker is back, runs due are
refused for at most this long."""
_UNSENT_EVERY = 60.0
"""Seconds between the counts of runs not sent, while an outage lasts."""
_FLAP = 10.0


class BrokerOutage:
    """The broker's reachability: outage start and end, backoff, runs refused meanwhile."""

    def __init__(self, masked: str, on_recovery: Callable[[], None]) -> None:
        self._masked = masked
        self._on_recovery = on_recovery
        self.since: float | None = None
        """Monotonic time the outage began (None: the broker is reachable)."""
        self._recovered_at: float | None = None
        self._at: datetime | None = None
        self.retry_at = 0.0
        """Monotonic time of the next reconnection attempt."""
        self._backoff = _BACKOFF_FIRST
        self.last_error: str | None = None
        self._unsent = 0
        """Runs refused since the outage began (or since the last count was logged)."""
        self._unsent_at = 0.0

    def backing_off(self) -> bool:
        """Whether an outage lasts and the next reconnection attempt is not due yet."""
        return self.since is not None and time.monotonic() < self.retry_at

    def text(self) -> str:
        """When the outage began (ISO time), ``?`` outside one."""
        return self._at.isoformat(timespec="seconds") if self._at else "?"

    def count_unsent(self) -> None:
        """A run was refused: counted, and the count logged once a minute of the outage."""
        self._unsent += 1
        now = time.monotonic()
        if now - self._unsent_at >= _UNSENT_EVERY and self.since is not None:
            if self._unsent_at:  # not the first: the outage's ERROR said it all
                self._log_unsent("in the last minute of the outage")
            self._unsent_at = now

    def _log_unsent(self, when: str) -> None:
        if self._unsent:
            logger.warning(
                "%d run(s) not sent %s of broker %s (recorded as failed; they do not count "
                "toward pause_after_failures)",
                self._unsent,
                when,
                self._masked,
            )
        self._unsent = 0

    def failed(self, exc: BaseException) -> None:
        """The broker failed us: an outage begins (logged), or backs off further."""
        now = time.monotonic()
        self.last_error = describe_error(exc)
        if self.since is None:
            self.since = now
            self._at = utcnow()
            self._backoff = _BACKOFF_FIRST
            # A connection that went stale in the outage may fail once more just after it:
            # that is the same outage, not a new one worth an ERROR.
            flap = self._recovered_at is not None and now - self._recovered_at < _FLAP
            logger.log(
                logging.WARNING if flap else logging.ERROR,
                "broker %s unreachable (%s): runs due meanwhile are recorded as failed; "
                "reconnecting with backoff",
                self._masked,
                self.last_error,
            )
        else:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self.retry_at = now + self._backoff

    def ok(self) -> None:
        """The broker answered: an outage ends (logged, and ``on_recovery`` called)."""
        if self.since is None:
            return
        logger.warning(
            "broker %s reachable again after %.1fs",
            self._masked,
            time.monotonic() - self.since,
        )
        self._log_unsent("during the outage")
        self._unsent_at = 0.0
        self.since = None
        self._at = None
        self._recovered_at = time.monotonic()
        self._on_recovery()
