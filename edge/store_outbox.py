"""The edge store's outbox (no torch): the requests waiting for the cloud, the next one due,
the cloud's answer (result "defect" and the request deleted, one commit), a retry later, an
export's requests held and released, and what the outbox holds."""

from __future__ import annotations

import json
import time

from splitdet.edge.file_identity import path_text
from splitdet.edge.store_connection import StoreConnection, _boot_stamp
from splitdet.edge.store_reads import outbox_by_model
from splitdet.edge.store_types import Answer, OutboxItem, OutboxStats

#: The outbox rows of the requests made with one model export (the parameter: its fingerprint).
_OF_EXPORT = (
    "image_id IN (SELECT o.image_id FROM outbox o JOIN images i ON i.id = o.image_id"
    " WHERE i.fingerprint = ?)"
)


class StoreOutbox(StoreConnection):
    """The outbox part of `ResultStore`: the sender's side of the store."""

    def outbox_has_room(self, payload_bytes: int = 0) -> bool:
        """Whether one more request of `payload_bytes` bytes fits the outbox's cap."""
        stats = self.outbox_stats()
        return self.cap.admits(stats.depth, stats.bytes, payload_bytes)

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
            " i.path, i.fingerprint, i.content_hash, i.p_defect"
            " FROM outbox o JOIN images i ON i.id = o.image_id"
            " WHERE o.next_try <= ? ORDER BY o.next_try, o.image_id LIMIT 1",
            (now,),
        )
        if not rows:
            return None
        (image_id, request_id, payload, created, attempts, stored_path, path, fingerprint,
         digest, p_defect) = rows[0]  # fmt: skip
        return OutboxItem(
            image_id, request_id, bytes(payload), created, attempts, stored_path, path,
            fingerprint, digest, p_defect,
        )  # fmt: skip

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
                f" last_error = COALESCE(?, last_error) WHERE {_OF_EXPORT}",
                (until, None if error is None else path_text(error), fingerprint),
            )
            return cursor.rowcount

    def release_export(self, fingerprint: str, now: float | None = None) -> int:
        """Make due at `now` (unix s; default: the clock) every outbox request of one model
        export held for later (next_try > now), e.g. once the cloud serves that export again:
        the end of a `hold_export`. The other exports' requests, attempts and last errors are
        left as they are. Returns how many requests were released. Looked for before writing:
        nothing held takes no write lock."""
        now = time.time() if now is None else now
        where = f"next_try > ? AND {_OF_EXPORT}"
        if not self._query(f"SELECT 1 FROM outbox WHERE {where} LIMIT 1", (now, fingerprint)):
            return 0
        with self._transaction() as db:
            sql = f"UPDATE outbox SET next_try = ? WHERE {where}"
            return db.execute(sql, (now, now, fingerprint)).rowcount

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
