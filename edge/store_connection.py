"""What the parts of the edge's `ResultStore` share (no torch): its one connection behind a
lock, the transactions and queries on it, the durable event counters, and the boot stamp of a
result made final."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from splitdet.edge.boot_clock import boot_clock
from splitdet.edge.store_file import immediate
from splitdet.edge.store_types import OutboxCap


def _boot_stamp() -> tuple[str | None, float | None]:
    """(finished_boot, finished_boot_s) for a result made final now; (None, None) off Linux."""
    boot = boot_clock()
    return (None, None) if boot is None else (boot.boot_id, boot.seconds)


class StoreConnection:
    """The connection, lock and counters of a `ResultStore` (`splitdet.edge.store`), which
    sets the attributes below when it opens the file; the base of its parts."""

    path: Path
    cap: OutboxCap
    commits: int
    _db: sqlite3.Connection
    _lock: threading.RLock

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """`immediate` under the lock, counted in `commits` once committed."""
        with self._lock:
            with immediate(self._db) as db:
                yield db
            self.commits += 1

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        """The store's schema version (SQLite user_version)."""
        return int(self._query("PRAGMA user_version")[0][0])

    def pragma(self, name: str) -> Any:
        """The value of SQLite's `PRAGMA name` on this store's connection."""
        return self._query(f"PRAGMA {name}")[0][0]

    def close(self) -> None:
        """Close the connection; the store cannot be used after."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _count(db: sqlite3.Connection, name: str) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = value + 1",
            (name,),
        )

    def counters(self) -> dict[str, int]:
        """The durable event counters (each added to by `_count` in a store write) by name."""
        return {name: int(value) for name, value in self._query("SELECT name, value FROM counters")}
