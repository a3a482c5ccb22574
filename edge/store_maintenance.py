"""The edge store's upkeep (no torch): pruning old final results (never one whose file still
lies where it arrived, nor one only the wall clock calls old) and giving free pages back to the
file system."""

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


class StoreMaintenance(StoreConnection):
    """The upkeep part of `ResultStore`: prune and reclaim."""

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
        would be processed again. "Its file" is the one it recorded (`lies_there`): a file the
        camera wrote since under the same name does not keep it; a path this user cannot look
        at (--watch unreadable to it, an I/O error) keeps its row. Deletes in batches of `batch`
        rows, one short commit each.

        Args:
            before: unix s; rows finished earlier go.
            dry_run: count, delete nothing.
            batch: rows looked at per commit.
            start_after: look only at rows with a larger id (the daemon starts from 0 each
                time: a row kept for its file is looked at again once the file goes).
            should_stop: checked between batches; True ends the prune early.

        A row is deleted only when its boot's clock agrees that it is as old as `before` says:
        its wall-clock stamp may be old only because the clock was behind when it was written
        and has been stepped forward since (an edge without a clock battery booting with a
        stale time). Its boot stamp dates it (`_boot_starts`): for this boot by the time since
        boot now, for an earlier one by the last result that boot made final, whose stamp had
        the clock as NTP left it (a reboot no longer makes them months old). Those rows are
        counted in `kept_for_clock` and wait until they are old by both clocks.

        Returns:
            how many rows were (or would be) deleted, the largest id looked at, and how many
            were kept for the clock and for their file.
        """
        deleted, kept_for_clock, kept_in_place, after_id = 0, 0, 0, start_after
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
                    f"SELECT id, path, file_key{boot_select} FROM images WHERE id > ? AND"
                    f" verdict IN {FINAL} AND finished < ? ORDER BY id LIMIT ?",
                    (after_id, before, batch),
                ).fetchall()
            if not rows:
                return Pruned(deleted, after_id, kept_for_clock, kept_in_place)
            after_id = rows[-1][0]
            doomed = []
            for row_id, path, key, row_boot, row_boot_s in rows:
                young = (
                    row_boot in starts
                    and row_boot_s is not None
                    and starts[row_boot] + row_boot_s >= before
                )
                if young:
                    kept_for_clock += 1
                elif lies_there(path, key) is not False:  # (or it cannot be told: kept)
                    kept_in_place += 1
                else:
                    doomed.append((row_id,))
            gone = len(doomed)
            if doomed and not dry_run:
                with self._transaction() as db:
                    # a row requeued since the select (`edge requeue` in another process) is
                    # pending again: neither it nor its kept request goes, nor is it counted
                    db.executemany(
                        f"DELETE FROM dead_letters WHERE image_id = ?1 AND EXISTS"
                        f" (SELECT 1 FROM images WHERE id = ?1 AND verdict IN {FINAL})",
                        doomed,
                    )
                    gone = db.executemany(
                        f"DELETE FROM images WHERE id = ? AND verdict IN {FINAL}", doomed
                    ).rowcount
                    db.execute(
                        "INSERT INTO counters (name, value) VALUES ('pruned', ?)"
                        " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                        (gone,),
                    )
            deleted += gone
            if should_stop is not None and should_stop():
                return Pruned(deleted, after_id, kept_for_clock, kept_in_place)

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
