"""The edge's durable state: one SQLite file holding every image's result and the outbox of
encoded requests still to deliver to the cloud (no torch).

    store = ResultStore("edge.sqlite", OutboxCap(max_items=10_000, max_bytes=2 << 30))
    image_id = store.record_pending(arrival, p_defect, request_id, payload, fingerprint, ...)
    ...                                      # the sender delivers the payload
    store.complete(image_id, answer)         # result "defect" + outbox deletion: one transaction

Durability model: WAL journal, synchronous=FULL, so a
returned commit survives kill -9 and power loss. A defect-free image's "ok" row is one commit. A
flagged image's "pending" row and its outbox row are one commit; the cloud's answer and the outbox
deletion are one commit. A permanent refusal turns the row into verdict "error" (error_kind
"dead_letter", with the reason) and moves its request from the outbox to the dead letters in one
commit; `requeue_dead_letters` moves them back (after the cause is fixed: a cloud bug, a message
bound raised), so a refusal loses no features. The dead letters' requests are bounded by
`OutboxCap.dead_letter_max_bytes`: beyond it the oldest are dropped (counted), their rows kept.

Here: opening the file (created or migrated), noticing it deleted or replaced, the daemon
record, and the reads of the results. `ResultStore`'s other parts: its connection, lock and
counters (edge/store_connection.py), the arrivals (edge/store_arrivals.py), the outbox
(edge/store_outbox.py), the dead letters (edge/store_dead_letters.py), prune and reclaim
(edge/store_maintenance.py); the values it takes and gives (edge/store_types.py).

Elsewhere: an arrival's identity and its paths as text (edge/file_identity.py), the schema
(edge/store_schema.py), telling a store from any other file, the read-only open and the writer
lock (edge/store_file.py), the read-only queries of the commands (edge/store_reads.py).

Thread-safe: one connection behind a lock, shared by the daemon loop, the sender thread and the
metrics endpoint (every transaction is short; network calls happen outside the lock). One
`splitdet edge run` per database: `WriterLock` refuses a second.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from splitdet.edge.store_arrivals import StoreArrivals
from splitdet.edge.store_dead_letters import StoreDeadLetters
from splitdet.edge.store_file import (
    StoreError,
    check_before_writing,
    check_contents,
    open_failure,
    open_readonly,
    read_contents,
)
from splitdet.edge.store_maintenance import RECLAIM_PAGES, RECLAIM_PAUSE_S, StoreMaintenance
from splitdet.edge.store_outbox import StoreOutbox
from splitdet.edge.store_reads import daemon_record, image_columns, iter_results
from splitdet.edge.store_schema import (
    _MIGRATIONS,
    _SCHEMA,
    ADDED_COLUMNS,
    APPLICATION_ID,
    CHANGE_COUNTER,
    CHANGE_TRACKING,
    DAEMON_TABLE,
    SCHEMA_VERSION,
    VERDICTS,
)
from splitdet.edge.store_types import (
    Answer,
    Arrival,
    KnownFile,
    OutboxCap,
    OutboxFull,
    OutboxItem,
    OutboxStats,
    Pruned,
    StoredPath,
)
from splitdet.shared.edge_name import check_edge_name

#: What callers import from here, wherever it is defined.
__all__ = [
    "BUSY_TIMEOUT_MS",
    "RECLAIM_PAGES",
    "RECLAIM_PAUSE_S",
    "Answer",
    "Arrival",
    "KnownFile",
    "OutboxCap",
    "OutboxFull",
    "OutboxItem",
    "OutboxStats",
    "Pruned",
    "ResultStore",
    "StoreError",
    "StoreGone",
    "StoredPath",
]

log = logging.getLogger(__name__)

#: How long a write waits for another connection's lock before SQLite gives up (ms): another
#: program holding it longer (an `sqlite3` shell, a backup) makes the daemon's loop wait and
#: try the image again (`splitdet.edge.store_busy`), its sender try the request again.
BUSY_TIMEOUT_MS = 10_000
#: Bytes the WAL file is cut back to after a checkpoint (SQLite's journal_size_limit; by default
#: it keeps the size of the largest transaction, a whole request, for good).
WAL_KEEP_BYTES = 1 << 20
#: WAL pages (4 kB) after which a commit checkpoints them into the database (SQLite's default
#: 1000, 4 MB): the WAL's growth between checkpoints is what a nearly full disk must hold.
WAL_CHECKPOINT_PAGES = 256


def _track_changes(db: sqlite3.Connection) -> None:
    """Number the rows that have no change number yet (images.changed NULL: every row of a
    store an earlier splitdet wrote, when the column was just added) above the change counter
    (none yet: by their id, the order a consumer reading from 0 takes them in), set the counter
    to the largest, and make CHANGE_TRACKING's index and triggers where missing. In the
    caller's transaction (`_migrate`). Once made, the rows without a number are found through
    the index: nothing is read or written at a later open."""
    row = db.execute("SELECT value FROM counters WHERE name = ?", (CHANGE_COUNTER,)).fetchone()
    numbered = db.execute(
        "UPDATE images SET changed = ? + id WHERE changed IS NULL", (0 if row is None else row[0],)
    ).rowcount
    for statement in CHANGE_TRACKING:
        db.execute(statement)
    if numbered > 0:  # (the largest: read through the index just made)
        db.execute(
            "INSERT INTO counters (name, value) SELECT ?, MAX(changed) FROM images WHERE true"
            " ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)",
            (CHANGE_COUNTER,),
        )


class StoreGone(StoreError):
    """The database's path no longer names the file the store has open: deleted, moved away
    or replaced while the store was open (`ResultStore.check_file`)."""


class ResultStore(StoreArrivals, StoreOutbox, StoreDeadLetters, StoreMaintenance):
    """Results and outbox in one SQLite file; see the module docstring.

    Args:
        path: the database file (created with its parent directory if missing).
        cap: the outbox bounds and the policy when they are reached.
        readonly: open an existing store as it is, for reading only (a maintenance command's
            dry run): nothing is created, migrated or marked; a write fails.
    """

    def __init__(
        self,
        path: Path | str,
        cap: OutboxCap | None = None,
        readonly: bool = False,
        open_wait_ms: int | None = None,
        edge_name: str | None = None,
    ) -> None:
        """`open_wait_ms`: how long opening waits for a lock another program holds (default
        BUSY_TIMEOUT_MS, the wait of every later statement too); `edge_name`: the name of the
        edge writing, kept in every row it adds (images.edge; None: NULL), ValueError when it
        is no edge name (`shared.edge_name`)."""
        self.path = Path(path)
        self.edge_name = None if edge_name is None else check_edge_name(edge_name)
        self.cap = cap or OutboxCap()
        self._lock = threading.RLock()
        #: Transactions committed through this store (any thread): a change says the file
        #: could be written (`edge.store_busy`).
        self.commits = 0
        #: Whether opening made the store (a new or empty file): no earlier results here.
        self.created = False
        if readonly:  # (StoreError, naming the file, when it is not a store to read)
            self._db = open_readonly(self.path)
        else:
            self._open_for_writing(BUSY_TIMEOUT_MS if open_wait_ms is None else open_wait_ms)
        # the file just opened (and written by _migrate), as `check_file` compares it
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        self._checked = float("-inf")  # monotonic s of the last `check_file` stat

    # ------------------------------------------------------------------------------ the file

    def _open_for_writing(self, wait_ms: int) -> None:
        """Connect to the file (made, with its folder, when missing) and `_open` it; the
        connection is closed again when that fails. An existing file is checked first, read
        only (`check_before_writing`: what it holds, then `PRAGMA quick_check`): a damaged
        store is refused before anything is written to it, and a refused file's -wal (another
        database's, left by a restore by copying) is never checkpointed into it, as closing a
        read-write connection would."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create its folder ({exc.strerror or exc})"
            ) from None
        check_before_writing(self.path, wait_ms)
        try:
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None
            )
        except sqlite3.DatabaseError as exc:
            raise open_failure(self.path, exc) from None
        try:
            self._open(wait_ms)
        except BaseException:
            self._db.close()
            raise

    def _open(self, wait_ms: int) -> None:
        """Check what the file holds, then set the connection up and create or migrate the
        store, waiting up to `wait_ms` for a lock another program holds. StoreError when it
        cannot be used."""
        try:
            self._db.execute(f"PRAGMA busy_timeout={int(wait_ms)}")  # `results` may read
            # read only: another program's file is refused before journal_mode=WAL (a write)
            # touches it; _migrate checks again under the write lock
            self.created = check_contents(self.path, read_contents(self._db))
            if self.created:  # a new store: its free pages can go back to the file system
                # (`reclaim`); set before WAL and tables
                self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # the WAL file keeps the size of its largest run of writes unless limited: a
            # paper-size request (tens of MB) left as much on the disk for good, and 4 MB
            # between checkpoints filled a tight one
            self._db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.DatabaseError as exc:
            raise open_failure(self.path, exc) from None
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot use WAL journaling (got {mode!r})")

    def _migrate(self) -> None:
        """Create the store in an empty database, or bring one of ours to SCHEMA_VERSION (its
        ADDED_COLUMNS added, its rows numbered for the change cursor: `_track_changes`), and
        mark it (APPLICATION_ID): one transaction, so that another process opening the file
        meanwhile sees it empty or whole, never half made."""
        migrated_from = None
        with self._transaction() as db:
            contents = read_contents(db)
            if check_contents(self.path, contents):
                # executescript would COMMIT our transaction first: run statements one by one.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            else:  # a write now: a read-only file fails here, not at the first image
                if contents.user_version < SCHEMA_VERSION:
                    migrated_from = contents.user_version
                for step in range(contents.user_version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step].split(";"):
                        if statement.strip():
                            db.execute(statement)
                present = image_columns(db)
                for name, statement in ADDED_COLUMNS.items():
                    if name not in present:  # (a store an earlier splitdet wrote)
                        db.execute(statement)
            _track_changes(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if migrated_from is not None:  # (one way: said, so that a way back is kept first)
            log.warning(
                "%s: its schema was brought from version %d to %d; an earlier splitdet (of "
                "schema %d) cannot open it any more: to go back, keep the copy made before "
                "the upgrade", self.path, migrated_from, SCHEMA_VERSION, migrated_from,
                extra={"fields": {"event": "store_migrated", "db": str(self.path),
                                  "from": migrated_from, "to": SCHEMA_VERSION}},
            )  # fmt: skip

    def counters(self) -> dict[str, int]:
        """The durable event counters by name (`StoreConnection.counters`), without the change
        counter (CHANGE_COUNTER: a sequence number, no count of events)."""
        counters = super().counters()
        counters.pop(CHANGE_COUNTER, None)
        return counters

    def check_file(self, every_s: float = 0.0) -> None:
        """Raise StoreGone when the store's path no longer names the file it has open: the
        file was deleted, moved away or replaced meanwhile, and every commit since went (and
        would go) to a file no one else can read. One os.stat, at most once per `every_s`
        seconds since the last (0: now, whenever the last was); a stat failing otherwise (a
        passing I/O error) tells nothing and is tried again next time.

        Raises:
            StoreGone: naming the file and what happened to it.
        """
        now = time.monotonic()
        if every_s > 0 and now - self._checked < every_s:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreGone(
                f"{self.path}: the database file was deleted or moved away while this daemon "
                "used it; stopped before moving or deleting another image (results since then "
                "went to the deleted file). Put the file back to keep its results, or start "
                "the daemon again on a new database"
            ) from None
        except OSError:
            return
        if (stat.st_dev, stat.st_ino) != self._identity:
            raise StoreGone(
                f"{self.path}: the database file was replaced by another file while this "
                "daemon used it; stopped before moving or deleting another image (results "
                "since then went to the replaced file). Start the daemon again to use the "
                "file now there"
            )

    # ------------------------------------------------------------------------------ the daemon

    def record_daemon(self, fingerprint: str) -> None:
        """Record this process as the daemon running on the store (`DAEMON_TABLE`): its pid,
        `fingerprint` (the export it sends with) and the outbox caps; not stalled."""
        with self._transaction() as db:
            db.execute(DAEMON_TABLE)  # (made by the first daemon: the other writers never do)
            db.execute(
                "INSERT OR REPLACE INTO daemon VALUES (1, ?, ?, ?, ?, ?, NULL)",
                (os.getpid(), time.time(), fingerprint, self.cap.max_items, self.cap.max_bytes),
            )

    def record_outbox_full(self, since: float | None) -> None:
        """Record since when (unix s) the daemon's intake waits for room in the outbox; None:
        it takes images again."""
        with self._transaction() as db:
            db.execute("UPDATE daemon SET full_since = ? WHERE id = 1", (since,))

    def daemon(self) -> dict | None:
        """The daemon record (`store_reads.daemon_record`): the last `edge run`'s account."""
        with self._lock:
            return daemon_record(self._db)

    # ------------------------------------------------------------------------------ reading

    def verdict_counts(self) -> dict[str, int]:
        """Result rows per verdict (every verdict present, 0 when none)."""
        counts = dict.fromkeys(VERDICTS, 0)
        for verdict, n in self._query("SELECT verdict, COUNT(*) FROM images GROUP BY verdict"):
            counts[verdict] = int(n)
        return counts

    def results(self, since: float | None = None, verdict: str | None = None) -> list[dict]:
        """Result rows (see RESULT_COLUMNS; JSON columns decoded), in arrival order.

        Args:
            since: only rows created or changed at or after this unix time.
            verdict: only rows with this verdict.
        """
        return list(iter_results(self._db, self._lock, since, verdict))
