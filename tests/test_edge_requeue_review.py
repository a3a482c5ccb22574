"""`splitdet edge requeue` and abandoned dead letters (a user review of the model-upgrade loop).

The user abandoned a retired export's requests, processed their images again with the current
export (as abandon's help suggested), then ran a plain `edge requeue`: it brought the abandoned
dead letters back too, and once v1 was served again 6 parts had two final "defect" results.
Its dry run said only "would requeue 6 dead letter(s)". Now a plain requeue leaves abandoned
dead letters (`--abandoned` takes them too, `--fingerprint` one export's), and both runs say
what they requeue and what they leave by export and cause."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from splitdet.edge.store import Answer, Arrival, OutboxCap, ResultStore
from splitdet.edge.store_dead_letters import dead_letter_cause
from splitdet.shared.cli import main

RETIRED = "20cbbe61588c" + "1" * 52  # v1, abandoned
CURRENT = "3c5823c70655" + "2" * 52  # v2, the export the edge runs now
OTHER = "3c5823c70aaa" + "3" * 52  # shares CURRENT's first 8 digits


def _arrival(n: int, again: bool = False) -> Arrival:
    """Image n's arrival; `again`: copied back into the hot folder (a new file key)."""
    key = f"part{n}.png|100|{n + 1000 * again}|{n}"
    return Arrival(f"/hot/part{n}.png", key, f"{n:064x}", 100, time.time())


def _pending(store: ResultStore, n: int, fingerprint: str, again: bool = False) -> int:
    image_id, _, verdict = store.record_pending(
        _arrival(n, again), 0.9, f"req-{n}-{again}", b"x" * 100, fingerprint, {}
    )
    assert verdict == "pending"
    return image_id


def _refused(store: ResultStore, n: int, fingerprint: str) -> int:
    """A request the cloud refused for good, as the sender words it."""
    image_id = _pending(store, n, fingerprint)
    reason = "dead letter: the cloud refused the request permanently: INTERNAL: a cloud bug"
    assert store.dead_letter(image_id, reason)
    return image_id


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verdicts(db: Path) -> dict[int, str]:
    with closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT id, verdict FROM images"))


def _results_by_part(db: Path) -> dict[str, list[str]]:
    """Each part's final results' verdicts."""
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT path, verdict FROM images WHERE verdict != 'error'")
        parts: dict[str, list[str]] = {}
        for path, verdict in rows:
            parts.setdefault(path, []).append(verdict)
        return parts


@pytest.fixture
def upgraded(tmp_path):
    """The user's store: 3 requests of the retired export abandoned, then their images
    processed again with the current export (defect); 1 request of the current export
    refused by the cloud (INTERNAL)."""
    db = tmp_path / "cam2.sqlite"
    store = ResultStore(db)
    ids = {"abandoned": [_pending(store, n, RETIRED) for n in (1, 2, 3)]}
    store.close()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", RETIRED[:12]]) == 0
    store = ResultStore(db)
    for n in (1, 2, 3):  # the archived images copied back into the hot folder, sent with v2
        image_id = _pending(store, n, CURRENT, again=True)
        assert store.complete(image_id, Answer([[1.0, 1.0, 9.0, 9.0]], [0.9], [1], ["scratch"]))
    ids["refused"] = [_refused(store, 4, CURRENT)]
    store.close()
    return db, ids


def test_a_dry_run_names_what_it_requeues_and_leaves_and_changes_nothing(upgraded, capsys):
    db, _ = upgraded
    capsys.readouterr()
    before = _sha256(db)
    assert main(["edge", "requeue", "--db", str(db), "--dry-run"]) == 0
    out = capsys.readouterr().out
    again = (
        f"would leave 3 whose image has a final result since (processed again) (export "
        f"{RETIRED[:12]}: 3 abandoned): requeued, each would get a second one"
    )
    assert f"would requeue 1 dead letter(s) (export {CURRENT[:12]}: 1 refused INTERNAL)" in out
    assert again in out and "abandoned by" not in out
    assert _sha256(db) == before  # opened read only

    assert main(["edge", "requeue", "--db", str(db), "--dry-run", "--abandoned"]) == 0
    out = capsys.readouterr().out
    assert f"would requeue 1 dead letter(s) (export {CURRENT[:12]}: 1 refused INTERNAL)" in out
    assert again in out and "abandoned by" not in out
    assert _sha256(db) == before


def test_a_plain_requeue_leaves_abandoned_dead_letters_whose_images_were_processed_again(
    upgraded, capsys
):
    """The review's story: after a plain requeue each part has one final result, and the
    refused request of the current export is pending again."""
    db, ids = upgraded
    assert main(["edge", "requeue", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "requeued 1 dead letter(s)" in out and "left 3 whose image has a final result" in out
    verdicts = _verdicts(db)
    assert [verdicts[i] for i in ids["abandoned"]] == ["error"] * 3
    assert verdicts[ids["refused"][0]] == "pending"
    store = ResultStore(db)
    try:
        assert store.outbox_fingerprints() == {CURRENT: 1}  # nothing of v1 to deliver again
    finally:
        store.close()
    assert all(len(v) == 1 for v in _results_by_part(db).values())

    assert main(["edge", "requeue", "--db", str(db), "--abandoned"]) == 0  # asked for: no
    out = capsys.readouterr().out
    assert "requeued 0 dead letter(s)" in out
    assert "left 3 whose image has a final result since (processed again) (export " in out
    assert [_verdicts(db)[i] for i in ids["abandoned"]] == ["error"] * 3
    assert all(len(v) == 1 for v in _results_by_part(db).values())


def test_requeue_abandoned_skips_the_dead_letters_whose_images_were_processed_again(
    tmp_path, capsys
):
    """The second review's story: abandon, the images copied back into the hot folder and
    processed again with the current export, then `requeue --abandoned --fingerprint F`: it
    requeued them ("would requeue 2"), and each part got a second final "defect" result."""
    db = tmp_path / "cam.sqlite"
    store = ResultStore(db)
    abandoned = [_pending(store, n, RETIRED) for n in (1, 2, 3)]
    store.close()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", RETIRED[:12]]) == 0
    store = ResultStore(db)
    for n in (1, 2):  # parts 1 and 2 copied back into the hot folder; part 3 not
        image_id = _pending(store, n, CURRENT, again=True)
        assert store.complete(image_id, Answer([[1.0, 1.0, 9.0, 9.0]], [0.9], [1], ["scratch"]))
    store.close()
    capsys.readouterr()
    before = _sha256(db)
    command = ["edge", "requeue", "--db", str(db), "--abandoned", "--fingerprint", RETIRED[:12]]
    left = (
        f"2 whose image has a final result since (processed again) (export {RETIRED[:12]}: "
        "2 abandoned): requeued, each would get a second one"
    )
    assert main([*command, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would requeue 1 dead letter(s) (export {RETIRED[:12]}: 1 abandoned)" in out
    assert f"would leave {left}" in out
    assert _sha256(db) == before  # the dry run reads only

    assert main(command) == 0
    out = capsys.readouterr().out
    assert f"requeued 1 dead letter(s) (export {RETIRED[:12]}: 1 abandoned)" in out
    assert f"\nleft {left}" in out
    verdicts = _verdicts(db)
    assert [verdicts[i] for i in abandoned] == ["error", "error", "pending"]
    store = ResultStore(db)
    try:
        assert store.outbox_fingerprints() == {RETIRED: 1}  # part 3's request only
    finally:
        store.close()
    parts = _results_by_part(db)
    assert (parts["/hot/part1.png"], parts["/hot/part2.png"]) == (["defect"], ["defect"])


def test_the_store_never_requeues_a_dead_letter_whose_image_has_a_final_result(tmp_path):
    """Abandoned or refused, kept request or not: a dead letter whose image (the same content
    hash) has an ok or defect result in another row is left; an error row of it does not
    count. (A 150-byte cap keeps only the newest 100-byte request.)"""
    cap = OutboxCap(max_items=10, dead_letter_max_bytes=150)
    store = ResultStore(tmp_path / "edge.sqlite", cap)
    try:
        refused_ok = _refused(store, 1, CURRENT)  # processed again: ok
        store.record_ok(_arrival(1, again=True), 0.1, CURRENT, {})
        refused_quarantined = _refused(store, 2, CURRENT)  # again: quarantined, no result
        store.record_error(_arrival(2, again=True), "quarantine", "unreadable", CURRENT)
        refused_defect = _refused(store, 3, CURRENT)  # processed again: defect
        image_id = _pending(store, 3, CURRENT, again=True)
        assert store.complete(image_id, Answer([[1.0, 1.0, 9.0, 9.0]], [0.9], [1], ["scratch"]))
        abandoned = _pending(store, 5, RETIRED)  # abandoned, then processed again
        assert store.dead_letter_export(RETIRED, "abandoned by `splitdet edge abandon`: x") == 1
        image_id = _pending(store, 5, CURRENT, again=True)
        assert store.complete(image_id, Answer([], [], [], []))
        refused_kept = _refused(store, 4, CURRENT)  # the one kept request

        again = [refused_ok, refused_defect, abandoned]
        for asked in (False, True):
            done = store.requeue(dry_run=True, abandoned=asked)
            assert (done.requeued, done.processed_again) == ([refused_kept], again)
            assert (done.not_kept, done.abandoned_left, done.no_room) == (
                [refused_quarantined], [], [])  # fmt: skip
            assert done.letters[abandoned] == (RETIRED, "abandoned")
        done = store.requeue(abandoned=True)
        assert (done.requeued, done.processed_again) == ([refused_kept], again)
        assert store.requeue(abandoned=True).processed_again == again
        assert [r["verdict"] for r in store.results() if r["id"] in again] == ["error"] * 3
    finally:
        store.close()


def test_of_two_dead_letters_of_one_image_one_requeue_sends_the_oldest_once(tmp_path, capsys):
    """Image 6 refused, fed again and refused again: one call requeues the older dead letter
    only, and once it is answered the other counts as processed again. Image 7 refused, then
    fed again and still awaiting its answer: its dead letter is left while that row is pending."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    try:
        first = _refused(store, 6, CURRENT)
        image_id = _pending(store, 6, CURRENT, again=True)
        assert store.dead_letter(image_id, "dead letter: INTERNAL: a cloud bug")
        pending_twin = _refused(store, 7, CURRENT)
        _pending(store, 7, CURRENT, again=True)
        done = store.requeue(dry_run=True)
        assert (done.requeued, done.twin_on_its_way) == ([first], [image_id, pending_twin])
    finally:
        store.close()
    capsys.readouterr()
    assert main(["edge", "requeue", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert f"requeued 1 dead letter(s) (export {CURRENT[:12]}: 1 refused INTERNAL)" in out
    assert (
        f"left 2 whose image is already on its way to the cloud (another of its rows pending) "
        f"(export {CURRENT[:12]}: 2 refused INTERNAL): requeued, each would get a second result"
    ) in out
    store = ResultStore(db)
    try:
        assert store.outbox_stats().depth == 2  # image 7's pending row and image 6's requeued
        assert store.complete(first, Answer([[1.0, 1.0, 9.0, 9.0]], [0.9], [1], ["scratch"]))
        done = store.requeue()
        assert (done.requeued, done.processed_again) == ([], [image_id])
        assert done.twin_on_its_way == [pending_twin]
    finally:
        store.close()
    assert _results_by_part(db)["/hot/part6.png"] == ["defect"]


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("abandoned by `splitdet edge abandon`: no cloud serves model export 20cb any more",
         "abandoned"),
        ("dead letter: the cloud refused the request permanently: RESOURCE_EXHAUSTED: Received "
         "message larger than max (1234 vs. 1000)", "refused RESOURCE_EXHAUSTED"),
        ("dead letter: refused the cloud's answer, stored nothing: INTERNAL: label 99",
         "answer refused"),
        ("dead letter: the outbox holds a corrupt request (Error parsing message)",
         "corrupt request"),
        ("dead letter: INTERNAL: bug", "refused INTERNAL"),
        ("refused", "refused"),
        (None, "refused"),
    ],
)  # fmt: skip
def test_dead_letter_causes(reason, cause):
    assert dead_letter_cause(reason) == cause
