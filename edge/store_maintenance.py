"""The edge store's upkeep (no torch): pruning old final results (never one whose file still
lies where it arrived, nor one only the wall clock calls old, nor a dead letter unless asked or
its image was processed again, nor an ok or defect result of an image that still has a dead
letter) and giving free pages back to the file system."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from splitdet.edge.boot_clock import BootClock, boot_clock
from splitdet.edge.file_identity import lies_there
from splitdet.edge.store_connection import StoreConnection
from splitdet.edge.store_dead_letters import PROCESSED_AGAIN, letter_joins
from splitdet.edge.store_file import read_contents
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
#: image again: prune keeps it unless asked (`dead_letters`) or its image was processed again
#: (`store_dead_letters.letter_joins`: requeue leaves it for good). The other error kinds are
#: no such thing: "quarantine" (unreadable, nothing to send) and "outbox_full" (features dropped
#: by the operator's --when-full reject; no request kept, nothing can send it) are final as
#: they are.
DEAD_LETTER = "(verdict = 'error' AND error_kind IS 'dead_letter')"
#: The kinds of row prune deletes: a final result that is no dead letter, a dead letter (its
#: image not processed again: the operator's --dead-letters), a dead letter whose image was
#: processed again (settled: a final result like any other, its kept request going with it).
_RESULT, _LETTER, _SETTLED = "result", "letter", "settled"
#: What a row prune picked must still be when it deletes it (a row requeued since the select,
#: by `edge requeue` in another process, is pending, or final again but newly so): by the kind
#: it was picked as; ?2 is the prune's `before`. (A settled dead letter stays settled: requeue
#: never takes it, and the result that settles it stays while it does, `_twin_kept`.)
_STILL = {
    _RESULT: f"verdict IN {FINAL} AND NOT {DEAD_LETTER} AND finished < ?2",
    _LETTER: f"{DEAD_LETTER} AND finished < ?2",
    _SETTLED: f"{DEAD_LETTER} AND finished < ?2",
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
        kept request goes with it and no record is left that it was never judged), nor an ok or
        defect result while a dead letter of its image (the same content hash) is in the store
        (`edge requeue` reads it to tell that image was processed again), nor a row whose file
        still lies where it arrived (--after keep, or a move that failed or was cut
        short by a crash): that row is what tells the daemon the file is done, and without it
        the file would be processed again. "Its file" is the one it recorded (`lies_there`): a
        file the camera wrote since under the same name does not keep it; a path this user
        cannot look at (--watch unreadable to it, an I/O error) keeps its row. Deletes in
        batches of `batch` rows, one short commit each. A dead letter whose image was processed
        again (`store_dead_letters.letter_joins`, the rule by which requeue leaves it for good) is
        settled: it goes as any final result, with its kept request, `dead_letters` or not.

        Args:
            before: unix s; rows finished earlier go.
            dry_run: count, delete nothing.
            batch: rows looked at per commit.
            start_after: look only at rows with a larger id (the daemon starts from 0 each
                time: a row kept for its file is looked at again once the file goes).
            should_stop: checked between batches; True ends the prune early.
            dead_letters: delete the old dead letters too (error_kind 'dead_letter'), with
                their kept requests; without it they are kept and counted (but those whose
                images were processed again: they go).

        A row is deleted only when its boot's clock agrees that it is as old as `before` says:
        its wall-clock stamp may be old only because the clock was behind when it was written
        and has been stepped forward since (an edge without a clock battery booting with a
        stale time). Its boot stamp dates it (`_boot_starts`): for this boot by the time since
        boot now, for an earlier one by the last result that boot made final, whose stamp had
        the clock as NTP left it (a reboot no longer makes them months old). Those rows are
        counted in `kept_for_clock` and wait until they are old by both clocks.

        Returns:
            how many rows were (or would be) deleted, the largest id looked at, how many were
            kept for the clock, for their file, as dead letters and for a dead letter of their
            image, and how many of those deleted were dead letters (not processed again).
        """
        deleted, kept_for_clock, kept_in_place, after_id = 0, 0, 0, start_after
        kept_letters, letters_deleted, kept_twins = 0, 0, 0

        def pruned() -> Pruned:
            return Pruned(deleted, after_id, kept_for_clock, kept_in_place,
                               kept_letters, letters_deleted, kept_twins)  # fmt: skip

        boot = boot_clock()
        with self._lock:
            columns = image_columns(self._db) if boot is not None else set()
        stamped = {"finished_boot", "finished_boot_s"} <= columns  # (a read-only older store)
        boot_select = ", finished_boot, finished_boot_s" if stamped else ", NULL, NULL"
        # unix s at which each boot began, as its latest clock says; a row finished at
        # starts[boot] + finished_boot_s
        starts = self._boot_starts(boot) if stamped and boot is not None else {}
        # the dead letters now, by image, and those whose images were processed again; the
        # dead letters this prune deletes (a dry run: would) leave `letters` as they go
        letters, settled = self._dead_letters()
        gone_letters: set[int] = set()
        # two passes: the dead letters first, so that the results they alone kept (a lower id
        # than theirs included) go in the same prune
        passes_letters = f"AND {DEAD_LETTER}"
        passes, through = [passes_letters, f"AND NOT {DEAD_LETTER}"], start_after
        while passes:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, path, file_key, {DEAD_LETTER}, verdict IN ('ok', 'defect'),"
                    f" content_hash{boot_select} FROM images WHERE id > ? AND verdict IN"
                    f" {FINAL} {passes[0]} AND finished < ? ORDER BY id LIMIT ?",
                    (after_id, before, batch),
                ).fetchall()
            if not rows:  # (`through_id`: the last row the results' pass looked at)
                if passes.pop(0) != passes_letters:
                    through = max(through, after_id)
                after_id = start_after
                continue
            after_id = rows[-1][0]
            doomed: dict[str, list[tuple[int, float]]] = {_LETTER: [], _SETTLED: [], _RESULT: []}
            judged: dict[int, str] = {}  # doomed ok and defect results: their content hash
            for row_id, path, key, is_letter, is_judged, image, row_boot, row_boot_s in rows:
                young = (
                    row_boot in starts
                    and row_boot_s is not None
                    and starts[row_boot] + row_boot_s >= before
                )
                kind = _RESULT if not is_letter else _SETTLED if row_id in settled else _LETTER
                if young:
                    kept_for_clock += 1
                elif kind == _LETTER and not dead_letters:
                    kept_letters += 1
                elif is_judged and letters.get(image, set()) - gone_letters:
                    kept_twins += 1  # (requeue reads it to leave that dead letter for good)
                elif lies_there(path, key) is not False:  # (or it cannot be told: kept)
                    kept_in_place += 1
                else:
                    doomed[kind].append((row_id, before))
                    if kind != _RESULT:
                        gone_letters.add(row_id)
                    elif is_judged:
                        judged[row_id] = image
            gone = {kind: len(ids) for kind, ids in doomed.items()}
            if any(gone.values()) and not dry_run:
                with self._transaction() as db:
                    for kind, ids in doomed.items():  # (the dead letters first: `_twin_kept`)
                        if kind == _RESULT and judged:
                            twins = self._twin_kept(db, judged)
                            kept_twins += len(twins)
                            ids = [row for row in ids if row[0] not in twins]
                        # a row requeued since the select (`edge requeue` in another process) is
                        # pending again, or final anew: neither it nor its kept request goes,
                        # nor is it counted
                        db.executemany(
                            "DELETE FROM dead_letters WHERE image_id = ?1 AND EXISTS"
                            f" (SELECT 1 FROM images WHERE id = ?1 AND {_STILL[kind]})",
                            ids,
                        )
                        still = f"DELETE FROM images WHERE id = ?1 AND {_STILL[kind]}"
                        if kind == _RESULT:
                            gone[kind] = db.executemany(still, ids).rowcount if ids else 0
                            continue
                        kept = {i for i, b in ids if not db.execute(still, (i, b)).rowcount}
                        gone_letters -= kept  # (still there: its image's results stay)
                        gone[kind] = len(ids) - len(kept)
                    counts = [("pruned", sum(gone.values()))]
                    if gone[_LETTER]:  # (the dead letters an operator had deleted, for the record)
                        counts.append(("pruned_dead_letters", gone[_LETTER]))
                    db.executemany(
                        "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name)"
                        " DO UPDATE SET value = value + excluded.value",
                        counts,
                    )
            deleted += sum(gone.values())
            letters_deleted += gone[_LETTER]
            # (stopped in the results' pass only: the dead letters' is short, and a prune
            # resumed after `through_id` must know which it deleted)
            if should_stop is not None and len(passes) == 1 and should_stop():
                break
        after_id = max(through, after_id)
        return pruned()

    def _dead_letters(self) -> tuple[dict[str, set[int]], set[int]]:
        """The store's dead letters: their ids by content hash, and the ids of those whose image
        was processed again (`store_dead_letters.letter_joins`: requeue leaves them for good).
        One pass over the final results when there is a dead letter; none otherwise."""
        with self._lock:
            letters: dict[str, set[int]] = {}
            for row_id, image in self._db.execute(
                f"SELECT id, content_hash FROM images WHERE {DEAD_LETTER}"
            ):
                letters.setdefault(image, set()).add(row_id)
            if not letters:
                return letters, set()
            # (a version 1 store read as it is, by a dry run, has no table of kept requests)
            keeps = "dead_letters" in read_contents(self._db).names
            settled = {row_id for (row_id,) in self._db.execute(
                f"SELECT i.id FROM images i{letter_joins(keeps)}"
                f" WHERE i.verdict = 'error' AND i.error_kind = 'dead_letter' AND {PROCESSED_AGAIN}"
            )}  # fmt: skip
        return letters, settled

    @staticmethod
    def _twin_kept(db: sqlite3.Connection, judged: dict[int, str]) -> set[int]:
        """Of the ok and defect results `judged` (id: content hash) about to be deleted in
        `db`'s transaction, those a dead letter of whose image is in the store now (made since
        the prune looked, or one it picked still there: requeued meanwhile): they stay, for
        `edge requeue` to tell that image was processed again."""
        images = {image for (image,) in db.execute(
            f"SELECT DISTINCT content_hash FROM images WHERE {DEAD_LETTER}"
        )}  # fmt: skip
        return {row_id for row_id, image in judged.items() if image in images}

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
