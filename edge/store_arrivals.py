"""The edge store's arrivals (no torch): an arrival's row looked up by its file_key, rekeyed,
and its result recorded ("ok", "error", or "pending" with its request in the outbox), with
where its file is kept."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from splitdet.edge.file_identity import path_text
from splitdet.edge.store_connection import StoreConnection, _boot_stamp
from splitdet.edge.store_schema import (
    _JSON_COLUMNS,
    ERROR_KINDS,
    FINAL_VERDICTS,
    warnings_text,
)
from splitdet.edge.store_types import Arrival, KnownFile, OutboxFull, StoredPath


class StoreArrivals(StoreConnection):
    """The arrivals part of `ResultStore`: the rows of the files the hot folder delivered."""

    #: The name of the edge writing the rows (`shared.edge_name`), kept in each new row
    #: (images.edge); None: NULL.
    edge_name: str | None = None

    def known(self, file_key: str) -> KnownFile | None:
        """The row of an arrival already recorded, or None."""
        rows = self._query(
            "SELECT id, path, stored_path, verdict, error_kind, reason, content_hash FROM images"
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

    def supersede(self, image_id: int) -> str:
        """Give a row's `file_key` up to another file that arrived with the very same key (name,
        size, modification time and a reused inode) but other contents: the row keeps its key
        with "|supersededID" appended (unique, and no longer a file's), so that the new file is
        recorded under its own. Returns the key the row now has."""
        with self._transaction() as db:
            (key,) = db.execute("SELECT file_key FROM images WHERE id = ?", (image_id,)).fetchone()
            new = f"{key}|superseded{image_id}"
            db.execute(
                "UPDATE images SET file_key = ?, updated = ? WHERE id = ?",
                (new, time.time(), image_id),
            )
            return new

    def _insert(self, db: sqlite3.Connection, arrival: Arrival, **values: Any) -> int:
        now = time.time()
        row = {
            "file_key": path_text(arrival.file_key),
            "path": path_text(arrival.path),
            "content_hash": arrival.content_hash,
            "size_bytes": arrival.size_bytes,
            "arrived": arrival.arrived,
            "updated": now,
            "edge": self.edge_name,
            **values,
        }
        if row["verdict"] in FINAL_VERDICTS:
            row["finished"] = now
            row["finished_boot"], row["finished_boot_s"] = _boot_stamp()
        if "warnings" in row:  # (the frame warning kinds: comma-separated, NULL for none)
            row["warnings"] = warnings_text(row["warnings"])
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

    def set_stored_path(self, image_id: int, stored_path: str | None) -> str | None:
        """Record where a processed file now goes (its planned name was taken meanwhile; None:
        nowhere, it was replaced before its move), one commit; returns the path as stored."""
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
        warnings: Sequence[str] = (),
    ) -> tuple[int, str | None]:
        """A defect-free image's final result, one commit; `threshold`: the gate threshold
        `p_defect` was judged at; `warnings`: the kinds of what its pixels say of the camera
        (`preprocess.frame_warning`), kept in the row (images.warnings). Returns (row id,
        stored path)."""
        with self._transaction() as db:
            image_id = self._insert(
                db, arrival, verdict="ok", p_defect=p_defect, fingerprint=fingerprint,
                timings=timings, threshold=threshold, warnings=warnings,
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
    ) -> tuple[int, str | None]:
        """A final "error" result (quarantine or outbox full), one commit; its timings and
        threshold unset (a quarantined file was never judged)."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {kind!r}")
        with self._transaction() as db:
            image_id = self._insert(
                db, arrival, verdict="error", error_kind=kind, reason=reason,
                fingerprint=fingerprint, p_defect=p_defect,
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
        warnings: Sequence[str] = (),
    ) -> tuple[int, str | None, str]:
        """A flagged image: its "pending" result and its outbox row in one commit; `threshold`
        and `warnings` as for `record_ok`.

        Returns (row id, stored path, verdict): "pending", or "error" when the outbox is full
        and the policy is "reject" (error_kind "outbox_full", the payload is not kept).

        Raises:
            OutboxFull: the outbox is full and the policy is "wait" (nothing written).
        """
        with self._transaction() as db:
            depth, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM outbox"
            ).fetchone()
            if not self.cap.admits(depth, size, len(payload)):
                if self.cap.policy == "wait":
                    raise OutboxFull(f"outbox holds {depth} requests, {size} bytes")
                reason = (
                    f"outbox full ({depth} requests, {size} bytes; caps {self.cap.max_items} "
                    f"requests, {self.cap.max_bytes} bytes): features dropped"
                )
                image_id = self._insert(
                    db, arrival, verdict="error", error_kind="outbox_full", reason=reason,
                    p_defect=p_defect, fingerprint=fingerprint, timings=timings,
                    request_id=request_id, threshold=threshold, warnings=warnings,
                )  # fmt: skip
                self._count(db, "outbox_full_rejected")
                return image_id, self._set_stored_path(db, image_id, stored_path), "error"
            now = time.time()
            image_id = self._insert(
                db, arrival, verdict="pending", p_defect=p_defect, request_id=request_id,
                fingerprint=fingerprint, timings=timings, bytes_sent=len(payload),
                threshold=threshold, warnings=warnings,
            )  # fmt: skip
            db.execute(
                "INSERT INTO outbox (image_id, request_id, payload, size_bytes, created, next_try)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (image_id, request_id, payload, len(payload), now, now),
            )
            return image_id, self._set_stored_path(db, image_id, stored_path), "pending"
