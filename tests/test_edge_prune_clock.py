"""A prune keeps results whose wall-clock stamp is old only because the clock was behind when
they were written (an edge without a clock battery, set right by NTP later): before, a
`--keep-results 90d` daemon started after the clock was set right deleted minutes-old results
as 100 days old (an edge-operations review)."""

from __future__ import annotations

import sqlite3
import time

from splitdet.edge import store as store_module
from splitdet.edge.boot_clock import boot_clock
from splitdet.edge.store import Arrival, ResultStore
from splitdet.shared.cli import main

DAY = 86400.0
FINGERPRINT = "f" * 64


def _arrival(n: int) -> Arrival:
    return Arrival(f"/gone/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())


def test_results_written_under_a_clock_100_days_behind_are_kept(tmp_path, monkeypatch, capsys):
    path = tmp_path / "edge.sqlite"
    behind = time.time() - 100 * DAY
    monkeypatch.setattr(store_module.time, "time", lambda: behind)  # the clock 100 days behind
    store = ResultStore(path)
    for n in range(4):  # written by this boot, minutes ago in truth
        store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
    monkeypatch.undo()  # NTP sets the clock right

    db = sqlite3.connect(path)
    boot = boot_clock()
    assert boot is not None  # (Linux)
    stamps = db.execute("SELECT finished, finished_boot, finished_boot_s FROM images").fetchall()
    assert all(f < time.time() - 99 * DAY and b == boot.boot_id for f, b, _ in stamps)
    # row 3: truly old, by the boot clock too; row 4: written in another boot (wall clock rules)
    db.execute("UPDATE images SET finished_boot_s = ? WHERE id = 3", (boot.seconds - 91 * DAY,))
    db.execute("UPDATE images SET finished_boot = 'an-earlier-boot' WHERE id = 4")
    db.commit()
    db.close()

    pruned = store.prune(time.time() - 90 * DAY, dry_run=True)
    assert (pruned.deleted, pruned.kept_for_clock) == (2, 2)
    assert main(["edge", "prune", "--db", str(path), "--older-than", "90d"]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 result(s)" in out and "kept 2 result(s) stamped older" in out
    assert [r["id"] for r in store.results()] == [1, 2]
    store.close()


def test_a_result_made_final_again_is_stamped_again(tmp_path):
    """A requeued dead letter is pending again: its boot stamp goes with its finished time,
    and its answer stamps it anew (here as a dead letter once more)."""
    store = ResultStore(tmp_path / "edge.sqlite")
    image_id, _, _ = store.record_pending(_arrival(1), 0.9, "r1", b"x", FINGERPRINT, {})
    store.dead_letter(image_id, "refused")
    stamp = store._db.execute("SELECT finished_boot_s FROM images").fetchone()[0]
    assert stamp is not None
    store.requeue_dead_letters()
    assert store._db.execute(
        "SELECT finished, finished_boot, finished_boot_s FROM images"
    ).fetchone() == (None, None, None)
    store.dead_letter(image_id, "refused again")
    assert store._db.execute("SELECT finished_boot_s FROM images").fetchone()[0] >= stamp
    store.close()


def test_after_a_reboot_results_of_a_stale_clock_are_dated_by_their_boots_last_result(
    tmp_path, monkeypatch
):
    """A clock review: an edge without a clock battery boots reading a stale time, writes
    results, NTP sets the clock right, and the box reboots. The results of that boot were kept
    while it lasted, but after the reboot a `--keep-results 90d` prune deleted them as 100 days
    old, minutes after they were written. Their boot's last result, stamped after NTP, dates
    them. A boot whose clock was never set right dates nothing: its rows go by the wall
    clock."""
    path = tmp_path / "edge.sqlite"
    behind = time.time() - 100 * DAY
    monkeypatch.setattr(store_module.time, "time", lambda: behind)
    store = ResultStore(path)
    for n in range(3):  # boot A, before NTP
        store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
    for n in range(3, 5):  # boot S: stale all along
        store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
    monkeypatch.undo()
    store.record_ok(_arrival(5), 0.1, FINGERPRINT, {})  # boot A, after NTP
    db = sqlite3.connect(path)
    for row_id, boot_id, boot_s in [(1, "A", 100.0), (2, "A", 110.0), (3, "A", 120.0),
                                    (4, "S", 100.0), (5, "S", 130.0), (6, "A", 200.0)]:  # fmt: skip
        db.execute(
            "UPDATE images SET finished_boot = ?, finished_boot_s = ? WHERE id = ?",
            (boot_id, boot_s, row_id),
        )
    db.commit()
    db.close()

    pruned = store.prune(time.time() - 90 * DAY)
    assert (pruned.deleted, pruned.kept_for_clock) == (2, 3)
    assert [r["id"] for r in store.results()] == [1, 2, 3, 6]
    # a prune past their true age (by boot A's last result) deletes them
    pruned = store.prune(time.time() + 60)
    assert pruned.deleted == 4
    store.close()
