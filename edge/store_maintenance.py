"""The edge store's upkeep (no torch): pruning old final results (never one whose file still
lies where it arrived, nor one only the wall clock calls old, nor a dead letter unless asked)
and giving free pages back to the file system."""

from __future__ import annotations

import time
from collections.abc import Callable

from splitdet.edge.boot_clock import BootClock, boot_clock
from splitdet.edge.file_identity import lies_there
from splitdet.edge.store_connection import StoreConnection
from splitdet.edge.store_reads import image_columns
from splitdet.edge.store_schema import AUTO_VACUUM_INCREMENTAL, FINAL_VERDICTS
from splitdet.edge.store_types import Pruned

#: Free pages `ResultStore.reclaim` gives back per write (1 MB of 4 KiB pages; a step that moves
#: pages took up to ~0.3 s at 1024 on this machine), and the pause after each, in which a writer
#: waiting for the store's lock (not a fair one) takes it: a reclaim of 1 GB delays an image's
#: result by about one step, instead of by seconds.
RECLAIM_PAGES = 256
#: The verdicts prune may delete (never "pending"), as an SQL list: "('ok', 'defect', 'error')".
FINAL = f"({', '.join(repr(verdict) for verdict in FINAL_VERDICTS)})"
RECLAIM_PAUSE_S = 0.005
#: A dead letter, in SQL: a flagged image whose request the cloud never judged (refused for
#: good, or made one by `edge abandon`), decided only by `edge requeue`, or by processing the
#: image again: prune keeps it unless asked (`dead_letters`). The other error kinds are no such
#: thing: "quarantine" (unreadable, nothing to send) and "outbox_full" (features dropped by the
#: operator's --when-full reject; no request kept, nothing can send it) are final as they are.
DEAD_LETTER = "(verdict = 'error' AND error_kind IS 'dead_letter')"
#: What a row prune picked must still be when it deletes it (a row requeued since the select,
#: by `edge requeue` in another process, is pending, or final again but newly so): by whether
#: it was picked as a dead letter; ?2 is the prune's `before`.
_STILL = {
    False: f"verdict IN {FINAL} AND NOT {DEAD_LETTER} AND finished < ?2",
    True: f"{DEAD_LETTER} AND finished < ?2",
}


class StoreMaintenance(StoreConnection):
    """The upkeep part of `ResultStore`: prune and reclaim."""

    def prune(
        self,
        before: float,
        dry_run: bool = False,
        batch: int = 2000,
        start_after: int = 0,
        should_stop: Callable[[], bool] | None = None,
        dead_letters: bool = False,
    ) -> Pruned:
        """Delete final results (ok, defect, error) finished before `before` (unix s); pending
        rows are never touched, nor a dead letter unless `dead_letters` (a flagged image the
        cloud never judged: requeue, or processing its image again, decides it; deleted, its
        kept request goes with it and no record is left that it was never judged), nor a row
        whose file still lies where it arrived (--after keep, or a move that failed or was cut
        short by a crash): that row is what tells the daemon the file is done, and without it
        the file would be processed again. "Its file" is the one it recorded (`lies_there`): a
        file the camera wrote since under the same name does not keep it; a path this user
        cannot look at (--watch unreadable to it, an I/O error) keeps its row. Deletes in
        batches of `batch` rows, one short commit each.

        Args:
            before: unix s; rows finished earlier go.
            dry_run: count, delete nothing.
            batch: rows looked at per commit.
            start_after: look only at rows with a larger id (the daemon starts from 0 each
                time: a row kept for its file is looked at again once the file goes).
            should_stop: checked between batches; True ends the prune early.
            dead_letters: delete the old dead letters too (error_kind 'dead_letter'), with
                their kept requests; without it they are kept and counted.

        A row is deleted only when its boot's clock agrees that it is as old as `before` says:
        its wall-clock stamp may be old only because the clock was behind when it was written
        and has been stepped forward since (an edge without a clock battery booting with a
        stale time). Its boot stamp dates it (`_boot_starts`): for this boot by the time since
        boot now, for an earlier one by the last result that boot made final, whose stamp had
        the clock as NTP left it (a reboot no longer makes them months old). Those rows are
        counted in `kept_for_clock` and wait until they are old by both clocks.

        Returns:
            how many rows were (or would be) deleted, the largest id looked at, how many were
            kept for the clock, for their file and as dead letters, and how many of those
            deleted were dead letters.
        """
        deleted, kept_for_clock, kept_in_place, after_id = 0, 0, 0, start_after
        kept_letters, letters_deleted = 0, 0

        def pruned() -> Pruned:
            return Pruned(deleted, after_id, kept_for_clock, kept_in_place,
                                 kept_letters, letters_deleted)  # fmt: skip

        boot = boot_clock()
        with self._lock:
            columns = image_columns(self._db) if boot is not None else set()
        stamped = {"finished_boot", "finished_boot_s"} <= columns  # (a read-only older store)
        boot_select = ", finished_boot, finished_boot_s" if stamped else ", NULL, NULL"
        # unix s at which each boot began, as its latest clock says; a row finished at
        # starts[boot] + finished_boot_s
        starts = self._boot_starts(boot) if stamped and boot is not None else {}
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, path, file_key, {DEAD_LETTER}{boot_select} FROM images"
                    f" WHERE id > ? AND verdict IN {FINAL} AND finished < ? ORDER BY id LIMIT ?",
                    (after_id, before, batch),
                ).fetchall()
            if not rows:
                return pruned()
            after_id = rows[-1][0]
            doomed: dict[bool, list[tuple[int, float]]] = {False: [], True: []}  # by letter
            for row_id, path, key, is_letter, row_boot, row_boot_s in rows:
                young = (
                    row_boot in starts
                    and row_boot_s is not None
                    and starts[row_boot] + row_boot_s >= before
                )
                letter = bool(is_letter)
                if young:
                    kept_for_clock += 1
                elif letter and not dead_letters:
                    kept_letters += 1
                elif lies_there(path, key) is not False:  # (or it cannot be told: kept)
                    kept_in_place += 1
                else:
                    doomed[letter].append((row_id, before))
            gone = {letter: len(ids) for letter, ids in doomed.items()}
            if any(gone.values()) and not dry_run:
                with self._transaction() as db:
                    for letter, ids in doomed.items():
                        if not ids:
                            continue
                        # a row requeued since the select (`edge requeue` in another process) is
                        # pending again, or final anew: neither it nor its kept request goes,
                        # nor is it counted
                        db.executemany(
                            "DELETE FROM dead_letters WHERE image_id = ?1 AND EXISTS"
                            f" (SELECT 1 FROM images WHERE id = ?1 AND {_STILL[letter]})",
                            ids,
                        )
                        gone[letter] = db.executemany(
                            f"DELETE FROM images WHERE id = ?1 AND {_STILL[letter]}", ids
                        ).rowcount
                    counts = [("pruned", sum(gone.values()))]
                    if gone[True]:  # (the dead letters an operator had deleted, for the record)
                        counts.append(("pruned_dead_letters", gone[True]))
                    db.executemany(
                        "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name)"
                        " DO UPDATE SET value = value + excluded.value",
                        counts,
                    )
            deleted += sum(gone.values())
            letters_deleted += gone[True]
            if should_stop is not None and should_stop():
                return pruned()

    def _boot_starts(self, boot: BootClock) -> dict[str, float]:
        """Boot id -> the unix s at which it began: this boot's by the clock now minus the
        time since boot; an earlier boot's by the result it made final last (the largest
        `finished_boot_s`: its `finished` minus that), when the clock was most likely set
        right (NTP steps a stale clock forward once, early in a boot). One pass over the
        results (one prune an hour)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT finished_boot, finished - MAX(finished_boot_s) FROM images"
                " WHERE finished_boot IS NOT NULL AND finished_boot_s IS NOT NULL"
                " AND finished IS NOT NULL GROUP BY finished_boot"
            ).fetchall()  # (SQLite: `finished` is the row with the largest finished_boot_s)
        starts = {row_boot: start for row_boot, start in rows if start is not None}
        starts[boot.boot_id] = time.time() - boot.seconds
        return starts

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
