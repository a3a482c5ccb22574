"""Detect slots handed out in arrival order, with a bounded wait.

Refusing every call beyond ``--max-concurrent`` at once was unfair under load: a refused edge
backs off (0.5 s, doubling) while the edge whose answer just came back sends again at once and
takes the freed slot, so with four saturating edges on one slot one edge got every answer and
the other three starved (measured with ``splitdet loadtest``). `FairSlots` lets up to
``queue`` calls wait, first come first served, for a running one to finish; only calls
beyond that, or whose wait ends (their deadline, or ``max_wait_s``), are refused.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["FairSlots", "Outcome"]

#: How often a waiting call checks whether its caller went away, seconds.
POLL_S = 0.05


class Outcome(enum.Enum):
    """What `FairSlots.acquire` did; true only when a slot was taken."""

    GRANTED = "granted"
    FULL = "full"  # the queue was full: refused at once
    TIMED_OUT = "timed out"  # waited max_wait_s in the queue
    GAVE_UP = "gave up"  # gave_up() turned true while waiting (caller left, shutdown)

    def __bool__(self) -> bool:
        return self is Outcome.GRANTED


class FairSlots:
    """At most ``slots`` holders at once; up to ``queue`` callers wait in arrival order."""

    def __init__(self, slots: int, queue: int) -> None:
        if slots < 1 or queue < 0:
            raise ValueError("need at least one slot and a queue of 0 or more")
        self.slots, self.queue = slots, queue
        self._free = slots
        self._waiting: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot now."""
        with self._cond:
            return len(self._waiting)

    def acquire(self, max_wait_s: float, gave_up: Callable[[], bool] = lambda: False) -> Outcome:
        """Take a slot: at once when one is free and nobody waits, else after the calls that
        came earlier. No slot is taken (a false `Outcome` saying why) when the queue is full,
        after ``max_wait_s``, or once ``gave_up()`` is true (the caller left, a shutdown)."""
        with self._cond:
            if self._free and not self._waiting:
                self._free -= 1
                return Outcome.GRANTED
            if len(self._waiting) >= self.queue:
                return Outcome.FULL
            ticket = object()
            self._waiting.append(ticket)
            deadline = time.monotonic() + max_wait_s
            try:
                while True:
                    if gave_up():
                        return Outcome.GAVE_UP
                    if self._free and self._waiting[0] is ticket:
                        self._waiting.popleft()
                        self._free -= 1
                        return Outcome.GRANTED
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return Outcome.TIMED_OUT
                    self._cond.wait(min(left, POLL_S))
            finally:
                if ticket in self._waiting:  # gave up: let the next in line see the head move
                    self._waiting.remove(ticket)
                self._cond.notify_all()

    def release(self) -> None:
        """Give a slot back (to the longest-waiting call, if any)."""
        with self._cond:
            if self._free >= self.slots:
                raise RuntimeError("released more slots than were taken")
            self._free += 1
            self._cond.notify_all()
