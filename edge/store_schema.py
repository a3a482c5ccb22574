"""The edge store's schema: its SQL, version, application_id and the values its columns take
(no torch). `ResultStore` (edge/store.py) creates and migrates it; edge/store_file.py recognises
a store by it."""

from __future__ import annotations

from collections.abc import Sequence

#: Bump on every schema change; a store written by a newer version is refused, an older one
#: is migrated (_MIGRATIONS).
SCHEMA_VERSION = 2
#: `PRAGMA application_id` of an edge store: b"SPDE" (splitdet edge), set when a store is
#: created or opened for writing. One written before splitdet set it has 0.
APPLICATION_ID = 0x53504445
#: The cloud's answers database's (cloud/idempotency.py's APPLICATION_ID; not imported: the
#: edge does not depend on the cloud), named when one is given as --db by mistake.
ANSWERS_APPLICATION_ID = 0x53504341
#: A store's tables at each schema version (SQLite's own, sqlite_*, aside): how a store written
#: before APPLICATION_ID was set is recognised.
_TABLES = {
    1: frozenset({"images", "outbox", "counters"}),
    2: frozenset({"images", "outbox", "counters", "dead_letters"}),
}
VERDICTS = ("ok", "defect", "pending", "error")
FINAL_VERDICTS = ("ok", "defect", "error")
#: Why a row has verdict "error".
ERROR_KINDS = ("quarantine", "dead_letter", "outbox_full")
#: `preprocess.frame_warning`'s kinds (the edge daemon's WARNING events, the `kind` of
#: splitdet_edge_image_warnings_total, and what images.warnings holds): a blank frame, and a
#: 16-bit one of far fewer bits.
BLANK_FRAME, DIM_WIDE_FRAME = "blank_frame", "dim_wide_frame"
FRAME_WARNINGS = (BLANK_FRAME, DIM_WIDE_FRAME)
#: What happens to a flagged image when the outbox is at its cap.
FULL_POLICIES = ("wait", "reject")

_DEAD_LETTERS = """
CREATE TABLE dead_letters (
    image_id   INTEGER PRIMARY KEY REFERENCES images (id),
    request_id TEXT NOT NULL,
    payload    BLOB NOT NULL,           -- the refused request, kept for requeue_dead_letters
    size_bytes INTEGER NOT NULL,
    created    REAL NOT NULL,           -- when it entered the outbox
    dead_at    REAL NOT NULL            -- unix s of the refusal
);
"""
#: Statements that bring a store of version N to N + 1.
_MIGRATIONS = {1: _DEAD_LETTERS}
#: images.threshold: the gate threshold the row's p_defect was judged at (the export's
#: calibrated one, or the edge's --threshold override); NULL for a file never judged (e.g.
#: unreadable) and in rows an earlier splitdet wrote. An added column, not a new version: a
#: store that has it stays one the earlier splitdet reads and writes (its rows get NULL), so
#: an edge can go back to it. A writer adds it where it is missing; readers of a store without
#: it see NULL (`ADDED_COLUMNS`).
_THRESHOLD = "ALTER TABLE images ADD COLUMN threshold REAL"
#: `PRAGMA auto_vacuum` of a store that gives its free pages back to the file system
#: (INCREMENTAL: every store made since `ResultStore.reclaim`; earlier ones have 0, NONE).
AUTO_VACUUM_INCREMENTAL = 2
#: images.finished_boot, finished_boot_s: the boot (`edge.boot_clock`) in which the final
#: verdict was written and its seconds since boot then; NULL off Linux, for rows not final and
#: in rows an earlier splitdet wrote. A prune deletes a row of the running boot only when the
#: boot clock, which no clock step moves, agrees it is old (`ResultStore.prune`). Added
#: columns, as `threshold`: an earlier splitdet ignores them.
_FINISHED_BOOT = "ALTER TABLE images ADD COLUMN finished_boot TEXT"
_FINISHED_BOOT_S = "ALTER TABLE images ADD COLUMN finished_boot_s REAL"
#: images.changed: the store-wide number of the row's last change a consumer reads (its
#: insert, then every update of CHANGE_COLUMNS), from the counter CHANGE_COUNTER: `edge results
#: --changed-after SEQ` lists the rows changed after SEQ, a requeued dead letter's new verdict
#: among them (below an --after-id cursor, it was missed). Set by the triggers of
#: CHANGE_TRACKING, which live in the file: an earlier splitdet's writes to the store are
#: numbered too. An added column, as `threshold`: an earlier splitdet still reads and writes
#: the store; the rows a store had before it are numbered by their id when a writer of this
#: splitdet adds it (`ResultStore._migrate`), and readers of a store without it see NULL.
_CHANGED = "ALTER TABLE images ADD COLUMN changed INTEGER"
#: images.warnings: what the image's pixels say of the camera, as the row arrived with its
#: verdict: the kinds of `preprocess.frame_warning` (blank_frame, dim_wide_frame), comma-separated
#: (`warnings_text`); NULL when there is none, for a file never judged and in rows an earlier
#: splitdet wrote. The verdict stays the model's. Written with the row, never changed after it:
#: not one of CHANGE_COLUMNS. An added column, as `threshold`: an earlier splitdet ignores it.
_WARNINGS = "ALTER TABLE images ADD COLUMN warnings TEXT"
#: images.edge: the name of the edge that wrote the row: the `splitdet edge run --name` in
#: force then (default: the host name), the name it sends the cloud with every call
#: (`shared.edge_name`), so that the results of several edges, whose ids collide (each store
#: numbers its own rows), can be merged and told apart. NULL in rows an earlier splitdet wrote
#: and in those of a daemon given no name (a `DaemonConfig` without a client: it sends none).
#: Written with the row, never changed after it (a requeue or the cloud's answer keeps it): not
#: one of CHANGE_COLUMNS. An added column, as `threshold`: an earlier splitdet ignores it.
_EDGE = "ALTER TABLE images ADD COLUMN edge TEXT"
#: Columns of `images` added after SCHEMA_VERSION's tables, with the statement adding each.
ADDED_COLUMNS = {
    "threshold": _THRESHOLD,
    "finished_boot": _FINISHED_BOOT,
    "finished_boot_s": _FINISHED_BOOT_S,
    "changed": _CHANGED,
    "warnings": _WARNINGS,
    "edge": _EDGE,
}
#: The `counters` row holding the last number given to a change (images.changed); no row: none
#: was given yet (0). Not an event count: `ResultStore.counters` and `edge status` leave it out.
CHANGE_COUNTER = "change_seq"
#: The columns of `images` whose update gives the row a new change number: those `edge results`
#: reports that a write changes (the verdict and the answer, where the file is, why an error).
#: Not `updated`, `attempts` or `file_key`: a failed send, tried again, is no new result.
CHANGE_COLUMNS = (
    "path",
    "stored_path",
    "finished",
    "verdict",
    "p_defect",
    "boxes",
    "scores",
    "labels",
    "class_names",
    "error_kind",
    "reason",
)


def _change_trigger(name: str, event: str, when: str = "") -> str:
    """A trigger numbering the row `event` wrote: the change counter up by one, its value the
    row's `changed`. Its own UPDATE sets only `changed`, which fires no trigger (nor would
    it with recursive_triggers: no trigger is on `changed`)."""
    return (
        f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON images{when}\nBEGIN\n"
        f"    INSERT INTO counters (name, value) VALUES ('{CHANGE_COUNTER}', 1)\n"
        "        ON CONFLICT (name) DO UPDATE SET value = value + 1;\n"
        "    UPDATE images SET changed =\n"
        f"        (SELECT value FROM counters WHERE name = '{CHANGE_COUNTER}') WHERE id = NEW.id;\n"
        "END"
    )


#: The index and triggers of images.changed, each one statement (a trigger's body holds ";":
#: not split as _SCHEMA is), made where missing by every writer (`ResultStore._migrate`). An
#: update that sets a column of CHANGE_COLUMNS to the value it has is no change.
CHANGE_TRACKING = (
    "CREATE INDEX IF NOT EXISTS images_changed ON images (changed)",
    _change_trigger("images_changed_insert", "INSERT"),
    _change_trigger(
        "images_changed_update",
        f"UPDATE OF {', '.join(CHANGE_COLUMNS)}",
        "\n    WHEN " + "\n      OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in CHANGE_COLUMNS),
    ),
)

#: The running `splitdet edge run`'s account of itself (one row, rewritten at each start:
#: `ResultStore.record_daemon`): its pid, the model export it sends with, its outbox caps and,
#: while its intake waits for room in the outbox (policy "wait"), since when. `edge status`
#: and `edge abandon` read it for the daemon whose writer lock is held. An added table, as the
#: added columns: the daemon makes it where it is missing; an earlier splitdet ignores it.
DAEMON_TABLE = """
CREATE TABLE IF NOT EXISTS daemon (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    pid         INTEGER NOT NULL,
    started     REAL NOT NULL,          -- unix s
    fingerprint TEXT NOT NULL,          -- the model export it runs
    max_items   INTEGER NOT NULL,       -- its --outbox-max-items
    max_bytes   INTEGER NOT NULL,       -- its --outbox-max-mb, in bytes
    full_since  REAL                    -- unix s its intake stopped for a full outbox; NULL: not
)"""

_SCHEMA = f"""
CREATE TABLE images (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    file_key     TEXT NOT NULL UNIQUE,  -- name|size|mtime_ns|inode as found: one arrival
    path         TEXT NOT NULL,         -- where the file arrived
    stored_path  TEXT,                  -- where it is after processing (NULL: deleted)
    content_hash TEXT NOT NULL,         -- SHA-256 of the file's bytes
    size_bytes   INTEGER NOT NULL,
    arrived      REAL NOT NULL,         -- unix s: the file was complete
    finished     REAL,                  -- unix s: the final verdict was written
    updated      REAL NOT NULL,         -- unix s: last change of this row
    verdict      TEXT NOT NULL CHECK (verdict IN {VERDICTS}),
    p_defect     REAL,
    request_id   TEXT,                  -- idempotency key of the cloud request (flagged only)
    fingerprint  TEXT NOT NULL,         -- model fingerprint the edge ran
    boxes        TEXT,                  -- JSON [[x1, y1, x2, y2], ...] in original-image px
    scores       TEXT,                  -- JSON [score, ...]
    labels       TEXT,                  -- JSON [label, ...] (1-based)
    class_names  TEXT,                  -- JSON [name, ...]
    timings      TEXT NOT NULL DEFAULT '{{}}',  -- JSON stage -> seconds (edge and cloud)
    bytes_sent   INTEGER NOT NULL DEFAULT 0,  -- size of the encoded request (flagged only)
    attempts     INTEGER NOT NULL DEFAULT 0,  -- delivery attempts so far
    error_kind   TEXT CHECK (error_kind IS NULL OR error_kind IN {ERROR_KINDS}),
    reason       TEXT                   -- why: quarantine, dead letter or outbox-full reason
);
CREATE INDEX images_updated ON images (updated);
CREATE INDEX images_verdict ON images (verdict);
CREATE TABLE outbox (
    image_id   INTEGER PRIMARY KEY REFERENCES images (id),
    request_id TEXT NOT NULL,
    payload    BLOB NOT NULL,           -- serialized splitdet.v1.DetectRequest
    size_bytes INTEGER NOT NULL,
    created    REAL NOT NULL,
    next_try   REAL NOT NULL,           -- unix s: not sent again before this
    last_error TEXT
);
CREATE INDEX outbox_next_try ON outbox (next_try, image_id);
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,             -- e.g. outbox_full_rejected
    value INTEGER NOT NULL
);
{_DEAD_LETTERS};
{_THRESHOLD};
{_FINISHED_BOOT};
{_FINISHED_BOOT_S};
{_CHANGED};
{_WARNINGS};
{_EDGE}"""

#: Columns `results` reports, in order (JSON columns decoded).
RESULT_COLUMNS = (
    "id",
    "path",
    "stored_path",
    "content_hash",
    "size_bytes",
    "arrived",
    "finished",
    "updated",
    "verdict",
    "p_defect",
    "request_id",
    "fingerprint",
    "boxes",
    "scores",
    "labels",
    "class_names",
    "timings",
    "bytes_sent",
    "attempts",
    "error_kind",
    "reason",
    # (added columns last: CSV readers by position keep the earlier columns' places)
    "threshold",
    "changed",
    "warnings",
    "edge",
)
_JSON_COLUMNS = ("boxes", "scores", "labels", "class_names", "timings")


def warnings_text(kinds: Sequence[str]) -> str | None:
    """images.warnings for a row arriving with these frame warning kinds: comma-separated,
    None (NULL) when there are none."""
    return ",".join(kinds) or None


def warning_kinds(text: str | None) -> list[str]:
    """The kinds in images.warnings as `warnings_text` wrote them ([] for NULL)."""
    return text.split(",") if text else []


#: The outbox's last_error of a request `edge requeue` put back (no send of it failed yet).
REQUEUED_NOTE = "requeued after a dead letter"


def _columns_of_schema() -> dict[str, frozenset[str]]:
    """The columns of each table `_SCHEMA` makes, the added ones (`ADDED_COLUMNS`, which a
    writer adds where missing) aside: read from an in-memory database made by it."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        tables = [
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            table: frozenset(row[1] for row in db.execute(f"PRAGMA table_info({table})"))
            - set(ADDED_COLUMNS)
            for table in tables
            if not table.startswith("sqlite_")
        }
    finally:
        db.close()


#: The columns every store has in each table of `_TABLES` (those `ADDED_COLUMNS` names
#: aside: a writer adds them where missing, and readers see NULL): a store lacking one (a
#: hand-altered copy) is refused by name when it is opened, not at the first write or read
#: that names the column.
REQUIRED_COLUMNS: dict[str, frozenset[str]] = _columns_of_schema()
