"""Prune keeps dead letters unless asked (a QA review). Before, `splitdet edge prune` and the
daemon's --keep-results deleted them as any final result: flagged images (possibly defective)
whose request the cloud never judged, refused for good or abandoned by `edge abandon`, went
with their kept requests (`edge requeue` could no longer send them), the output said only
"deleted N result(s)" and `edge status` showed 0 dead letters: under --after delete, the only
record that a flagged part was never judged. Now they stay, and prune says how many it kept
and how to decide them; `edge prune --dead-letters` deletes them and says how many it did.
Other error rows (quarantined, outbox full) go as before. In-process stores and commands."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import closing

import pytest

from splitdet.edge import store_maintenance
from splitdet.edge.result_pruner import ResultPruner
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.edge.store_dead_letters import ABANDONED
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.shared.cli import main

from support import age_rows, image_ids

FINGERPRINT = "f" * 64
RETIRED = "aaaaaaaa1" + "0" * 55
DAY = 86400.0


def _arrival(n: int, again: bool = False) -> Arrival:
    """Image n's arrival; `again`: fed again (the same bytes, a new file key)."""
    key = f"{n}.png|100|{n + 1000 * again}|{n}"
    return Arrival(f"/gone/{n}.png", key, f"{n:064x}", 100, time.time())


def _refused(store: ResultStore, n: int, fingerprint: str = FINGERPRINT) -> int:
    """A flagged image n whose request the cloud refused for good: its image id."""
    image_id, _, verdict = store.record_pending(
        _arrival(n), 0.9, f"req-{n}", bytes([n]) * 100, fingerprint, {}
    )
    assert verdict == "pending"
    assert store.dead_letter(image_id, f"dead letter: INTERNAL: bug {n}")
    return image_id


def _status(db) -> dict:
    conn = open_readonly(db)
    try:
        return store_status(conn)
    finally:
        conn.close()


@pytest.fixture
def history(tmp_path):
    """(db, {kind: image id}): 40 days old, an ok result, a refused and an abandoned dead
    letter, a quarantined image and an outbox-full rejection; and a dead letter of now."""
    db = tmp_path / "e5.sqlite"
    store = ResultStore(db)
    rows = {}
    rows["ok"], _ = store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
    rows["refused"] = _refused(store, 2)
    rows["abandoned"], _, _ = store.record_pending(
        _arrival(3), 0.9, "req-3", b"z" * 100, RETIRED, {}
    )
    assert store.dead_letter_export(RETIRED, f"{ABANDONED}: no cloud serves it") == 1
    rows["quarantine"], _ = store.record_error(_arrival(4), "quarantine", "unreadable", FINGERPRINT)
    rows["outbox_full"], _ = store.record_error(
        _arrival(5), "outbox_full", "outbox full", FINGERPRINT, p_defect=0.9
    )
    rows["recent_letter"] = _refused(store, 6)
    store.close()
    age_rows(db, [v for k, v in rows.items() if k != "recent_letter"], days=40)
    return db, rows


def test_prune_keeps_dead_letters_and_deletes_them_only_when_asked(history):
    db, rows = history
    store = ResultStore(db)
    try:
        before = time.time() - 30 * DAY
        pruned = store.prune(before, batch=2)  # (several batches)
        assert (pruned.deleted, pruned.kept_dead_letters, pruned.dead_letters_deleted) == (3, 2, 0)
        # the other error kinds (nothing kept to send) go as any final result
        assert image_ids(db) == {rows["refused"], rows["abandoned"], rows["recent_letter"]}
        assert store.dead_letter_stats().depth == 3  # their kept requests too
        assert "pruned_dead_letters" not in store.counters()
        # still requeue's to decide
        assert store.requeue(dry_run=True, abandoned=True).requeued == [
            rows["refused"], rows["abandoned"], rows["recent_letter"]
        ]  # fmt: skip

        assert store.prune(before, dry_run=True, dead_letters=True).dead_letters_deleted == 2
        assert store.dead_letter_stats().depth == 3  # a dry run deletes nothing
        pruned = store.prune(before, dead_letters=True)
        assert (pruned.deleted, pruned.kept_dead_letters, pruned.dead_letters_deleted) == (2, 0, 2)
        assert image_ids(db) == {rows["recent_letter"]}  # not old enough
        assert store.dead_letter_stats().depth == 1  # their kept requests went with them
        assert store.counters()["pruned"] == 5 and store.counters()["pruned_dead_letters"] == 2
    finally:
        store.close()


def test_the_prune_command_says_what_it_kept_and_deletes_dead_letters_when_asked(history, capsys):
    db, rows = history
    prune = ["edge", "prune", "--db", str(db), "--older-than", "1m"]
    assert main([*prune, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 3 result(s)\n" in out
    assert "kept 2 dead letter(s) older than --older-than" in out
    assert "splitdet edge requeue --db" in out and "--dead-letters deletes them" in out
    assert len(image_ids(db)) == 6

    assert main(prune) == 0
    out = capsys.readouterr().out
    assert "deleted 3 result(s)" in out and "kept 2 dead letter(s)" in out
    assert _status(db)["dead_letters"]["kept"] == 3  # `edge status` still shows them

    assert main([*prune, "--dead-letters", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 2 result(s), 2 of them dead letter(s)" in out
    assert "dead letter(s) older" not in out and len(image_ids(db)) == 3

    assert main([*prune, "--dead-letters"]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 result(s), 2 of them dead letter(s)" in out and " older " not in out
    assert image_ids(db) == {rows["recent_letter"]}
    assert _status(db)["dead_letters"]["kept"] == 1


def test_the_daemons_prune_keeps_dead_letters(history, caplog):
    db, rows = history
    caplog.set_level(logging.INFO, logger="splitdet.edge")
    store = ResultStore(db)
    try:
        pruner = ResultPruner(store, 30 * DAY, once=True, stop=threading.Event())
        pruner.prune(time.time() - 30 * DAY)
        assert image_ids(db) == {rows["refused"], rows["abandoned"], rows["recent_letter"]}
        assert store.dead_letter_stats().depth == 3
    finally:
        store.close()
    (event,) = [r for r in caplog.records if r.msg == "pruned"]
    assert event.fields["results"] == 3 and event.fields["dead_letters_kept"] == 2


@pytest.mark.parametrize("refused_again", [False, True])
def test_a_dead_letter_requeued_while_prune_dead_letters_looks_stays(
    tmp_path, monkeypatch, refused_again
):
    """prune picks its rows, then deletes those still as picked: a dead letter requeued in
    between (by `edge requeue` in another process) is pending, or refused again and a fresh
    dead letter: neither it nor its request goes, nor is it counted."""
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        letter = _refused(store, 1)
        ok, _ = store.record_ok(_arrival(2), 0.1, FINGERPRINT, {})
        age_rows(store.path, [letter, ok], days=40)

        def requeue_meanwhile(path, key) -> bool:
            if store.requeue_dead_letters()[0] and refused_again:
                assert store.dead_letter(letter, "dead letter: INTERNAL: still")
            return False

        monkeypatch.setattr(store_maintenance, "lies_there", requeue_meanwhile)
        pruned = store.prune(time.time() - 30 * DAY, dead_letters=True)
        assert (pruned.deleted, pruned.dead_letters_deleted) == (1, 0)
        assert store.counters()["pruned"] == 1 and "pruned_dead_letters" not in store.counters()
        assert image_ids(store.path) == {letter}
        if refused_again:
            assert store.dead_letter_stats().depth == 1  # its request kept
        else:
            assert store.next_due().image_id == letter  # its request in the outbox
    finally:
        store.close()


def test_prune_help_names_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["edge", "prune", "--help"])
    out = capsys.readouterr().out
    assert "--dead-letters" in out and "Dead letters are kept unless --dead-letters" in out


# A QA review of the above: a dead letter whose image was processed again (requeue leaves it for
# good) was kept by prune, while the result that made requeue leave it was deleted: the next
# `edge requeue` sent the image a second time. Now such a dead letter is settled (it goes as any
# result, with its kept request), and no ok or defect result goes while a dead letter of its
# image is in the store.

DEFECT = Answer([[1.0, 1.0, 9.0, 9.0]], [0.9], [1], ["scratch"])


def _judged_again(store: ResultStore, n: int) -> int:
    """Image n fed again, flagged and answered "defect": its new row's id."""
    image_id, _, verdict = store.record_pending(
        _arrival(n, again=True), 0.9, f"req-{n}-again", bytes([n]) * 100, FINGERPRINT, {}
    )
    assert verdict == "pending" and store.complete(image_id, DEFECT)
    return image_id


def _shift_back(db, days: float) -> None:
    """Every result and refusal of the store `db` made `days` older, by the wall clock and the
    boot clock alike, in the order they were (`age_rows` gives them all one time: a result
    judged before a refusal would be judged after it)."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "UPDATE images SET finished = finished - ?1, finished_boot_s = finished_boot_s - ?1",
            (days * DAY,),
        )
        conn.execute("UPDATE dead_letters SET dead_at = dead_at - ?", (days * DAY,))


def _sent_nothing(db) -> None:
    """Nothing is pending nor in the outbox: no image is sent (again)."""
    store = ResultStore(db)
    try:
        assert store.next_due() is None and store.outbox_stats().depth == 0
        assert store.verdict_counts()["pending"] == 0
    finally:
        store.close()


def test_a_dead_letter_whose_image_was_processed_again_is_pruned_with_it_never_requeued(
    tmp_path, capsys
):
    """The reviewer's case: image 1 refused, fed again and answered "defect", both 100 days
    old. Prune deletes both (the dead letter settled, without --dead-letters); requeue then has
    nothing to send, and image 1 is judged once."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    try:
        letter = _refused(store, 1)
        defect = _judged_again(store, 1)
    finally:
        store.close()
    age_rows(db, [letter, defect], days=100)
    assert main(["edge", "requeue", "--db", str(db), "--dry-run"]) == 0
    assert "would leave 1 whose image has a final result since (processed again)" in (
        capsys.readouterr().out)  # fmt: skip

    prune = ["edge", "prune", "--db", str(db), "--older-than", "90d"]
    assert main([*prune, "--dry-run"]) == 0
    assert f"{db}: would delete 2 result(s)\n" == capsys.readouterr().out
    assert main(prune) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{db}: deleted 2 result(s)") and "dead letter" not in out
    assert image_ids(db) == set()
    assert _status(db)["dead_letters"]["kept"] == 0  # its kept request went with it

    assert main(["edge", "requeue", "--db", str(db)]) == 0
    assert f"{db}: requeued 0 dead letter(s)" in capsys.readouterr().out
    _sent_nothing(db)
    store = ResultStore(db)
    try:
        counters = store.counters()
        assert counters["pruned"] == 2 and "pruned_dead_letters" not in counters
    finally:
        store.close()


def test_a_result_older_than_the_dead_letter_it_settles_stays_while_that_dead_letter_does(
    tmp_path, capsys
):
    """Image 1's request retried for long before it was refused; meanwhile the image, fed
    again, was answered "defect" (a later row, judged before the refusal). That result turns
    90 days old first: prune keeps it (and says so) while the dead letter is there, requeue
    leaves the dead letter; once both are old, one prune deletes both."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    try:
        first, _, _ = store.record_pending(_arrival(1), 0.9, "req-1", b"x" * 100, FINGERPRINT, {})
        defect = _judged_again(store, 1)
        assert store.dead_letter(first, "dead letter: INTERNAL: a cloud bug")
    finally:
        store.close()
    age_rows(db, [defect], days=100)
    age_rows(db, [first], days=10)
    store = ResultStore(db)
    try:  # (the daemon's hourly prune)
        pruned = store.prune(time.time() - 90 * DAY)
        assert (pruned.deleted, pruned.kept_dead_letters) == (0, 0)
        assert pruned.kept_for_dead_letters == 1
    finally:
        store.close()
    prune = ["edge", "prune", "--db", str(db), "--older-than", "90d"]
    assert main(prune) == 0
    out = capsys.readouterr().out
    assert f"{db}: deleted 0 result(s)" in out
    assert "kept 1 result(s) older than --older-than whose image still has a dead letter" in out
    assert image_ids(db) == {first, defect}

    assert main(["edge", "requeue", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "requeued 0 dead letter(s)" in out and "left 1 whose image has a final result" in out
    _sent_nothing(db)

    age_rows(db, [first], days=100)
    assert main(prune) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{db}: deleted 2 result(s)") and " kept " not in out
    assert image_ids(db) == set()


def test_a_settled_dead_letter_goes_without_dead_letters_an_unsettled_one_stays(tmp_path):
    """Without --dead-letters, a dead letter whose image was processed again (requeue leaves
    it), refused (image 1) or abandoned (image 2), goes with its kept request: a result like any
    other, not counted as a dead letter deleted. Image 4, refused, fed again and refused again,
    its first dead letter requeued and answered since: that answer (a lower id, judged after
    the second refusal) settles the second, and goes with it (dead letters are looked at
    first). Image 3, judged, then fed again and refused: an earlier result does not settle a
    dead letter; both stay, until --dead-letters deletes the dead letter and, in the same
    prune, its earlier result."""
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        refused = _refused(store, 1)
        store.record_ok(_arrival(1, again=True), 0.1, FINGERPRINT, {})
        abandoned, _, _ = store.record_pending(_arrival(2), 0.9, "req-2", b"z" * 100, RETIRED, {})
        assert store.dead_letter_export(RETIRED, f"{ABANDONED}: no cloud serves it") == 1
        _judged_again(store, 2)
        requeued = _refused(store, 4)
        second = store.record_pending(
            _arrival(4, again=True), 0.9, "req-4-again", b"y" * 100, FINGERPRINT, {}
        )[0]
        assert store.dead_letter(second, "dead letter: INTERNAL: a cloud bug")
        assert store.requeue().requeued == [requeued] and store.complete(requeued, DEFECT)
        earlier, _ = store.record_ok(_arrival(3, again=True), 0.1, FINGERPRINT, {})  # before
        unsettled = _refused(store, 3)  # image 3 fed again and refused
        _shift_back(store.path, days=40)
        done = store.requeue(dry_run=True, abandoned=True)
        assert done.processed_again == [refused, abandoned, second]
        assert done.requeued == [unsettled]

        before = time.time() - 30 * DAY
        assert store.prune(before, dry_run=True, batch=3).deleted == 6
        pruned = store.prune(before, batch=3)
        assert (pruned.deleted, pruned.kept_dead_letters, pruned.dead_letters_deleted) == (6, 1, 0)
        assert pruned.kept_for_dead_letters == 1  # image 3's earlier ok
        assert image_ids(store.path) == {earlier, unsettled}
        assert store.dead_letter_stats().depth == 1  # the kept request of the unsettled one
        assert "pruned_dead_letters" not in store.counters()
        assert store.requeue(dry_run=True, abandoned=True).requeued == [unsettled]

        pruned = store.prune(before, dead_letters=True)  # the operator's decision: it goes,
        assert (pruned.deleted, pruned.dead_letters_deleted, pruned.kept_for_dead_letters) == (
            2, 1, 0)  # fmt: skip  # and its earlier result with it
        assert image_ids(store.path) == set()
    finally:
        store.close()


def test_the_kept_dead_letters_message_promises_no_requeue(history, capsys):
    """Prune's line on the dead letters it kept sends the operator to requeue's dry run, which
    says which it sends and which it leaves, not to a requeue "that sends them again"."""
    db, _ = history
    assert main(["edge", "prune", "--db", str(db), "--older-than", "1m"]) == 0
    out = capsys.readouterr().out
    assert "kept 2 dead letter(s) older than --older-than" in out
    assert f"`splitdet edge requeue --db {db} --dry-run` says which of them" in out
    assert "sends them again" not in out


def test_a_dead_letter_made_while_prune_looks_keeps_its_images_result(tmp_path, monkeypatch):
    """prune picks an old ok result of image 1, then, before it deletes it, the daemon's sender
    makes image 1's pending twin a dead letter: the result stays while that dead letter does
    (requeue reads it to tell whether the image was processed again), counted as kept for it."""
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        ok, _ = store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
        twin, _, _ = store.record_pending(
            _arrival(1, again=True), 0.9, "req-1", b"x" * 100, FINGERPRINT, {}
        )
        age_rows(store.path, [ok], days=40)

        def refused_meanwhile(path, key) -> bool:
            assert store.dead_letter(twin, "dead letter: INTERNAL: a cloud bug")
            return False

        monkeypatch.setattr(store_maintenance, "lies_there", refused_meanwhile)
        pruned = store.prune(time.time() - 30 * DAY)
        assert image_ids(store.path) == {ok, twin} and store.counters().get("pruned", 0) == 0
        assert (pruned.deleted, pruned.kept_for_dead_letters) == (0, 1)
    finally:
        store.close()


def test_dead_letters_deleted_take_their_earlier_results_in_the_same_prune(tmp_path):
    """Image 7 judged "ok", then fed again and refused (a dead letter of a greater id, not
    processed again: it was judged before). `--dead-letters` deleted the dead letter but kept
    the earlier result "for a dead letter of its image" it had just deleted, and said so; a
    second prune was needed. Dead letters now go first."""
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        judged = store.record_ok(_arrival(7), 0.1, FINGERPRINT, {})[0]
        image_id, _, verdict = store.record_pending(
            _arrival(7, again=True), 0.9, "req-7-again", b"x" * 100, FINGERPRINT, {}
        )
        assert verdict == "pending" and store.dead_letter(image_id, "dead letter: INTERNAL: x")
        assert judged < image_id
        age_rows(store.path, [judged, image_id], days=40)
        before = time.time() - 30 * DAY
        kept = store.prune(before, dry_run=True)  # (without --dead-letters: both stay)
        assert (kept.deleted, kept.kept_dead_letters, kept.kept_for_dead_letters) == (0, 1, 1)
        for dry_run in (True, False):
            pruned = store.prune(before, dry_run=dry_run, dead_letters=True)
            assert (pruned.deleted, pruned.dead_letters_deleted) == (2, 1), pruned
            assert pruned.kept_for_dead_letters == 0
        assert image_ids(store.path) == set()
    finally:
        store.close()
