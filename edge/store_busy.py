"""The daemon's account of a database another program holds locked: WARNING `store_busy` at
most once a minute while its images wait, INFO `store_resumed` once one is handled again."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from splitdet.edge.daemon_log import log
from splitdet.edge.store_file import StoreLocked

#: At most one `store_busy` line per this many seconds (each retry waits the busy timeout).
BUSY_LINE_EVERY_S = 60.0


class BusyStore:
    """Counts the rounds the daemon's loop gave up on a locked --db, and says so."""

    def __init__(
        self, db: Path, every_s: float = BUSY_LINE_EVERY_S, once_wait_s: float | None = None
    ) -> None:
        """`once_wait_s`: a batch run's (`--once`) --drain-timeout, which bounds its wait."""
        self.db = db
        self.every_s = every_s
        self.once_wait_s = once_wait_s
        self.failures = 0
        self._since: float | None = None  # monotonic s the first failed try in a row began
        self._last_line: float | None = None

    def failed(self, exc: sqlite3.Error | StoreLocked, path: str | None, began: float) -> None:
        """One try that found the database locked: `exc` is SQLite's busy or locked error,
        `path` the file that stays in --watch (None: the database could not be opened to
        start), `began` the try's monotonic start (its wait for the lock counts)."""
        now = time.monotonic()
        if self._since is None:
            self._since = began
        self.failures += 1
        if self._last_line is not None and now - self._last_line < self.every_s:
            return
        self._last_line = now
        if self.once_wait_s is not None:
            waits = (
                f"this --once run waits for it up to --drain-timeout {self.once_wait_s:g}s, "
                "then leaves every image in --watch for the next run"
            )
        elif path is None:
            waits = "the daemon waits for it to start"
        else:
            waits = f"{path} stays in --watch and is taken again once it lets go"
        log.warning(
            f"--db {self.db} is held locked by another program "
            f"({exc.cause if isinstance(exc, StoreLocked) else exc}); {waits} (nothing is "
            "lost). Is an `sqlite3` shell, a backup or `splitdet edge requeue` holding it?",
            extra={"fields": {"event": "store_busy", "db": str(self.db), "path": path,
                              "failures": self.failures,
                              "waited_s": round(now - self._since, 1)}},
        )  # fmt: skip

    def waited_s(self) -> float:
        """Seconds since the first of the failures in a row (0.0 while none is)."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    def succeeded(self) -> None:
        """An image handled: after failures, INFO `store_resumed` with how long it waited."""
        if self._since is None:
            return
        waited = time.monotonic() - self._since
        log.info(
            f"--db {self.db} can be written again after {waited:.0f} s",
            extra={"fields": {"event": "store_resumed", "db": str(self.db),
                              "failures": self.failures, "waited_s": round(waited, 1)}},
        )  # fmt: skip
        self.failures = 0
        self._since = self._last_line = None
