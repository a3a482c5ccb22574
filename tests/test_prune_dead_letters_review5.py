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
import threading
import time

import pytest

from splitdet.edge import store_maintenance
from splitdet.edge.result_pruner import ResultPruner
from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_dead_letters import ABANDONED
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.shared.cli import main

from support import age_rows, image_ids

FINGERPRINT = "f" * 64
RETIRED = "aaaaaaaa1" + "0" * 55
DAY = 86400.0


def _arrival(n: int) -> Arrival:
    return Arrival(f"/gone/{n}.png", f"{n}.png|100|{n}|{n}", f"{n:064x}", 100, time.time())


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
