"""The cloud's idempotency store: request id -> the answer already given, durable and bounded.

The edge re-sends a request whose acknowledgement it lost (timeout, crash, network cut). The cloud
must then return the same boxes without running the heads again, also after its own restart. So
answers live in SQLite (WAL, synchronous=FULL: a returned answer survives a crash of the server),
keyed by request id, with the model fingerprint and a digest of the request they answer. Only the
newest `capacity` answers are kept; older ones are evicted on insert. Each row carries a
checksum (`answer_checksum`): a stored answer changed on the disk is damaged, not given.

The file is marked by `PRAGMA application_id` (`APPLICATION_ID`); one written before the mark
was set (application_id 0, one `answers` table) is recognised by its table and marked. Any other
SQLite file (another program's, an edge store: a typo in --answers-db) is refused before anything
is written to it (`NotAnswersDatabase`); an empty one becomes the store.

Answers are scoped by the caller (`answers_scope`): with bearer tokens, each token's callers
have their own request ids, so one token holder cannot claim (and poison) an id another edge will
send. A scoped answer is kept under the key "SCOPE\x1fREQUEST_ID" (`scoped_key`; SCOPE is
`scope_of_token`'s digest of the token, never the token), an unscoped one (no token configured)
under the bare request id: a file written before scopes existed keeps working as it is (its
answers are the shared scope's), with no change of schema. A request id is printable text, so
no bare id can equal a scoped key. An edge re-sending after its token changed is in a new scope:
its request is computed again.

Thread-safe: one connection behind a lock (writes are tiny; SQLite serialises them anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from splitdet.edge.store_file import (
    Contents,
    describe_contents,
    has_wal,
    immediate,
    quick_check_findings,
    read_contents,
)
from splitdet.edge.store_schema import APPLICATION_ID as EDGE_APPLICATION_ID

log = logging.getLogger(__name__)

#: `PRAGMA application_id` of an answers database: b"SPCA" (splitdet cloud answers). The edge
#: store names it too (edge/store_schema.py ANSWERS_APPLICATION_ID), to say what a wrong --db holds.
APPLICATION_ID = 0x53504341

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order, for eviction
    request_id  TEXT NOT NULL UNIQUE,               -- the request id, scoped (scoped_key)
    fingerprint TEXT NOT NULL,                      -- model that computed the answer
    digest      TEXT NOT NULL,                      -- hash of the request it answers
    payload     BLOB NOT NULL,                      -- the serialized answer
    created     REAL NOT NULL,                      -- unix time, for operators
    checksum    TEXT                                -- answer_checksum (NULL: written without)
)
"""
#: The column a file made before answers were checksummed lacks; added when it is opened.
_CHECKSUM_COLUMN = "ALTER TABLE answers ADD COLUMN checksum TEXT"

#: The columns a store must have (`checksum` is added to a file that lacks it).
_COLUMNS = frozenset({"seq", "request_id", "fingerprint", "digest", "payload", "created"})
_REFUSED = "give another --answers-db; this one is left as it is"
_KNOWN = {EDGE_APPLICATION_ID: "a splitdet edge store (the --db of `splitdet edge run`)"}


#: The scope of the answers the current call stores and reads ("": the shared scope). Set per
#: call by `answers_scope`; a ContextVar, so each gRPC handler thread sees its own call's.
_SCOPE: ContextVar[str] = ContextVar("splitdet_answers_scope", default="")
#: Separates a scope from the request id in a scoped key (a request id is printable: never in it).
SCOPE_SEPARATOR = "\x1f"


def scope_of_token(token: str) -> str:
    """The answers scope of the callers holding `token` (the bearer token, or the whole
    authorization value): 32 hex digits of a domain-separated SHA-256, so the store never
    holds the token itself."""
    return hashlib.sha256(b"splitdet answers scope\0" + token.encode()).hexdigest()[:32]


@contextlib.contextmanager
def answers_scope(scope: str) -> Iterator[None]:
    """Within the block, this thread's store reads and writes are in `scope` ("": shared)."""
    reset = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(reset)


def scoped_key(request_id: str) -> str:
    """The key `request_id` is stored under in the current scope (`answers_scope`)."""
    scope = _SCOPE.get()
    return f"{scope}{SCOPE_SEPARATOR}{request_id}" if scope else request_id


class NotAnswersDatabase(sqlite3.DatabaseError):
    """The file is a SQLite database, but neither empty nor a splitdet cloud answers database
    (nothing was written to it). A sqlite3.DatabaseError: `splitdet cloud` names --answers-db
    with it."""


class DamagedAnswersDatabase(sqlite3.DatabaseError):
    """An answers database whose pages SQLite finds damaged (`PRAGMA quick_check`) as the
    server starts: refused, with what to do (a damaged store failed every repeat's lookup)."""


class AnswersFileGone(sqlite3.OperationalError):
    """The answers database was deleted or replaced while the server ran: what it stored since
    would go to a file no one reads (lost at the next restart), so nothing more is stored."""


def answer_checksum(key: str, fingerprint: str, digest: str, payload: bytes) -> str:
    """SHA-256 (hex) over a stored answer's key, fingerprint, request digest and payload: SQLite
    checks no page's contents, so a bit flipped on the disk in a payload that still parses
    (a box's digit) would be given as the answer; a row whose checksum does not match is
    damaged (`IdempotencyStore.get`)."""
    h = hashlib.sha256()
    for part in (key.encode(), fingerprint.encode(), digest.encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(payload)
    return h.hexdigest()


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
        self._closed = False  # (by `close`: the server stopping)
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
        self._check_pages()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with immediate(self._db) as db:
            self._check(read_contents(db))  # again, under the write lock
            db.execute(_SCHEMA)
            if "checksum" not in {row[1] for row in db.execute("PRAGMA table_info(answers)")}:
                db.execute(_CHECKSUM_COLUMN)  # (its rows, NULL, are read unchecked)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._identity = _file_identity(self.path)  # (None for ":memory:")

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

    def _check_pages(self) -> None:
        """DamagedAnswersDatabase when SQLite finds the file's pages damaged (quick_check: a
        page overwritten, a -wal of another file beside it): a read only, before anything is
        written. Only when a -wal holding frames lies beside the file (a crash or a kill left
        it, a backup was restored beside it, or another replica writes the file now): a file
        closed cleanly has none, and the check reads the whole file (seconds per GB from a
        cold disk, at every start of every replica); damage met later is a read failure, the
        request computed afresh."""
        if self.path == ":memory:" or not has_wal(self.path):
            return
        problems = quick_check_findings(self._db, 3)
        if problems:
            raise DamagedAnswersDatabase(
                f"damaged (quick_check: {'; '.join(problems)}): stop every server using it, "
                "move it aside with its -wal and -shm files and start with a new one (the "
                "edges' pending requests are then computed afresh)"
            )

    def get(self, request_id: str) -> StoredAnswer | None:
        """The stored answer for `request_id` in the current scope (`answers_scope`), or None
        (None too once the store is closed: a call still running as the server stops)."""
        key = scoped_key(request_id)
        with self._lock:
            if self._closed:
                return None
            row = self._db.execute(
                "SELECT fingerprint, digest, payload, checksum FROM answers WHERE request_id = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        fingerprint, digest, payload, checksum = row
        if not (isinstance(fingerprint, str) and isinstance(digest, str)):
            raise ValueError(f"the stored answer to {request_id!r} is damaged (not text)")
        if not isinstance(payload, bytes):  # (bytes(N) of an integer would allocate N bytes)
            raise ValueError(f"the stored answer to {request_id!r} is damaged (not a blob)")
        if checksum is not None and checksum != answer_checksum(key, fingerprint, digest, payload):
            raise ValueError(
                f"the stored answer to {request_id!r} is damaged (its checksum does not match)"
            )
        return StoredAnswer(fingerprint, digest, payload)

    def put(self, request_id: str, answer: StoredAnswer) -> bool:
        """Store the answer for `request_id` in the current scope (`answers_scope`), unless one
        is stored already, then evict beyond the capacity; True when it was stored. The first
        answer stored wins: one computed meanwhile for another request under the same id (two
        calls racing, or another model's) never replaces it, so a retry of the first request is
        still answered from the store (a retry of another model's request under that id, which
        the edges never make, is computed again). Once the store is closed (the server
        stopping while a computation still ran) the answer is not kept, and that is no error:
        logged at DEBUG only, not raised."""
        key = scoped_key(request_id)
        with self._lock:
            if self._closed:
                log.debug(
                    "answers store closed (the server is stopping): the answer to %r is not "
                    "kept", request_id,
                    extra={"fields": {"event": "answer_not_kept_closed",
                                      "request_id": request_id}},
                )  # fmt: skip
                return False
            if self._identity is not None and _file_identity(self.path) != self._identity:
                raise AnswersFileGone(
                    f"{self.path} was deleted or replaced while the server ran: answers are "
                    "not stored any more (they would be lost at the next restart); restart the "
                    "server to make it anew"
                )
            return self._insert(key, answer)

    def _insert(self, key: str, answer: StoredAnswer) -> bool:
        """`put`'s insert and eviction, under the lock; False when `key` holds an answer
        already (left as it is)."""
        with immediate(self._db) as db:  # (a full disk's cause is raised on)
            cursor = db.execute(
                "INSERT INTO answers (request_id, fingerprint, digest, payload, created, checksum)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                (key, answer.fingerprint, answer.digest, answer.payload, time.time(),
                 answer_checksum(key, answer.fingerprint, answer.digest, answer.payload)),
            )  # fmt: skip
            if cursor.rowcount < 1:
                return False
            # seq grows by one per insert, so this keeps at most the newest `capacity` rows
            # without counting the table.
            db.execute("DELETE FROM answers WHERE seq <= ?", (cursor.lastrowid - self.capacity,))
        return True

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        """Close the database: later `get`s find nothing and later `put`s keep nothing, quietly
        (the calls a stopping server still runs); `len` fails."""
        with self._lock:
            self._closed = True
            self._db.close()


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None for ":memory:", (0, 0) when it is gone."""
    if path == ":memory:":
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_dev, stat.st_ino)
