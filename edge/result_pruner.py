"""The daemon's retention: results older than --keep-results deleted as it runs (no torch).

`ResultPruner.prune_when_due`, called by the daemon's loop each turn, starts a prune at most
every PRUNE_EVERY_S, in a thread beside the loop (a large database never stalls
classification; a --once run prunes in line, then works). A prune deletes the old results,
then gives the freed pages back to the file system; a failure is logged, never fatal: the
next turn tries again. A stop event set by the daemon's shutdown ends a prune after its batch.
Dead letters are never deleted here: flagged images the cloud never judged, decided by
`splitdet edge requeue` or by an operator's `splitdet edge prune --dead-letters`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from splitdet.edge.daemon_log import log, log_event
from splitdet.edge.store import ResultStore

#: Seconds between two prunes of the results (DaemonConfig.keep_results_s).
PRUNE_EVERY_S = 3600.0


class ResultPruner:
    """Prunes the results older than `keep_results_s` (None: never) every PRUNE_EVERY_S."""

    def __init__(
        self,
        store: ResultStore,
        keep_results_s: float | None,
        once: bool,
        stop: threading.Event,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.keep_results_s = keep_results_s
        self.once = once
        self._stop = stop
        # (`liveness.Liveness.beat`: a --once prune runs in the loop's own thread, batch by
        # batch, and is no stall; a prune in its own thread beats nothing for the loop)
        self._beat = beat
        self._next_prune = 0.0  # monotonic s: at start
        self._thread: threading.Thread | None = None

    def prune_when_due(self) -> None:
        """With keep_results_s: delete the results older than that, at most every PRUNE_EVERY_S,
        in a thread beside the loop (a large database never stalls classification)."""
        keep = self.keep_results_s
        busy = self._thread is not None and self._thread.is_alive()
        if keep is None or busy or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        if self.once:  # a batch run prunes to the end, then works (nothing to stall)
            self.prune(time.time() - keep, beat=True)
            return
        self._thread = threading.Thread(
            target=self.prune, args=(time.time() - keep,), name="splitdet-prune", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` s for a prune under way (set the stop event first)."""
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def prune(self, before: float, beat: bool = False) -> None:
        """One prune, from the first row to the last: a row kept because its file still lies
        where it arrived (--after keep, or a move that failed) is looked at again by every
        prune, so its result goes within PRUNE_EVERY_S of its file's removal. The cost of
        that: per prune, one read of each such row and one stat() of its file; those files lie
        in --watch, whose scan stats each of them every --poll anyway (the rows deleted are
        not read again, the rows not old enough were read by any prune). A failure is
        logged, never fatal: the next turn tries again."""

        def should_stop() -> bool:  # (asked between batches)
            if beat:
                self._beat()
            return self._stop.is_set()

        try:
            # (dead letters are kept: flagged images the cloud never judged, which requeue, or
            # an operator's `edge prune --dead-letters`, decides)
            pruned = self.store.prune(before, should_stop=should_stop)
        except Exception as exc:  # e.g. the database locked past its timeout
            log_event(logging.WARNING, "prune_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if pruned.kept_for_clock:
            log.warning(
                f"kept {pruned.kept_for_clock} result(s) stamped older than --keep-results that "
                "were written more recently by the time since their boot: the wall clock was "
                "behind when they were written and has been set forward since; they go once "
                "they are as old by the time since boot",
                extra={"fields": {"event": "prune_kept_for_clock",
                                  "results": pruned.kept_for_clock,
                                  "older_than_s": self.keep_results_s}},
            )  # fmt: skip
        if pruned.deleted:
            try:
                freed = self.store.reclaim(should_stop=should_stop)
            except Exception as exc:  # (as the prune's: the next turn tries again)
                log_event(logging.WARNING, "reclaim_failed", error=f"{type(exc).__name__}: {exc}")
                freed = 0
            log_event(logging.INFO, "pruned", results=pruned.deleted,
                      older_than_s=self.keep_results_s, reclaimed_bytes=freed,
                      dead_letters_kept=pruned.kept_dead_letters,
                      results_kept_for_dead_letters=pruned.kept_for_dead_letters)  # fmt: skip
