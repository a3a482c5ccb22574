"""The edge's durable state: one SQLite file holding every image's result and the outbox of
encoded requests still to deliver to the cloud (no torch).

    store = ResultStore("edge.sqlite", OutboxCap(max_items=10_000, max_bytes=2 << 30))
    image_id = store.record_pending(arrival, p_defect, request_id, payload, fingerprint, ...)
    ...                                      # the sender delivers the payload
    store.complete(image_id, answer)         # result "defect" + outbox deletion: one transaction

Durability model (DESIGN.md, "The edge's durability model"): WAL journal, synchronous=FULL, so a
returned commit survives kill -9 and power loss. A defect-free image's "ok" row is one commit. A
flagged image's "pending" row and its outbox row are one commit; the cloud's answer and the outbox
deletion are one commit. A permanent refusal turns the row into verdict "error" (error_kind
"dead_letter", with the reason) and moves its request from the outbox to the dead letters in one
commit; `requeue_dead_letters` moves them back (after the cause is fixed: a cloud bug, a message
bound raised), so a refusal loses no features. The dead letters' requests are bounded by
`OutboxCap.dead_letter_max_bytes`: beyond it the oldest are dropped (counted), their rows kept.

Elsewhere: an arrival's identity and its paths as text (edge/file_identity.py), the schema
(edge/store_schema.py), telling a store from any other file, the read-only open and the writer
lock (edge/store_file.py), the read-only queries of the commands (edge/store_reads.py).

Thread-safe: one connection behind a lock, shared by the daemon loop, the sender thread and the
metrics endpoint (every transaction is short; network calls happen outside the lock). One
`splitdet edge run` per database: `WriterLock` refuses a second.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitdet.edge.boot_clock import boot_clock
from splitdet.edge.file_identity import path_text, still_there
from splitdet.edge.store_file import (
    StoreError,
    check_contents,
    immediate,
    open_failure,
    open_readonly,
    read_contents,
)
from splitdet.edge.store_reads import (
    daemon_record,
    image_columns,
    iter_results,
    outbox_by_model,
)
from splitdet.edge.store_schema import (
    _JSON_COLUMNS,
    _MIGRATIONS,
    _SCHEMA,
    ADDED_COLUMNS,
    APPLICATION_ID,
    AUTO_VACUUM_INCREMENTAL,
    DAEMON_TABLE,
    ERROR_KINDS,
    FINAL_VERDICTS,
    FULL_POLICIES,
    REQUEUED_NOTE,
    SCHEMA_VERSION,
    VERDICTS,
)

#: Free pages `ResultStore.reclaim` gives back per write (1 MB of 4 KiB pages; a step that moves
#: pages took up to ~0.3 s at 1024 on this machine), and the pause after each, in which a writer
#: waiting for the store's lock (not a fair one) takes it: a reclaim of 1 GB delays an image's
#: result by about one step, instead of by seconds.
RECLAIM_PAGES = 256
RECLAIM_PAUSE_S = 0.005
#: How long a write waits for another connection's lock before SQLite gives up (ms): another
#: program holding it longer (an `sqlite3` shell, a backup) makes the daemon's loop wait and
#: try the image again (`splitdet.edge.store_busy`), its sender try the request again.
BUSY_TIMEOUT_MS = 10_000

#: Where a processed file will be kept: a path, None (deleted), or a function of the row id.
StoredPath = str | None | Callable[[int], str | None]


class StoreGone(StoreError):
    """The database's path no longer names the file the store has open: deleted, moved away
    or replaced while the store was open (`ResultStore.check_file`)."""


class OutboxFull(Exception):
    """The outbox is at its cap and the policy is "wait": try again later."""


@dataclass(frozen=True)
class OutboxCap:
    """Bounds of the outbox and what happens at them.

    Attributes:
        max_items: requests waiting at most.
        max_bytes: total payload bytes waiting at most.
        policy: "wait" (the daemon stops taking images from the hot folder until the outbox has
            room; the images wait there, counted as outbox_full_waits) or "reject" (the flagged
            image gets verdict "error", error_kind "outbox_full", its features are dropped;
            counted as outbox_full_rejected).
        dead_letter_max_bytes: refused requests kept for requeueing, total payload bytes at
            most; the oldest beyond it are dropped (counted as dead_letter_payloads_dropped).
    """

    max_items: int = 10_000
    max_bytes: int = 2 << 30
    policy: str = "wait"
    dead_letter_max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_bytes < 1 or self.dead_letter_max_bytes < 0:
            raise ValueError("outbox caps must be at least 1")
        if self.policy not in FULL_POLICIES:
            raise ValueError(f"outbox policy must be one of {FULL_POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class Arrival:
    """One file as the hot folder delivered it.

    Attributes:
        path: where it arrived.
        file_key: "name|size|mtime_ns|inode": the identity of this arrival of the file.
        content_hash: SHA-256 hex of its bytes.
        size_bytes: its size.
        arrived: unix s when it was found complete.
    """

    path: str
    file_key: str
    content_hash: str
    size_bytes: int
    arrived: float


@dataclass(frozen=True)
class KnownFile:
    """A file the store already has a row for (found again after a crash or in keep mode)."""

    id: int
    path: str
    stored_path: str | None
    verdict: str
    error_kind: str | None
    reason: str | None


@dataclass(frozen=True)
class OutboxItem:
    """One request waiting for delivery."""

    image_id: int
    request_id: str
    payload: bytes
    created: float
    attempts: int
    stored_path: str | None
    path: str
    fingerprint: str  # the model export that made the request


@dataclass(frozen=True)
class Answer:
    """The cloud's detections for one request.

    Attributes:
        boxes: [[x1, y1, x2, y2], ...] in original-image px, by decreasing score.
        timings: cloud-side and round-trip seconds, merged into the row's timings.
    """

    boxes: Sequence[Sequence[float]]
    scores: Sequence[float]
    labels: Sequence[int]
    class_names: Sequence[str]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Pruned:
    """What `ResultStore.prune` did: rows deleted, the largest row id it looked at, and the rows
    kept although their wall-clock stamp is old enough, because this boot wrote them more
    recently (the clock was stepped forward since: `boot_clock`), or because their file still
    lies where it arrived (`kept_in_place`)."""

    deleted: int
    through_id: int
    kept_for_clock: int = 0
    kept_in_place: int = 0


def _boot_stamp() -> tuple[str | None, float | None]:
    """(finished_boot, finished_boot_s) for a result made final now; (None, None) off Linux."""
    boot = boot_clock()
    return (None, None) if boot is None else (boot.boot_id, boot.seconds)


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox (or the dead letters) holds: rows, payload bytes, the oldest row's
    creation time (unix s; None when empty)."""

    depth: int
    bytes: int
    oldest_created: float | None


class ResultStore:
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
    ) -> None:
        """`open_wait_ms`: how long opening waits for a lock another program holds (default
        BUSY_TIMEOUT_MS, the wait of every later statement too)."""
        self.path = Path(path)
        self.cap = cap or OutboxCap()
        self._lock = threading.RLock()
        #: Transactions committed through this store (any thread): a change says the file
        #: could be written (`edge.store_busy`).
        self.commits = 0
        if readonly:  # (StoreError, naming the file, when it is not a store to read)
            self._db = open_readonly(self.path)
        else:
            self._open_for_writing(BUSY_TIMEOUT_MS if open_wait_ms is None else open_wait_ms)
        # the file just opened (and written by _migrate), as `check_file` compares it
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        self._checked = float("-inf")  # monotonic s of the last `check_file` stat

    # ------------------------------------------------------------------------------ plumbing

    def _open_for_writing(self, wait_ms: int) -> None:
        """Connect to the file (made, with its folder, when missing) and `_open` it; the
        connection is closed again when that fails."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create its folder ({exc.strerror or exc})"
            ) from None
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
            if check_contents(self.path, read_contents(self._db)):  # a new store: its free
                # pages can go back to the file system (`reclaim`); set before WAL and tables
                self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.DatabaseError as exc:
            raise open_failure(self.path, exc) from None
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: cannot use WAL journaling (got {mode!r})")

    def _migrate(self) -> None:
        """Create the store in an empty database, or bring one of ours to SCHEMA_VERSION, and
        mark it (APPLICATION_ID): one transaction, so that another process opening the file
        meanwhile sees it empty or whole, never half made."""
        with self._transaction() as db:
            contents = read_contents(db)
            if check_contents(self.path, contents):
                # executescript would COMMIT our transaction first: run statements one by one.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
            else:  # a write now: a read-only file fails here, not at the first image
                for step in range(contents.user_version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step].split(";"):
                        if statement.strip():
                            db.execute(statement)
                present = image_columns(db)
                for name, statement in ADDED_COLUMNS.items():
                    if name not in present:  # (a store an earlier splitdet wrote)
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

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

    # ------------------------------------------------------------------------------ arrivals

    def known(self, file_key: str) -> KnownFile | None:
        """The row of an arrival already recorded, or None."""
        rows = self._query(
            "SELECT id, path, stored_path, verdict, error_kind, reason FROM images"
            " WHERE file_key = ?",
            (path_text(file_key),),
        )
        return KnownFile(*rows[0]) if rows else None

    def renumbered(self, path: str, file_key: str) -> tuple[int, str, str] | None:
        """(id, file_key, content_hash) of the newest row that left its file at `path` (as
        `path_text` writes it) under `file_key` but for the inode (`same_but_inode`), or None:
        under --after keep, the row of a file a remount numbered anew (see `rekey`). Looked
        up through the file_key's own index, by its prefix "name|size|mtime_ns|"."""
        prefix = path_text(file_key).rpartition("|")[0] + "|"
        rows = self._query(
            "SELECT id, file_key, content_hash FROM images WHERE file_key > ? AND file_key < ?"
            " AND stored_path = ? ORDER BY id DESC LIMIT 1",
            (prefix, prefix + "\U0010ffff", path_text(path)),
        )
        return rows[0] if rows else None

    def rekey(self, image_id: int, file_key: str) -> None:
        """Give a row the `file_key` its very file (same path, same content) has now: after a
        remount that numbers inodes anew, or a restore, it is known again by `known`."""
        with self._transaction() as db:
            db.execute(
                "UPDATE images SET file_key = ?, updated = ? WHERE id = ?",
                (path_text(file_key), time.time(), image_id),
            )

    def _insert(self, db: sqlite3.Connection, arrival: Arrival, **values: Any) -> int:
        now = time.time()
        row = {
            "file_key": path_text(arrival.file_key),
            "path": path_text(arrival.path),
            "content_hash": arrival.content_hash,
            "size_bytes": arrival.size_bytes,
            "arrived": arrival.arrived,
            "updated": now,
            **values,
        }
        if row["verdict"] in FINAL_VERDICTS:
            row["finished"] = now
            row["finished_boot"], row["finished_boot_s"] = _boot_stamp()
        if row.get("reason") is not None:  # it may quote the file's name
            row["reason"] = path_text(row["reason"])
        for name in _JSON_COLUMNS:
            if name in row and row[name] is not None:
                row[name] = json.dumps(row[name])
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cursor = db.execute(f"INSERT INTO images ({columns}) VALUES ({marks})", tuple(row.values()))
        return int(cursor.lastrowid)

    @staticmethod
    def _set_stored_path(
        db: sqlite3.Connection, image_id: int, stored_path: StoredPath
    ) -> str | None:
        path = stored_path(image_id) if callable(stored_path) else stored_path
        path = None if path is None else path_text(path)
        db.execute("UPDATE images SET stored_path = ? WHERE id = ?", (path, image_id))
        return path

    def set_stored_path(self, image_id: int, stored_path: str) -> str:
        """Record where a processed file now goes (its planned name was taken meanwhile), one
        commit; returns the path as stored."""
        with self._transaction() as db:
            return self._set_stored_path(db, image_id, stored_path)

    def record_ok(
        self,
        arrival: Arrival,
        p_defect: float,
        fingerprint: str,
        timings: dict[str, float],
        stored_path: StoredPath = None,
        threshold: float | None = None,
    ) -> tuple[int, str | None]:
        """A defect-free image's final result, one commit; `threshold`: the gate threshold
        `p_defect` was judged at. Returns (row id, stored path)."""
        with self._transaction() as db:
            image_id = self._insert(
                db, arrival, verdict="ok", p_defect=p_defect, fingerprint=fingerprint,
                timings=timings, threshold=threshold,
            )  # fmt: skip
            return image_id, self._set_stored_path(db, image_id, stored_path)

    def record_error(
        self,
        arrival: Arrival,
        kind: str,
        reason: str,
        fingerprint: str,
        stored_path: StoredPath = None,
        p_defect: float | None = None,
        timings: dict[str, float] | None = None,
        threshold: float | None = None,
    ) -> tuple[int, str | None]:
        """A final "error" result (quarantine or outbox full), one commit; `threshold` as for
        `record_ok` (None for a file never judged)."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {kind!r}")
        with self._transaction() as db:
            image_id = self._insert(
                db, arrival, verdict="error", error_kind=kind, reason=reason,
                fingerprint=fingerprint, p_defect=p_defect, timings=timings or {},
                threshold=threshold,
            )  # fmt: skip
            if kind == "outbox_full":
                self._count(db, "outbox_full_rejected")
            return image_id, self._set_stored_path(db, image_id, stored_path)

    def record_pending(
        self,
        arrival: Arrival,
        p_defect: float,
        request_id: str,
        payload: bytes,
        fingerprint: str,
        timings: dict[str, float],
        stored_path: StoredPath = None,
        threshold: float | None = None,
    ) -> tuple[int, str | None, str]:
        """A flagged image: its "pending" result and its outbox row in one commit; `threshold`
        as for `record_ok`.

        Returns (row id, stored path, verdict): "pending", or "error" when the outbox is full
        and the policy is "reject" (error_kind "outbox_full", the payload is not kept).

        Raises:
            OutboxFull: the outbox is full and the policy is "wait" (nothing written).
        """
        with self._transaction() as db:
            depth, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox"
            ).fetchone()
            if depth + 1 > self.cap.max_items or size + len(payload) > self.cap.max_bytes:
                if self.cap.policy == "wait":
                    raise OutboxFull(f"outbox holds {depth} requests, {size} bytes")
                reason = (
                    f"outbox full ({depth} requests, {size} bytes; caps {self.cap.max_items} "
                    f"requests, {self.cap.max_bytes} bytes): features dropped"
                )
                image_id = self._insert(
                    db, arrival, verdict="error", error_kind="outbox_full", reason=reason,
                    p_defect=p_defect, fingerprint=fingerprint, timings=timings,
                    request_id=request_id, threshold=threshold,
                )  # fmt: skip
                self._count(db, "outbox_full_rejected")
                return image_id, self._set_stored_path(db, image_id, stored_path), "error"
            now = time.time()
            image_id = self._insert(
                db, arrival, verdict="pending", p_defect=p_defect, request_id=request_id,
                fingerprint=fingerprint, timings=timings, bytes_sent=len(payload),
                threshold=threshold,
            )  # fmt: skip
            db.execute(
                "INSERT INTO outbox (image_id, request_id, payload, size_bytes, created, next_try)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (image_id, request_id, payload, len(payload), now, now),
            )
            return image_id, self._set_stored_path(db, image_id, stored_path), "pending"

    def outbox_has_room(self, payload_bytes: int = 0) -> bool:
        """Whether one more request of `payload_bytes` bytes fits the outbox's cap."""
        stats = self.outbox_stats()
        return (
            stats.depth + 1 <= self.cap.max_items
            and stats.bytes + payload_bytes <= self.cap.max_bytes
        )

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

    def count_event(self, name: str) -> None:
        """Add one to a durable counter."""
        with self._transaction() as db:
            self._count(db, name)

    @staticmethod
    def _count(db: sqlite3.Connection, name: str) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1)"
            " ON CONFLICT (name) DO UPDATE SET value = value + 1",
            (name,),
        )

    def counters(self) -> dict[str, int]:
        """The event counters (`count_event`) by name."""
        return {name: int(value) for name, value in self._query("SELECT name, value FROM counters")}

    # ------------------------------------------------------------------------------ the outbox

    def next_due(
        self, now: float | None = None, max_wait_s: float | None = None
    ) -> OutboxItem | None:
        """The outbox item to send next: due (next_try <= now), earliest due first.

        Args:
            now: unix s (default: the clock).
            max_wait_s: the longest wait the sender ever sets (its backoff cap). A next_try
                further ahead than that was set before the wall clock stepped back (an edge
                box without RTC, an NTP step): it is made due now rather than waiting out the
                step (hours, once a day...).
        """
        now = time.time() if now is None else now
        if max_wait_s is not None:
            self._due_after_clock_step(now, max_wait_s)
        rows = self._query(
            "SELECT o.image_id, o.request_id, o.payload, o.created, i.attempts, i.stored_path,"
            " i.path, i.fingerprint FROM outbox o JOIN images i ON i.id = o.image_id"
            " WHERE o.next_try <= ? ORDER BY o.next_try, o.image_id LIMIT 1",
            (now,),
        )
        if not rows:
            return None
        image_id, request_id, payload, created, attempts, stored_path, path, fingerprint = rows[0]
        return OutboxItem(
            image_id, request_id, bytes(payload), created, attempts, stored_path, path, fingerprint
        )

    def _due_after_clock_step(self, now: float, max_wait_s: float) -> int:
        """Set next_try = now where it lies beyond now + max_wait_s (+ 1 s of slack for the
        time between the sender's reading of the clock and ours); returns how many. Looked
        for before writing: the common case takes no write lock."""
        limit = now + max_wait_s + 1.0
        if not self._query("SELECT 1 FROM outbox WHERE next_try > ? LIMIT 1", (limit,)):
            return 0
        with self._transaction() as db:
            cursor = db.execute("UPDATE outbox SET next_try = ? WHERE next_try > ?", (now, limit))
            return cursor.rowcount

    def next_try_at(self) -> float | None:
        """When the earliest outbox item is due (unix s), or None if the outbox is empty."""
        return self._query("SELECT MIN(next_try) FROM outbox")[0][0]

    def complete(self, image_id: int, answer: Answer) -> bool:
        """The cloud's answer: verdict "defect" with the boxes, and the outbox row deleted, in one
        commit. Returns False (and changes nothing) when the item is no longer pending."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT timings FROM images WHERE id = ? AND verdict = 'pending'", (image_id,)
            ).fetchone()
            if row is None:
                return False
            timings = {**json.loads(row[0]), **answer.timings}
            now = time.time()
            db.execute(
                "UPDATE images SET verdict = 'defect', boxes = ?, scores = ?, labels = ?,"
                " class_names = ?, timings = ?, finished = ?, updated = ?,"
                " finished_boot = ?, finished_boot_s = ?, attempts = attempts + 1 WHERE id = ?",
                (
                    json.dumps([[float(v) for v in box] for box in answer.boxes]),
                    json.dumps([float(s) for s in answer.scores]),
                    json.dumps([int(v) for v in answer.labels]),
                    json.dumps(list(answer.class_names)),
                    json.dumps(timings),
                    now,
                    now,
                    *_boot_stamp(),
                    image_id,
                ),
            )
            db.execute("DELETE FROM outbox WHERE image_id = ?", (image_id,))
            return True

    def retry_later(self, image_id: int, next_try: float, error: str) -> None:
        """A transient failure: count the attempt and set when to try again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET next_try = ?, last_error = ? WHERE image_id = ?",
                (next_try, path_text(error), image_id),
            )
            db.execute(
                "UPDATE images SET attempts = attempts + 1, updated = ? WHERE id = ?",
                (time.time(), image_id),
            )

    def hold_export(self, fingerprint: str, until: float, error: str | None = None) -> int:
        """Hold every outbox request made with one model export until `until` (unix s; a later
        next_try is kept), e.g. while the cloud does not serve that export; attempts are not
        counted, and each request's last error becomes `error` (None keeps it). Returns how
        many requests are held."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE outbox SET next_try = MAX(next_try, ?),"
                " last_error = COALESCE(?, last_error) WHERE image_id IN"
                " (SELECT o.image_id FROM outbox o JOIN images i ON i.id = o.image_id"
                " WHERE i.fingerprint = ?)",
                (until, None if error is None else path_text(error), fingerprint),
            )
            return cursor.rowcount

    def dead_letter(self, image_id: int, reason: str) -> bool:
        """A permanent refusal: verdict "error" (dead_letter) with the reason, the request moved
        from the outbox to the dead letters, one commit; not retried unless requeued. False
        when the item is no longer pending."""
        with self._transaction() as db:
            return self._dead_letter(db, image_id, reason, attempt=True)

    def _dead_letter(
        self, db: sqlite3.Connection, image_id: int, reason: str, attempt: bool
    ) -> bool:
        """`dead_letter` within `db`'s transaction; `attempt`: count it as a send attempt."""
        now = time.time()
        cursor = db.execute(
            "UPDATE images SET verdict = 'error', error_kind = 'dead_letter', reason = ?,"
            " finished = ?, updated = ?, finished_boot = ?, finished_boot_s = ?,"
            " attempts = attempts + ? WHERE id = ? AND verdict = 'pending'",
            (path_text(reason), now, now, *_boot_stamp(), int(attempt), image_id),
        )
        if cursor.rowcount:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (image_id, request_id, payload,"
                " size_bytes, created, dead_at) SELECT image_id, request_id, payload,"
                " size_bytes, created, ? FROM outbox WHERE image_id = ?",
                (now, image_id),
            )
            self._count(db, "dead_letters")
            self._trim_dead_letters(db)
        db.execute("DELETE FROM outbox WHERE image_id = ?", (image_id,))
        return bool(cursor.rowcount)

    def dead_letter_export(self, fingerprint: str, reason: str, dry_run: bool = False) -> int:
        """Every outbox request made with the model export `fingerprint` made a dead letter
        (its row "error", kept for `requeue_dead_letters`, within the dead letters' byte cap),
        in one commit: an export no cloud will serve again. Returns how many (would be) moved.
        A request the sender is sending meanwhile ends as the dead letter: its answer, when it
        comes, finds the row no longer pending and changes nothing (`complete`)."""
        with self._transaction() as db:
            ids = [row[0] for row in db.execute(
                "SELECT o.image_id FROM outbox o JOIN images i ON i.id = o.image_id"
                " WHERE i.fingerprint = ? AND i.verdict = 'pending' ORDER BY o.image_id",
                (fingerprint,),
            )]  # fmt: skip
            if not dry_run:
                for image_id in ids:  # (not a send attempt)
                    self._dead_letter(db, image_id, reason, attempt=False)
            return len(ids)

    def _trim_dead_letters(self, db: sqlite3.Connection) -> None:
        """Drop the oldest kept requests until the dead letters fit their byte cap."""
        total = db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM dead_letters").fetchone()[0]
        excess = total - self.cap.dead_letter_max_bytes
        if excess <= 0:
            return
        for image_id, size in db.execute(
            "SELECT image_id, size_bytes FROM dead_letters ORDER BY dead_at, image_id"
        ).fetchall():
            db.execute("DELETE FROM dead_letters WHERE image_id = ?", (image_id,))
            self._count(db, "dead_letter_payloads_dropped")
            excess -= size
            if excess <= 0:
                return

    def dead_letter_stats(self) -> OutboxStats:
        """Dead letters whose request is kept: count, payload bytes, oldest outbox entry."""
        depth, size, oldest = self._query(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0), MIN(created) FROM dead_letters"
        )[0]
        return OutboxStats(int(depth), int(size), oldest)

    def requeue_dead_letters(
        self, since: float | None = None, dry_run: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """Put refused requests back in the outbox, due now, their rows "pending" again (one
        commit). Only as many as the outbox has room for, oldest first.

        Args:
            since: only dead letters refused at or after this unix time.
            dry_run: change nothing; say what would happen.

        Returns:
            (requeued, no room, not kept): image ids of the dead letters requeued, left for
            want of room in the outbox, and without a kept request (dropped by the byte cap, or
            refused before requests were kept: reprocess their images instead).
        """
        since = float("-inf") if since is None else since
        with self._transaction() as db:
            # (a version 1 store read as it is, by a dry run, has no table of kept requests)
            keeps = "dead_letters" in read_contents(db).names
            kept = (
                []
                if not keeps
                else db.execute(
                    "SELECT d.image_id, d.size_bytes FROM dead_letters d"
                    " JOIN images i ON i.id = d.image_id WHERE i.verdict = 'error'"
                    " AND i.error_kind = 'dead_letter' AND d.dead_at >= ? ORDER BY d.image_id",
                    (since,),
                ).fetchall()
            )
            not_kept = [row[0] for row in db.execute(
                "SELECT id FROM images WHERE verdict = 'error' AND error_kind = 'dead_letter'"
                " AND COALESCE(finished, updated) >= ?"
                + (" AND id NOT IN (SELECT image_id FROM dead_letters)" if keeps else "")
                + " ORDER BY id",
                (since,),
            )]  # fmt: skip
            depth, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox"
            ).fetchone()
            requeued, no_room = [], []
            for image_id, payload_bytes in kept:
                if depth + 1 > self.cap.max_items or size + payload_bytes > self.cap.max_bytes:
                    no_room.append(image_id)
                    continue
                depth, size = depth + 1, size + payload_bytes
                requeued.append(image_id)
                if not dry_run:
                    self._requeue(db, image_id)
            return requeued, no_room, not_kept

    def _requeue(self, db: sqlite3.Connection, image_id: int) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO outbox (image_id, request_id, payload, size_bytes, created, next_try,"
            " last_error) SELECT image_id, request_id, payload, size_bytes, created, ?,"
            " ? FROM dead_letters WHERE image_id = ?",
            (now, REQUEUED_NOTE, image_id),
        )
        db.execute("DELETE FROM dead_letters WHERE image_id = ?", (image_id,))
        db.execute(
            "UPDATE images SET verdict = 'pending', error_kind = NULL, reason = NULL,"
            " finished = NULL, finished_boot = NULL, finished_boot_s = NULL, updated = ?"
            " WHERE id = ?",
            (now, image_id),
        )
        self._count(db, "requeued")

    def prune(
        self,
        before: float,
        dry_run: bool = False,
        batch: int = 2000,
        start_after: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> Pruned:
        """Delete final results (ok, defect, error) finished before `before` (unix s), with any
        request kept for their dead letter; pending rows are never touched, nor a row whose file
        still lies where it arrived (--after keep, or a move that failed or was cut short by a
        crash): that row is what tells the daemon the file is done, and without it the file
        would be processed again. "Its file" is the one it recorded (`still_there`): a file the
        camera wrote since under the same name does not keep it. Deletes in batches of `batch`
        rows, one short commit each.

        Args:
            before: unix s; rows finished earlier go.
            dry_run: count, delete nothing.
            batch: rows looked at per commit.
            start_after: look only at rows with a larger id (the daemon starts from 0 each
                time: a row kept for its file is looked at again once the file goes).
            should_stop: checked between batches; True ends the prune early.

        A row this boot made final is deleted only when the boot clock agrees that it is as
        old as `before` says (the same span before now): its wall-clock stamp may be old only
        because the clock was behind when it was written and has been stepped forward since
        (an edge without a clock battery booting with a stale time). Those rows are counted in
        `kept_for_clock` and wait until they are old by both clocks.

        Returns:
            how many rows were (or would be) deleted, the largest id looked at, and how many
            were kept for the clock and for their file.
        """
        deleted, kept_for_clock, kept_in_place, after_id = 0, 0, 0, start_after
        boot = boot_clock()
        # rows of this boot are young by the boot clock when finished after `young_from`
        young_from = None if boot is None else boot.seconds - (time.time() - before)
        with self._lock:
            columns = image_columns(self._db) if boot is not None else set()
        stamped = {"finished_boot", "finished_boot_s"} <= columns  # (a read-only older store)
        boot_select = ", finished_boot, finished_boot_s" if stamped else ", NULL, NULL"
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, path, file_key{boot_select} FROM images WHERE id > ? AND"
                    " verdict IN ('ok', 'defect', 'error') AND finished < ? ORDER BY id LIMIT ?",
                    (after_id, before, batch),
                ).fetchall()
            if not rows:
                return Pruned(deleted, after_id, kept_for_clock, kept_in_place)
            after_id = rows[-1][0]
            doomed = []
            for row_id, path, key, row_boot, row_boot_s in rows:
                young = (
                    boot is not None
                    and row_boot == boot.boot_id
                    and row_boot_s is not None
                    and row_boot_s > young_from
                )
                if young:
                    kept_for_clock += 1
                elif still_there(path, key):
                    kept_in_place += 1
                else:
                    doomed.append((row_id,))
            deleted += len(doomed)
            if doomed and not dry_run:
                with self._transaction() as db:
                    db.executemany("DELETE FROM dead_letters WHERE image_id = ?", doomed)
                    db.executemany(
                        "DELETE FROM images WHERE id = ? AND verdict IN ('ok', 'defect', 'error')",
                        doomed,
                    )
                    db.execute(
                        "INSERT INTO counters (name, value) VALUES ('pruned', ?)"
                        " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                        (len(doomed),),
                    )
            if should_stop is not None and should_stop():
                return Pruned(deleted, after_id, kept_for_clock, kept_in_place)

    def reclaim(self, above_bytes: int = 0, should_stop: Callable[[], bool] | None = None) -> int:
        """Give the file's free pages back to the file system when they are more than
        `above_bytes` (the outbox of a long cloud outage, results pruned): in steps of
        RECLAIM_PAGES pages, one short write each with a pause after it for the writers
        waiting, then a passive checkpoint (in WAL mode the file shrinks at a checkpoint).
        `should_stop` is checked between steps: True ends it early (the rest waits for the next
        reclaim). Returns the bytes given back (less any pages writers took meanwhile); 0 for a
        store made before splitdet set incremental auto-vacuum (its file keeps its size; SQLite
        reuses the pages).
        """
        if self.pragma("auto_vacuum") != AUTO_VACUUM_INCREMENTAL:
            return 0
        page, free = int(self.pragma("page_size")), int(self.pragma("freelist_count"))
        if free * page <= above_bytes:
            return 0
        freed = 0
        while free and not (should_stop is not None and should_stop()):
            with self._lock:  # (no transaction is open under the lock: executescript's
                # COMMIT commits nothing of ours; incremental_vacuum runs to its end only so)
                self._db.executescript(f"PRAGMA incremental_vacuum({RECLAIM_PAGES});")
                left = int(self.pragma("freelist_count"))
            if left >= free:  # (nothing moved, or writers took as many: never loop for good)
                break
            freed, free = freed + free - left, left
            time.sleep(RECLAIM_PAUSE_S)
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return freed * page

    def daemon(self) -> dict | None:
        """The daemon record (`store_reads.daemon_record`): the last `edge run`'s account."""
        with self._lock:
            return daemon_record(self._db)

    def outbox_fingerprints(self) -> dict[str, int]:
        """Requests in the outbox by the model fingerprint they were made with."""
        with self._lock:
            return outbox_by_model(self._db)

    def outbox_stats(self) -> OutboxStats:
        """Requests waiting to be sent: count, payload bytes, oldest creation time."""
        depth, size, oldest = self._query(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0), MIN(created) FROM outbox"
        )[0]
        return OutboxStats(int(depth), int(size), oldest)

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
