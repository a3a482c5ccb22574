"""Read-only queries on an open edge store connection, for the commands that read a store
while its daemon writes (status, results, collect) and for `ResultStore` itself (no torch)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence

from splitdet.edge.file_identity import look_at
from splitdet.edge.store_schema import (
    _JSON_COLUMNS,
    ADDED_COLUMNS,
    AUTO_VACUUM_INCREMENTAL,
    CHANGE_COUNTER,
    FRAME_WARNINGS,
    REQUEUED_NOTE,
    RESULT_COLUMNS,
    VERDICTS,
    warning_kinds,
)

#: Rows `iter_results` reads per statement.
RESULTS_BATCH = 1000
#: How far ahead of the clock a stamp must lie for `edge status` to take it as written while the
#: clock ran ahead (then set back): more than the clocks of one host drift apart between writes.
AHEAD_SLACK_S = 60.0


def result_filter(
    since: float | None,
    verdict: str | None,
    by_change: bool = False,
    arrived: tuple[float | None, float | None] = (None, None),
) -> tuple[list[str], list]:
    """SQL conditions on ``images`` (to join with AND) and their parameters: rows whose
    `updated` is at or after ``since`` (unix s: created or changed since, a failed send tried
    again included), of ``verdict``, and that arrived within ``arrived`` (from, until: unix s,
    half-open [from, until), either end open when None: a shift, each row in exactly one),
    each when given. `by_change`: for a read in `changed` order, whose index alone must find
    the rows (the conditions use no other)."""
    clauses, params = [], []
    unindexed = "+" if by_change else ""  # (SQLite's unary +: no index on the column)
    if since is not None:
        clauses.append(f"{unindexed}updated >= ?")
        params.append(since)
    for bound, op in zip(arrived, (">=", "<"), strict=True):
        if bound is not None:
            clauses.append(f"arrived {op} ?")  # (no index on `arrived`)
            params.append(bound)
    if verdict is not None:
        clauses.append(f"{unindexed}verdict = ?")
        params.append(verdict)
    return clauses, params


def iter_results(
    db: sqlite3.Connection,
    lock: threading.RLock | None = None,
    since: float | None = None,
    verdict: str | None = None,
    after_id: int = 0,
    changed_after: int | None = None,
    arrived: tuple[float | None, float | None] = (None, None),
) -> Iterator[dict]:
    """Result rows of an open store connection (see ResultStore.results), in id order; only
    those with an id above `after_id` (ids start at 1 and only grow, in arrival order: a
    cursor no clock step moves, unlike `since`); `since`, `verdict` and `arrived` (from,
    until: unix s, [from, until)) filter as `result_filter` says.

    `changed_after` (not None): only the rows whose last change (`changed`, CHANGE_COLUMNS)
    is numbered above it, in that order, each once in its state as read: a consumer's cursor
    that also lists a row again when it changes (a pending row made final, a requeued dead
    letter). Up to the change counter as read first (`last_change`): a row changed meanwhile
    is left to the next read, numbered above every row listed. None in a store without
    `changed` (an earlier splitdet's, read as it is): no change of it is numbered.

    Read `RESULTS_BATCH` rows at a time, each batch in a statement of its own (under `lock`),
    through the index of its order (a read costs the rows it lists, however many the store
    holds; but `arrived`, which has no index, reads every row: about 0.7 s per million):
    memory stays bounded however many rows the store holds (a year at one image a second is
    ~30 M), and no read stays open while the rows are written out, which would keep
    the daemon's WAL from being checkpointed. Rows written meanwhile with a higher id are read
    too (in id order)."""
    by_change = changed_after is not None
    clauses, params = result_filter(since, verdict, by_change, arrived)
    key, after = "id", max(0, after_id)
    if by_change:
        with lock if lock is not None else contextlib.nullcontext():
            upto = last_change(db)
        if upto is None:
            return
        if after_id > 0:
            clauses.append("id > ?")
            params.append(after_id)
        clauses.append("changed <= ?")
        params.append(upto)
        key, after = "changed", max(0, changed_after)
    position = RESULT_COLUMNS.index(key)
    while True:
        where = " AND ".join([f"{key} > ?", *clauses])
        with lock if lock is not None else contextlib.nullcontext():
            sql = (
                f"SELECT {_result_columns(db)} FROM images WHERE {where}"
                f" ORDER BY {key} LIMIT {RESULTS_BATCH}"
            )
            rows = db.execute(sql, [after, *params]).fetchall()
        for row in rows:
            yield _record(row)
        if len(rows) < RESULTS_BATCH:
            return
        after = rows[-1][position]


def last_change(db: sqlite3.Connection) -> int | None:
    """The number of the store's last change (CHANGE_COUNTER; 0: none yet), which every
    `changed` is at most and a later change exceeds; None when the store has no `changed`
    column (an earlier splitdet's, not yet opened by a writer of this one)."""
    if "changed" not in image_columns(db):
        return None
    row = db.execute("SELECT value FROM counters WHERE name = ?", (CHANGE_COUNTER,)).fetchone()
    return 0 if row is None else int(row[0])


def last_id(db: sqlite3.Connection) -> int:
    """The largest row id the store ever gave (its `sqlite_sequence`: a pruned row's id is not
    given again); 0 when it gave none."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
    return 0 if row is None else int(row[0])


def image_columns(db: sqlite3.Connection) -> set[str]:
    """The columns the store's `images` table has (an earlier splitdet's lacks ADDED_COLUMNS)."""
    return {row[1] for row in db.execute("PRAGMA table_info(images)")}


def _result_columns(db: sqlite3.Connection) -> str:
    """RESULT_COLUMNS as a SELECT list for this store: one an earlier splitdet wrote, read as
    it is (`open_readonly` adds nothing), has NULL for the ADDED_COLUMNS it lacks."""
    lacking = set(ADDED_COLUMNS) - image_columns(db)
    return ", ".join(f"NULL AS {name}" if name in lacking else name for name in RESULT_COLUMNS)


def _record(row: Sequence) -> dict:
    """A row of RESULT_COLUMNS as a dict, its JSON columns decoded."""
    record = dict(zip(RESULT_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        if record[name] is not None:
            record[name] = json.loads(record[name])
    return record


def results_by_id(db: sqlite3.Connection, ids: Sequence[int]) -> list[dict]:
    """The result rows with these ids (as `iter_results` gives them), in id order."""
    found: list[dict] = []
    for start in range(0, len(ids), 500):  # SQLite bounds the parameters of one statement
        chunk = list(ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT {_result_columns(db)} FROM images WHERE id IN ({marks})"
        found += [_record(row) for row in db.execute(sql, chunk)]
    return sorted(found, key=lambda record: record["id"])


def outbox_by_model(db: sqlite3.Connection) -> dict[str, int]:
    """Requests in the outbox of an open store connection, by the model fingerprint they were
    made with."""
    rows = db.execute(
        "SELECT i.fingerprint, COUNT(*) FROM outbox o JOIN images i ON i.id = o.image_id"
        " GROUP BY i.fingerprint"
    )
    return {fingerprint: int(n) for fingerprint, n in rows}


def _last_error(db: sqlite3.Connection, now: float) -> dict:
    """The outbox's latest send error and what happened since, for `_status`.

    The store keeps no time per error: the time is that of the last change of the request's
    row (`updated`: set by the failed attempt that recorded it, `retry_later`, or a requeue).
    The latest is that of the row changed last. A refused model export (`hold_export`) puts
    its error on every request of that export, but only the one tried gets a new `updated`;
    once that one is delivered, another request of its export, changed earlier, has the latest
    error, so its age may overstate the error's; a delivery of its export after it then says
    it is past either way.

    Returns:
        {"text" (None: no request has an error), "age_s" (seconds since the row that has it
        changed), "delivered_since_age_s" (seconds since the last request of the error's
        export was delivered, when one was after the error; None: none was, the error is
        current), "sender_waits_until" (unix s: the failed attempt's next try, when nothing
        was delivered since: the sender pauses every request until then after a failed send;
        None otherwise, or when that time is past, or when the failed attempt is stamped
        more than AHEAD_SLACK_S ahead of `now`), "ahead_until" (unix s: that next try, when the
        failed attempt is stamped so far ahead: the clock was set back since, and the sender's
        pause, timed by a clock no step moves, is not the stamp's; None otherwise)}
    """
    row = db.execute(
        "SELECT o.last_error, i.updated, o.next_try, i.fingerprint FROM outbox o"
        " JOIN images i ON i.id = o.image_id WHERE o.last_error IS NOT NULL"
        " AND o.last_error <> ?"  # (a requeue's note, newer than the errors: no send failed)
        " ORDER BY i.updated DESC, o.next_try DESC, o.image_id DESC LIMIT 1",
        (REQUEUED_NOTE,),
    ).fetchone()
    if row is None:
        keys = ("text", "age_s", "delivered_since_age_s", "sender_waits_until", "ahead_until")
        return dict.fromkeys(keys)
    text, at, retry_at, fingerprint = row
    same, any_export = db.execute(  # answers stored since the error (`complete`)
        "SELECT MAX(CASE WHEN fingerprint = ? THEN finished END), MAX(finished) FROM images"
        " WHERE updated >= ? AND finished > ? AND verdict = 'defect'",
        (fingerprint, at, at),
    ).fetchone()
    waits = any_export is None and retry_at > now
    ahead = at > now + AHEAD_SLACK_S  # (written before the clock was set back)
    return {
        "text": text,
        "age_s": max(0.0, now - at),
        "delivered_since_age_s": None if same is None else max(0.0, now - same),
        "sender_waits_until": retry_at if waits and not ahead else None,
        "ahead_until": retry_at if waits and ahead else None,
    }


#: The columns of the daemon record (`store_schema.DAEMON_TABLE`), as `daemon_record` names them.
DAEMON_COLUMNS = ("pid", "started", "fingerprint", "max_items", "max_bytes", "full_since")


def daemon_record(db: sqlite3.Connection) -> dict | None:
    """The last `splitdet edge run`'s account of itself (DAEMON_COLUMNS: its pid, start, export,
    outbox caps, since when its intake waits for a full outbox), whether or not it still runs
    (`lock_holder.writer_state` tells); None in a store no daemon of this splitdet has run on."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'daemon'").fetchone():
        return None
    row = db.execute(f"SELECT {', '.join(DAEMON_COLUMNS)} FROM daemon WHERE id = 1").fetchone()
    return None if row is None else dict(zip(DAEMON_COLUMNS, row, strict=True))


#: Result rows `edge status` looks at, newest first, for processed images whose file still
#: lies in --watch (`in_watch`): one stat each (of a missing file, mostly), 20 000 taking well
#: under a second on a local disk; older rows are counted as not looked at.
IN_WATCH_ROWS = 20_000


def store_status(
    db: sqlite3.Connection,
    now: float | None = None,
    in_watch_rows: int = IN_WATCH_ROWS,
    arrived: tuple[float | None, float | None] = (None, None),
) -> dict:
    """`_status` read in one transaction: one snapshot of the database (a daemon writing
    meanwhile never makes its counts disagree); then "in_watch" (`in_watch`), its files
    stat'ed after the snapshot is let go. `arrived` (from, until: unix s, [from, until), either
    open when None) windows what is about images (WINDOWED); the rest is the whole store's."""
    now = time.time() if now is None else now
    db.execute("BEGIN")
    try:
        summary = _status(db, now, arrived)
        leaving = _leaving_rows(db, in_watch_rows)
    finally:
        db.execute("ROLLBACK")  # (read only)
    rows = summary["store"]["images"]
    summary["in_watch"] = in_watch(leaving, now, min(in_watch_rows, rows), rows)
    return summary


def _leaving_rows(db: sqlite3.Connection, newest: int) -> list[tuple]:
    """(id, path, file_key, arrived) of those of the `newest` rows whose file should leave
    --watch (archived, quarantined or deleted: a stored path other than where it arrived)."""
    return db.execute(
        "SELECT id, path, file_key, arrived FROM (SELECT id, path, stored_path, file_key,"
        " arrived FROM images ORDER BY id DESC LIMIT ?) WHERE stored_path IS NOT path"
        " ORDER BY id",
        (newest,),
    ).fetchall()


def in_watch(leaving: Sequence[tuple], now: float, looked: int, rows: int) -> dict:
    """The recorded images whose file still lies where it arrived although their row says it
    leaves --watch (`_leaving_rows`): their archive, quarantine or delete is not done. A move
    that failed (a full or read-only archive, a share gone: the daemon's `cannot move file`
    lines say why, and it tries again), or one a crash cut short (finished at the next start).
    The store records no "moved": each row's file is stat'ed (`look_at`: the very file
    recorded, not another written since under its name), for the newest `looked` of `rows`.
    Only a file missing (ENOENT, ENOTDIR) counts as gone: a path that cannot be looked at
    otherwise (EACCES for a user who may read --db but not --watch, EIO) is counted in
    "rows_unreadable", neither waiting nor gone.

    Returns:
        {"images" (how many), "oldest_age_s" (since the oldest of them arrived; None: none),
        "oldest_path", "rows_checked" (`looked`), "rows_not_checked" (older rows, not looked
        at), "rows_unreadable" (of those looked at, rows whose path could not be stat'ed: not
        known whether their file waits), "unreadable_path" and "unreadable_error" (the first
        such path and why; None when there is none)}
    """
    waiting, unreadable = [], []
    for _, path, key, arrived in leaving:
        there, why = look_at(path, key)
        if there is None:
            unreadable.append((path, why))
        elif there:
            waiting.append((path, arrived))
    oldest = min(waiting, key=lambda row: row[1]) if waiting else None
    return {
        "images": len(waiting),
        "oldest_age_s": None if oldest is None else max(0.0, now - oldest[1]),
        "oldest_path": None if oldest is None else oldest[0],
        "rows_checked": looked,
        "rows_not_checked": max(0, rows - looked),
        "rows_unreadable": len(unreadable),
        "unreadable_path": unreadable[0][0] if unreadable else None,
        "unreadable_error": unreadable[0][1] if unreadable else None,
    }


#: The keys of `store_status` an arrival window restricts (about the images that arrived in
#: it); NOT_WINDOWED, the others, are the whole store's whatever the window.
WINDOWED = ("verdicts", "errors", "warnings", "last_arrival", "last_finished", "results_by_model")
NOT_WINDOWED = (
    "schema_version", "store", "daemon", "outbox", "dead_letters", "counters", "file",
    "stamped_ahead", "in_watch",
)  # fmt: skip


def _status(
    db: sqlite3.Connection,
    now: float | None = None,
    arrived: tuple[float | None, float | None] = (None, None),
) -> dict:
    """A summary of an open store connection (read-only is enough): what an engineer at the
    camera asks first. Times are unix s; ages are seconds before `now`. `arrived` (from,
    until: unix s, half-open, either open when None; `result_filter`) restricts the WINDOWED
    keys to the images that arrived in it (a shift); the others are the whole store's.

    Returns:
        {"schema_version", "window" {"arrived_from", "arrived_until" (`arrived`; null: open),
        "windowed" (WINDOWED), "not_windowed" (NOT_WINDOWED)}, "store" {"images",
        "last_arrival"} (the whole store's, whatever the window: whether the line still
        sends images), "verdicts" {verdict: n}, "errors" {error_kind: n}, "warnings"
        {kind: n} (`_warning_counts`),
        "last_arrival", "last_finished", "results_by_model" {fingerprint: {"results",
        "last_arrival", "thresholds" [{"threshold", "results"}] (the gate thresholds its results
        were judged at, rising; rows without one, never judged or from an earlier splitdet, are
        the rest of "results")}, the latest result's first}, "outbox" {"requests", "bytes",
        "oldest_age_s", "next_try_in_s" (when the earliest request is due, by its stamp),
        "sender_waits_s" (None, or how long the sender still pauses after a failed send, with
        nothing delivered since: no request is tried before), "next_try_ahead_s" (None, or,
        when the earliest request or the last failed send was written more than
        AHEAD_SLACK_S ahead of `now`, how far its next try lies ahead: the clock was set back
        since, and the sender, which makes a next try beyond its --retry-max due, does not
        wait that long), "by_model" {fingerprint: n},
        "last_error" (the latest send error a request in the outbox has), "last_error_age_s"
        (how long ago: `_last_error`), "delivered_since_error_age_s" (None: no request of the
        error's export was delivered after it, the error is current; else how long ago the
        last one was)}, "dead_letters" {"kept", "kept_bytes", "not_kept"}, "counters"
        {name: n}, "file" {"bytes" (its pages, the WAL aside), "free_bytes" (free pages),
        "gives_back" (incremental auto-vacuum: free pages go back to the file system,
        `ResultStore.reclaim`)}, "stamped_ahead" (`_stamped_ahead`) {"results", "furthest_s"}}
    """
    now = time.time() if now is None else now

    def one(sql: str, params: Sequence = ()) -> tuple:
        return db.execute(sql, params).fetchone()

    clauses, window = result_filter(None, None, arrived=arrived)

    def where(*conditions: str) -> str:  # (the window's conditions with `conditions`)
        joined = " AND ".join([*conditions, *clauses])
        return f" WHERE {joined}" if joined else ""

    version, page = one("PRAGMA user_version")[0], one("PRAGMA page_size")[0]
    rows, store_arrival, store_finished = one(  # the whole store's: the one pass as before
        "SELECT COUNT(*), MAX(arrived), MAX(finished) FROM images"
    )
    verdicts = dict.fromkeys(VERDICTS, 0)
    if clauses:
        last_arrival, last_finished = _windowed_verdicts(db, where(), window, verdicts)
    else:  # (through images_verdict alone)
        verdicts.update(db.execute("SELECT verdict, COUNT(*) FROM images GROUP BY verdict"))
        last_arrival, last_finished = store_arrival, store_finished
    is_error = "verdict = 'error'"
    errors = dict(db.execute(
        f"SELECT error_kind, COUNT(*) FROM images{where(is_error)} GROUP BY error_kind", window
    ))  # fmt: skip
    dead_rows = (  # the whole store's (through images_verdict: error rows only)
        one(f"SELECT COUNT(*) FROM images WHERE {is_error} AND error_kind = 'dead_letter'")[0]
        if clauses else errors.get("dead_letter", 0)
    )  # fmt: skip
    warnings = _warning_counts(db, clauses, window)
    stamped_ahead = _stamped_ahead(db, now, store_finished)
    by_export = db.execute(  # the export of the latest result first
        f"SELECT fingerprint, COUNT(*), MAX(arrived) FROM images{where()} GROUP BY fingerprint"
        " ORDER BY MAX(id) DESC", window,
    ).fetchall()  # fmt: skip
    judged: dict[str, list[dict]] = {fingerprint: [] for fingerprint, _, _ in by_export}
    if "threshold" in image_columns(db):
        for fingerprint, threshold, n in db.execute(
            f"SELECT fingerprint, threshold, COUNT(*) FROM images{where('threshold IS NOT NULL')}"
            " GROUP BY fingerprint, threshold ORDER BY fingerprint, threshold", window,
        ):  # fmt: skip
            judged[fingerprint].append({"threshold": threshold, "results": n})
    depth, size, oldest, next_try = one(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0), MIN(created), MIN(next_try) FROM outbox"
    )
    error = _last_error(db, now)
    waits_until = error["sender_waits_until"]  # (the requests due meanwhile wait with it)
    ahead_until = [error["ahead_until"]] if error["ahead_until"] is not None else []
    earliest = db.execute(  # (the outbox_next_try index)
        "SELECT o.next_try, i.updated FROM outbox o JOIN images i ON i.id = o.image_id"
        " ORDER BY o.next_try, o.image_id LIMIT 1"
    ).fetchone()
    if earliest is not None and earliest[1] > now + AHEAD_SLACK_S and earliest[0] > now:
        ahead_until.append(earliest[0])  # (a request written before the clock was set back)
    by_model = outbox_by_model(db)
    counters = dict(db.execute(  # (of events: the change counter is none)
        "SELECT name, value FROM counters WHERE name <> ? ORDER BY name", (CHANGE_COUNTER,)
    ))  # fmt: skip
    kept, kept_bytes = (0, 0) if version < 2 else one(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM dead_letters")  # fmt: skip
    return {
        "schema_version": version,
        "window": {
            "arrived_from": arrived[0],
            "arrived_until": arrived[1],
            "windowed": list(WINDOWED),
            "not_windowed": list(NOT_WINDOWED),
        },
        "store": {"images": rows, "last_arrival": store_arrival},
        "verdicts": verdicts,
        "errors": errors,
        "warnings": warnings,
        "last_arrival": last_arrival,
        "last_finished": last_finished,
        "results_by_model": {
            fingerprint: {"results": n, "last_arrival": last, "thresholds": judged[fingerprint]}
            for fingerprint, n, last in by_export
        },
        "outbox": {
            "requests": depth,
            "bytes": size,
            "oldest_age_s": None if oldest is None else max(0.0, now - oldest),
            "next_try_in_s": None if next_try is None else max(0.0, next_try - now),
            "by_model": by_model,
            "sender_waits_s": None if waits_until is None else waits_until - now,
            "next_try_ahead_s": max(ahead_until) - now if ahead_until else None,
            "last_error": error["text"],
            "last_error_age_s": error["age_s"],
            "delivered_since_error_age_s": error["delivered_since_age_s"],
        },
        "dead_letters": {
            "kept": kept,
            "kept_bytes": kept_bytes,
            "not_kept": dead_rows - kept,
        },
        "counters": counters,
        "file": {  # what of the file's size is free pages, and whether it gives them back
            "bytes": one("PRAGMA page_count")[0] * page,
            "free_bytes": one("PRAGMA freelist_count")[0] * page,
            "gives_back": one("PRAGMA auto_vacuum")[0] == AUTO_VACUUM_INCREMENTAL,
        },
        "stamped_ahead": stamped_ahead,
    }


def _windowed_verdicts(
    db: sqlite3.Connection, where: str, params: Sequence, verdicts: dict[str, int]
) -> tuple[float | None, float | None]:
    """Count the rows `where` (an arrival window's WHERE clause, with its `params`) keeps into
    `verdicts` by verdict, and return their latest (arrived, finished): one pass over the
    table. `+verdict` keeps SQLite from grouping through images_verdict, whose order would
    fetch every row of the store by its id to test its `arrived` (no index on it): twice the
    time of the pass from the page cache, a random read per row from a disk."""
    last_arrival = last_finished = None
    sql = (
        f"SELECT verdict, COUNT(*), MAX(arrived), MAX(finished) FROM images{where}"
        " GROUP BY +verdict"
    )
    for verdict, n, arrived, finished in db.execute(sql, params):
        verdicts[verdict] = n
        last_arrival = _later(last_arrival, arrived)
        last_finished = _later(last_finished, finished)
    return last_arrival, last_finished


def _later(a: float | None, b: float | None) -> float | None:
    """The later of two times, either None when unknown."""
    return b if a is None else a if b is None else max(a, b)


def _warning_counts(
    db: sqlite3.Connection, clauses: Sequence[str] = (), params: Sequence = ()
) -> dict[str, int]:
    """How many result rows arrived with each frame warning kind (images.warnings:
    blank_frame, dim_wide_frame), of those `clauses` (SQL conditions with their `params`:
    `result_filter`'s) keep, for `_status`; every kind of FRAME_WARNINGS there, 0 when
    none (also in a store without the column: an earlier splitdet's)."""
    counts = dict.fromkeys(FRAME_WARNINGS, 0)
    if "warnings" not in image_columns(db):
        return counts
    where = " AND ".join(["warnings IS NOT NULL", *clauses])
    sql = f"SELECT warnings, COUNT(*) FROM images WHERE {where} GROUP BY warnings"
    for text, n in db.execute(sql, params):
        for kind in warning_kinds(text):
            counts[kind] = counts.get(kind, 0) + n
    return counts


def _stamped_ahead(db: sqlite3.Connection, now: float, last_finished: float | None) -> dict:
    """The result rows finished or changed more than AHEAD_SLACK_S after `now` (written while
    the clock ran ahead, then set back), for `_status`: {"results" (how many), "furthest_s"
    (how far the furthest stamp lies ahead; None: none)}. Counted through the index on
    `updated` (a change stamps it with the final verdict); the rows of a store whose latest
    `finished` (`last_finished`) lies ahead are counted in a pass of their own, since a change
    after the clock was set back (a rekey) stamps `updated` anew and leaves `finished`."""
    ahead_of = now + AHEAD_SLACK_S
    sql = "SELECT COUNT(*), MAX(updated) FROM images WHERE updated > ?"  # (images_updated)
    n, furthest = db.execute(sql, (ahead_of,)).fetchone()
    if last_finished is not None and last_finished > ahead_of:  # (only then: a whole pass)
        sql = "SELECT COUNT(*) FROM images WHERE updated > ? OR finished > ?"
        n = db.execute(sql, (ahead_of, ahead_of)).fetchone()[0]
        furthest = max(last_finished, furthest or last_finished)
    return {"results": n, "furthest_s": None if furthest is None else furthest - now}
