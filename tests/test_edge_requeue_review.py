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
    assert f"would requeue 1 dead letter(s) (export {CURRENT[:12]}: 1 refused INTERNAL)" in out
    assert (
        f"would leave 3 abandoned by `splitdet edge abandon` (export {RETIRED[:12]}: 3 abandoned)"
        ": --abandoned requeues them too, but not once their images were processed again"
    ) in out
    assert _sha256(db) == before  # opened read only

    assert main(["edge", "requeue", "--db", str(db), "--dry-run", "--abandoned"]) == 0
    out = capsys.readouterr().out
    assert f"would requeue 4 dead letter(s) (export {RETIRED[:12]}: 3 abandoned; " in out
    assert "abandoned by" not in out
    assert _sha256(db) == before


def test_a_plain_requeue_leaves_abandoned_dead_letters_whose_images_were_processed_again(
    upgraded, capsys
):
    """The review's story: after a plain requeue each part has one final result, and the
    refused request of the current export is pending again."""
    db, ids = upgraded
    assert main(["edge", "requeue", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "requeued 1 dead letter(s)" in out and "left 3 abandoned" in out
    verdicts = _verdicts(db)
    assert [verdicts[i] for i in ids["abandoned"]] == ["error"] * 3
    assert verdicts[ids["refused"][0]] == "pending"
    store = ResultStore(db)
    try:
        assert store.outbox_fingerprints() == {CURRENT: 1}  # nothing of v1 to deliver again
    finally:
        store.close()
    assert all(len(v) == 1 for v in _results_by_part(db).values())

    assert main(["edge", "requeue", "--db", str(db), "--abandoned"]) == 0  # asked for
    assert "requeued 3 dead letter(s) (export 20cbbe61588c: 3 abandoned)" in (
        capsys.readouterr().out
    )
    assert [_verdicts(db)[i] for i in ids["abandoned"]] == ["pending"] * 3


def test_the_abandoned_reason_and_help_say_not_to_requeue_reprocessed_images(upgraded, capsys):
    db, ids = upgraded
    with closing(sqlite3.connect(db)) as conn:
        [reason] = conn.execute("SELECT reason FROM images WHERE id = ?", (ids["abandoned"][0],))
    assert "`splitdet edge requeue --abandoned` sends it again" in reason[0]
    with pytest.raises(SystemExit):
        main(["edge", "abandon", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "never requeue these dead letters, or each image gets a second final result" in text


def test_requeue_takes_one_exports_dead_letters_by_fingerprint_prefix(tmp_path, capsys):
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    current = [_refused(store, n, CURRENT) for n in (1, 2)]
    other = _refused(store, 3, OTHER)
    store.close()
    before = _sha256(db)
    for given, said in [
        ("3c5823c7", "--fingerprint 3c5823c7 names 2 exports"),
        ("ffffffff", "no dead letter was made with export ffffffff; the dead letters are of: "
                     f"{CURRENT[:12]} (2), {OTHER[:12]} (1)"),
        ("3c58", "first 8 or more hex digits"),
    ]:  # fmt: skip
        assert main(["edge", "requeue", "--db", str(db), "--fingerprint", given]) == 2
        assert said in capsys.readouterr().err
    assert _sha256(db) == before  # a refused --fingerprint changes nothing

    assert main(["edge", "requeue", "--db", str(db), "--fingerprint", CURRENT[:12].upper()]) == 0
    assert f"requeued 2 dead letter(s) (export {CURRENT[:12]}: 2 refused INTERNAL)" in (
        capsys.readouterr().out
    )
    verdicts = _verdicts(db)
    assert [verdicts[i] for i in current] == ["pending"] * 2 and verdicts[other] == "error"


def test_abandoned_dead_letters_without_their_request_are_not_called_to_reprocess(tmp_path, capsys):
    """Abandoned with no room to keep their requests: a plain requeue told the user to process
    their images again, which (once done already) gives each a second result."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    for n in (1, 2):
        _pending(store, n, RETIRED)
    store.close()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", RETIRED,
                 "--dead-letter-max-mb", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["edge", "requeue", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "requeued 0 dead letter(s)" in out and "left 2 abandoned" in out
    assert "process their images again" not in out
    assert main(["edge", "requeue", "--db", str(db), "--abandoned"]) == 0
    assert "2 (export 20cbbe61588c: 2 abandoned) without a kept request" in (
        capsys.readouterr().out
    )


def test_the_store_leaves_abandoned_dead_letters_unless_asked(tmp_path):
    store = ResultStore(tmp_path / "edge.sqlite", OutboxCap(max_items=10))
    try:
        refused = _refused(store, 1, CURRENT)
        abandoned = _pending(store, 2, RETIRED)
        assert store.dead_letter_export(RETIRED, "abandoned by `splitdet edge abandon`: x") == 1
        assert store.dead_letter_exports() == {CURRENT: 1, RETIRED: 1}
        done = store.requeue(dry_run=True)
        assert (done.requeued, done.abandoned_left) == ([refused], [abandoned])
        assert done.letters == {refused: (CURRENT, "refused INTERNAL"),
                                abandoned: (RETIRED, "abandoned")}  # fmt: skip
        assert store.requeue_dead_letters() == ([refused], [], [])
        assert store.requeue(fingerprint=RETIRED).requeued == []
        assert store.requeue(abandoned=True, fingerprint=RETIRED).requeued == [abandoned]
    finally:
        store.close()


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
