"""Pacing a background thread's long work so the event loop keeps its turns.

A thread that only computes (encoding a whole snapshot, applying a large batch) hands the
interpreter over every switch interval; :func:`pause` hands it over sooner, at most once per
:data:`PAUSE_EVERY` of work, and :func:`let_go` frees a large list piecemeal.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["PAUSE", "PAUSE_EVERY", "let_go", "pause"]

PAUSE = 0.0001
"""Seconds a background thread working through a large batch sleeps between pieces: a thread
that only computes hands the interpreter over every 5 ms (``sys.getswitchinterval()``), and
an event loop waiting for it would lag that long; a sleep hands it over at once."""
PAUSE_EVERY = 0.001
"""Seconds of work between two pauses of one thread. A pause is not free: when other threads
are busy, the sleeper may wait up to a switch interval for the interpreter again. Pausing at
every piece made a save of 1,000 accounts (62 pieces of account order) spend four fifths of
its time waiting on a busy dispatcher; a millisecond of work delays the event loop less than
the interpreter's own switch interval would."""

_held = threading.local()
_clock = time.perf_counter


def pause() -> None:
    """Let the event loop (and every other thread) have its turn (see :data:`PAUSE`) if
    :data:`PAUSE_EVERY` has passed since this thread's last pause; otherwise return at once."""
    now = _clock()
    since: float | None = getattr(_held, "since", None)
    if since is not None and now - since < PAUSE_EVERY:
        return
    if since is not None:
        time.sleep(PAUSE)
    _held.since = _clock()


def let_go(items: list[Any], piece: int = 32) -> None:
    """Empty ``items`` ``piece`` at a time, with a :func:`pause` in between.

    Dropping the last reference to tens of megabytes at once (a snapshot's encoded chunks:
    76 MB at 100,000 tasks) hands the memory back to the system in one C call, holding the
    interpreter for milliseconds; a background writer lets go of it piecemeal instead.
    """
    while items:
        del items[-piece:]
        if items:
            pause()
