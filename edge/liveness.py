"""Whether the edge daemon's loop still goes round (no torch): `Liveness`, beaten by the loop
at each round, after each image and while it waits for outbox room, and read by the metrics
endpoint's /healthz and its splitdet_edge_loop_age_seconds gauge.

A process that runs is not a daemon that works: a read hung on a network share that went away
(an NFS hard mount), or a lock never let go, stops the loop while the metrics endpoint, a thread
of its own, still answers. /healthz answers 503 once the loop has not gone round for
`stall_after_s` seconds, so that a container's liveness probe (or a watchdog) restarts it.
Times are monotonic: a step of the wall clock neither fakes nor hides a stall."""

from __future__ import annotations

import time

#: Default seconds without a round of the loop before /healthz answers 503 (`--stall-after`).
#: An image takes seconds even on the paper's 2448x2048 on a CPU; a scan of a big folder less.
STALL_AFTER_S = 300.0


class Liveness:
    """The monotonic time of the loop's last beat, and the verdict /healthz gives on it."""

    def __init__(self, stall_after_s: float = STALL_AFTER_S) -> None:
        if not 0 < stall_after_s < float("inf"):
            raise ValueError(
                f"--stall-after must be a positive number of seconds, got {stall_after_s}"
            )
        self.stall_after_s = stall_after_s
        self._last = time.monotonic()
        self._idle_s = 0.0  # (the wait the last beat announced: an idle poll's)

    def beat(self, idle_s: float = 0.0) -> None:
        """The loop went round, finished an image, or waits for a reason it logged; `idle_s`:
        it now waits that long on purpose (an idle folder's --poll, which may exceed
        stall_after_s), which /healthz adds to stall_after_s."""
        self._last, self._idle_s = time.monotonic(), idle_s  # (no lock needed to read them)

    def age_s(self) -> float:
        """Seconds since the last beat."""
        return max(0.0, time.monotonic() - self._last)

    def health(self) -> tuple[bool, str]:
        """(alive, one line saying why): alive while the last beat is younger than
        stall_after_s plus the wait it announced."""
        age = self.age_s()
        if age < self.stall_after_s + self._idle_s:
            return True, f"ok: the edge daemon's loop went round {age:.1f} s ago\n"
        return False, (
            f"stalled: the edge daemon's loop has not gone round for {age:.0f} s (--stall-after "
            f"{self.stall_after_s:g}); it may hang on reading a file in --watch or on --db (a "
            "network share gone?): restart it, and see its log for the last image it took\n"
        )
