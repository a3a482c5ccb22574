"""The edge store's dead letters (no torch): a request the cloud refused for good made a
dead letter (its row "error", its request kept within a byte cap), one export's requests made
dead letters, and dead letters requeued into the outbox, each told by its export and cause."""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass, field

from splitdet.edge.file_identity import path_text
from splitdet.edge.store_connection import StoreConnection, _boot_stamp
from splitdet.edge.store_file import read_contents
from splitdet.edge.store_schema import REQUEUED_NOTE
from splitdet.edge.store_types import OutboxStats

#: How the reason of a dead letter `splitdet edge abandon` made begins: a request of a retired
#: export, not one the cloud refused (requeued only when asked for: its image may have been
#: processed again with the current export since).
ABANDONED = "abandoned by `splitdet edge abandon`"

#: A gRPC status code in a dead letter's reason ("... permanently: INVALID_ARGUMENT: ...").
_CODE = re.compile(r"\b([A-Z][A-Z_]*[A-Z]): ")
#: In SQL, true for a dead letter (`FROM images i` and `letter_joins`) whose image was
#: processed again, by the rule `letter_joins` states.
PROCESSED_AGAIN = "f.content_hash IS NOT NULL"


def refused_at(keeps: bool) -> str:
    """In SQL, when the dead letter `i` was refused (unix s): its kept request's dead_at (joined
    as `d` by `letter_joins`), else its row's finished (or updated, in a row without one).
    `keeps`: the store has the table of kept requests (a version 1 store read as it is, by a
    dry run, has none)."""
    return "COALESCE(d.dead_at, i.finished, i.updated)" if keeps else (
        "COALESCE(i.finished, i.updated)")  # fmt: skip


def letter_joins(keeps: bool) -> str:
    """SQL joins for a query over dead letters (`FROM images i`): `d`, its kept request (when
    `keeps`: the store has that table), and `f`, which `PROCESSED_AGAIN` tells found: the one
    rule of whether its image was processed again, for `StoreDeadLetters.requeue` (never
    requeued then) and `StoreMaintenance.prune` (then a final result like any other). Its image
    (the same content hash) has a final result (ok or defect) in a row arrived after the dead
    letter's (a greater id) or judged at or after its refusal (an earlier row requeued and
    answered since keeps its lower id); an earlier twin judged before it does not count: that
    result is not this image's. (Only the images of dead letters are grouped: one pass over the
    final results, however many the store holds.)"""
    refused = refused_at(keeps)
    return (" LEFT JOIN dead_letters d ON d.image_id = i.id" if keeps else "") + (
        " LEFT JOIN (SELECT content_hash, MAX(id) AS last, MAX(finished) AS judged"
        " FROM images WHERE verdict IN ('ok', 'defect') AND content_hash IN"
        " (SELECT content_hash FROM images WHERE verdict = 'error'"
        " AND error_kind = 'dead_letter') GROUP BY content_hash) f"
        f" ON f.content_hash = i.content_hash AND (f.last > i.id OR f.judged >= {refused})"
    )


def dead_letter_cause(reason: str | None) -> str:
    """A dead letter's cause in a word or two, from the reason its row holds: "abandoned"
    (`edge abandon`), "corrupt request" (the outbox row was damaged), "answer refused" (the
    cloud's answer failed the edge's checks), "refused CODE" (the cloud refused it with that
    gRPC code), else "refused". (The reasons are the sender's and abandon's.)"""
    text = reason or ""
    if text.startswith(ABANDONED):
        return "abandoned"
    if text.startswith("dead letter: the outbox holds a corrupt request"):
        return "corrupt request"
    if text.startswith("dead letter: refused the cloud's answer"):
        return "answer refused"
    code = _CODE.search(text)
    return f"refused {code.group(1)}" if code else "refused"


@dataclass
class Requeue:
    """What `StoreDeadLetters.requeue` did (or, in a dry run, would do), by image id.

    Attributes:
        requeued: put back in the outbox.
        no_room: left for want of room in the outbox.
        not_kept: without a kept request (dropped by the byte cap, or refused before requests
            were kept): reprocess their images instead.
        abandoned_left: made by `edge abandon`, left as they are (not asked for).
        processed_again: left as they are, abandoned or not: their image (the same content
            hash) has a final result (ok or defect) in a later row (processed again after it,
            e.g. copied back into the hot folder after an abandon); requeued, each would get a
            second one. An earlier row of the same bytes (judged before) does not count.
        twin_on_its_way: left as they are: another row of their image is pending (awaiting
            its answer, or requeued by this same call, the oldest first); requeued, each would
            get a second result. Once that answer comes they count as processed again.
        letters: (export fingerprint, `dead_letter_cause`) of each of the above.
    """

    requeued: list[int] = field(default_factory=list)
    no_room: list[int] = field(default_factory=list)
    not_kept: list[int] = field(default_factory=list)
    abandoned_left: list[int] = field(default_factory=list)
    processed_again: list[int] = field(default_factory=list)
    twin_on_its_way: list[int] = field(default_factory=list)
    letters: dict[int, tuple[str, str]] = field(default_factory=dict)


class StoreDeadLetters(StoreConnection):
    """The dead letters part of `ResultStore`: requests refused for good, kept to requeue."""

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
        """Drop the oldest kept requests until the dead letters fit their byte cap. A request
        larger than the whole cap goes first, alone: it could never be kept, and the older ones
        are not dropped to make room for it."""
        cap = self.cap.dead_letter_max_bytes
        total = db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM dead_letters").fetchone()[0]
        excess = total - cap
        if excess <= 0:
            return
        for image_id, size in db.execute(
            "SELECT image_id, size_bytes FROM dead_letters"
            " ORDER BY size_bytes <= ?, dead_at, image_id",
            (cap,),
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

    def dead_letter_exports(self) -> dict[str, int]:
        """Dead letters (kept request or not) by the model export that made their request."""
        return dict(self._query(
            "SELECT COALESCE(fingerprint, ''), COUNT(*) FROM images WHERE verdict = 'error'"
            " AND error_kind = 'dead_letter' GROUP BY 1 ORDER BY 2 DESC, 1"
        ))  # fmt: skip

    def requeue_dead_letters(
        self, since: float | None = None, dry_run: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """`requeue`'s (requeued, no room, not kept) image ids: every dead letter refused
        ``since`` but those `edge abandon` made."""
        done = self.requeue(since, dry_run)
        return done.requeued, done.no_room, done.not_kept

    def requeue(
        self,
        since: float | None = None,
        dry_run: bool = False,
        *,
        abandoned: bool = False,
        fingerprint: str | None = None,
    ) -> Requeue:
        """Put refused requests back in the outbox, due now, their rows "pending" again (one
        commit). Only as many as the outbox has room for, oldest first. A dead letter whose
        image (the same content hash) has a final result (ok or defect) since, in a later row
        (a greater id: processed again after it) or judged at or after its refusal (an earlier
        dead letter of it requeued and answered since), is never requeued, abandoned or not
        (`Requeue.processed_again`): it would get a second one. An earlier twin (the same bytes
        judged before it was refused) does not stop it: that result is not this image's. Nor
        is one requeued whose image has another row pending, in the outbox or requeued by this
        same call (`Requeue.twin_on_its_way`): of several dead letters of one image, the oldest
        is sent again, once.

        Args:
            since: only dead letters refused at or after this unix time.
            dry_run: change nothing; say what would happen.
            abandoned: requeue those `edge abandon` made too (left otherwise: an abandon is a
                decision), except those whose images were processed again.
            fingerprint: only dead letters of requests made with this model export.
        """
        since = float("-inf") if since is None else since
        done = Requeue()
        with self._transaction() as db:
            # (a version 1 store read as it is, by a dry run, has no table of kept requests)
            keeps = "dead_letters" in read_contents(db).names
            kept = "d.size_bytes" if keeps else "NULL"
            rows = db.execute(
                f"SELECT i.id, COALESCE(i.fingerprint, ''), i.reason, {kept},"
                f" {PROCESSED_AGAIN}, i.content_hash FROM images i{letter_joins(keeps)}"
                " WHERE i.verdict = 'error' AND i.error_kind = 'dead_letter'"
                f" AND {refused_at(keeps)} >= ?"
                + (" AND i.fingerprint = ?" if fingerprint else "")
                + " ORDER BY i.id",
                (since, fingerprint) if fingerprint else (since,),
            ).fetchall()
            depth, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox"
            ).fetchone()
            on_its_way = {h for (h,) in db.execute(
                "SELECT DISTINCT content_hash FROM images WHERE verdict = 'pending'"
            )}  # fmt: skip
            for image_id, export, reason, payload_bytes, processed_again, image in rows:
                cause = dead_letter_cause(reason)
                done.letters[image_id] = (export, cause)
                if processed_again:
                    done.processed_again.append(image_id)
                elif image in on_its_way:
                    done.twin_on_its_way.append(image_id)
                elif cause == "abandoned" and not abandoned:
                    done.abandoned_left.append(image_id)
                elif payload_bytes is None:
                    done.not_kept.append(image_id)
                elif not self.cap.admits(depth, size, payload_bytes):
                    done.no_room.append(image_id)
                else:
                    depth, size = depth + 1, size + payload_bytes
                    done.requeued.append(image_id)
                    on_its_way.add(image)
                    if not dry_run:
                        self._requeue(db, image_id)
            return done

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
