"""The cloud's idempotency store: request id -> the answer already given, durable and bounded.

The edge re-sends a request whose acknowledgement it lost (timeout, crash, network cut). The cloud
must then return the same boxes without running the heads again, also after its own restart. So
answers live in SQLite (WAL, synchronous=FULL: a returned answer survives a crash of the server),
keyed by request id, with the model fingerprint and a digest of the request they answer. Only the
newest `capacity` answers are kept; older ones are evicted on insert.

The file is marked by `PRAGMA application_id` (`APPLICATION_ID`); one written before the mark
was set (application_id 0, one `answers` table) is recognised by its table and marked. Any other
SQLite file (another program's, an edge store: a typo in --answers-db) is refused before anything
is written to it (`NotAnswersDatabase`); an empty one becomes the store.

Thread-safe: one connection behind a lock (writes are tiny; SQLite serialises them anyway).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from splitdet.edge.store_file import Contents, describe_contents, immediate, read_contents
from splitdet.edge.store_schema import APPLICATION_ID as EDGE_APPLICATION_ID

#: `PRAGMA application_id` of an answers database: b"SPCA" (splitdet cloud answers). The edge
#: store names it too (edge/store_schema.py ANSWERS_APPLICATION_ID), to say what a wrong --db holds.
APPLICATION_ID = 0x53504341

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order, for eviction
    request_id  TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,                      -- model that computed the answer
    digest      TEXT NOT NULL,                      -- hash of the request it answers
    payload     BLOB NOT NULL,                      -- the serialized answer
    created     REAL NOT NULL                       -- unix time, for operators
)
"""

_COLUMNS = frozenset({"seq", "request_id", "fingerprint", "digest", "payload", "created"})
_REFUSED = "give another --answers-db; this one is left as it is"
_KNOWN = {EDGE_APPLICATION_ID: "a splitdet edge store (the --db of `splitdet edge run`)"}


class NotAnswersDatabase(sqlite3.DatabaseError):
    """The file is a SQLite database, but neither empty nor a splitdet cloud answers database
    (nothing was written to it). A sqlite3.DatabaseError: `splitdet cloud` names --answers-db
    with it."""


@dataclass(frozen=True)
class StoredAnswer:
    """One stored answer.

    Attributes:
        fingerprint: the model fingerprint the answer was computed with.
        digest: hex digest of the request it answers (a reused id with another payload differs).
        payload: the serialized answer, opaque to the store.
    """

    fingerprint: str
    digest: str
    payload: bytes


class IdempotencyStore:
    """Durable, bounded map request id -> StoredAnswer in one SQLite file.

    Args:
        path: the database file (created with its parent directory if missing), or ":memory:"
            for a store that does not survive the process (tests only).
        capacity: answers kept; inserting beyond it evicts the oldest.
    """

    def __init__(self, path: Path | str, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.path = str(path)
        self.capacity = int(capacity)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        """Check what the file holds, then set the connection up and create the table and the
        mark in one transaction (another replica opening the file meanwhile sees it empty or
        whole)."""
        self._db.execute("PRAGMA busy_timeout=5000")  # several replicas may share one file
        # read only: a file not ours is refused before journal_mode=WAL (a write) touches it
        self._check(read_contents(self._db))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with immediate(self._db) as db:
            self._check(read_contents(db))  # again, under the write lock
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _check(self, contents: Contents) -> None:
        """Refuse (NotAnswersDatabase) a file that is neither empty nor an answers database:
        ours by its application_id, or written before it was set (application_id 0 and
        user_version 0, one `answers` table); and an `answers` table that is not this store's
        (another program's, or another version's): it would fail every Detect call instead of
        the start."""
        names = set(contents.names)
        if contents.application_id == APPLICATION_ID:
            ours = True
        elif contents.application_id == 0 and contents.user_version == 0:
            ours = names <= {"answers"}
        else:
            ours = False
        if not ours:
            raise NotAnswersDatabase(
                f"not a splitdet cloud answers database ({describe_contents(contents, _KNOWN)}): "
                f"{_REFUSED}"
            )
        if "answers" not in names:
            return
        have = {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}
        missing = sorted(_COLUMNS - have)
        if missing:
            raise NotAnswersDatabase(
                f"its answers table lacks the column(s) {', '.join(missing)}: not a splitdet "
                f"cloud answers database ({_REFUSED})"
            )

    def get(self, request_id: str) -> StoredAnswer | None:
        """The stored answer for `request_id`, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, digest, payload FROM answers WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        return None if row is None else StoredAnswer(row[0], row[1], bytes(row[2]))

    def put(self, request_id: str, answer: StoredAnswer) -> None:
        """Store (or replace) the answer for `request_id`, then evict beyond the capacity."""
        with self._lock, immediate(self._db) as db:  # (a full disk's cause is raised on)
            cursor = db.execute(
                "INSERT OR REPLACE INTO answers"
                " (request_id, fingerprint, digest, payload, created) VALUES (?, ?, ?, ?, ?)",
                (request_id, answer.fingerprint, answer.digest, answer.payload, time.time()),
            )
            # seq grows by one per insert, so this keeps at most the newest `capacity` rows
            # (fewer when some were replaced) without counting the table.
            db.execute("DELETE FROM answers WHERE seq <= ?", (cursor.lastrowid - self.capacity,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        """Close the database (further calls fail)."""
        with self._lock:
            self._db.close()
