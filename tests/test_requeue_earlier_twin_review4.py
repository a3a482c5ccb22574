"""`splitdet edge requeue` and a dead letter whose image has an identical EARLIER twin (a review
of the weekly collect → relabel → merge → retrain loop).

A re-fed frame (the same bytes as one judged before) is processed again as a new image; its
request became a dead letter (its export abandoned). `edge requeue --abandoned` never requeued
it, saying its image "has a final result since (processed again)": the requeue joined every
ok/defect row of the same content hash, the older twin's too, so the dead letter never got a
result. Now only a final result in a later row (processed again after the dead letter) leaves
it; an earlier twin does not."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import main

RETIRED = "4bf7bcd44e52" + "4" * 52  # the export whose requests were abandoned
ANSWER = Answer([[1.0, 1.0, 9.0, 9.0]], [0.9], [1], ["scratch"])


def _arrival(n: int, shot: int) -> Arrival:
    """Image n's `shot`-th arrival: a file of its own (its own key), image n's bytes."""
    key = f"shot{n}-{shot}.png|100|{shot}|{n}"
    return Arrival(f"/hot/shot{n}-{shot}.png", key, f"{n:064x}", 100, time.time())


def _pending(store: ResultStore, n: int, shot: int) -> int:
    image_id, _, verdict = store.record_pending(
        _arrival(n, shot), 0.9, f"req-{n}-{shot}", b"x" * 100, RETIRED, {}
    )
    assert verdict == "pending"
    return image_id


def _judged(store: ResultStore, n: int, shot: int) -> int:
    """A flagged image of image n's bytes, answered (defect)."""
    image_id = _pending(store, n, shot)
    assert store.complete(image_id, ANSWER)
    return image_id


def _verdicts(db: Path) -> dict[int, str]:
    with closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT id, verdict FROM images"))


def test_an_earlier_twin_does_not_stop_a_requeue_a_later_one_does(tmp_path, capsys):
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    _judged(store, 1, 1)  # image 1 judged, then re-fed: its second request waits
    after_twin = _pending(store, 1, 2)
    refed = _pending(store, 2, 1)  # image 2 waits, and is processed again later (below)
    store.close()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", RETIRED[:12]]) == 0
    store = ResultStore(db)
    again = _judged(store, 2, 2)  # image 2 copied back into the hot folder: judged since
    store.close()
    capsys.readouterr()

    assert main(["edge", "requeue", "--db", str(db), "--abandoned"]) == 0
    out = capsys.readouterr().out
    # before: "requeued 0", "left 2 whose image has a final result since (processed again)"
    assert f"requeued 1 dead letter(s) (export {RETIRED[:12]}: 1 abandoned)" in out, out
    assert "left 1 whose image has a final result since (processed again)" in out, out
    verdicts = _verdicts(db)
    assert verdicts[after_twin] == "pending"  # back in the outbox: it gets its own result
    assert (verdicts[refed], verdicts[again]) == ("error", "defect")  # not a second result


def test_a_twin_requeued_and_judged_after_the_dead_letter_stops_its_requeue(tmp_path, capsys):
    """Row 1 abandoned, its image copied back (row 2) and abandoned under another export; row
    1 requeued and judged: row 2's image has a result since, in a row of a lower id. The
    first version of the earlier-twin rule requeued row 2 too: a second final result."""
    db = tmp_path / "edge.sqlite"
    other = "b" * 64
    store = ResultStore(db)
    first = _pending(store, 1, 1)
    store.close()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", RETIRED[:12]]) == 0
    store = ResultStore(db)
    image_id, _, _ = store.record_pending(_arrival(1, 2), 0.9, "req-copy", b"x" * 100, other, {})
    store.close()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", other[:12]]) == 0
    assert main(["edge", "requeue", "--db", str(db), "--abandoned", "--fingerprint",
                 RETIRED[:12]]) == 0  # fmt: skip
    store = ResultStore(db)
    assert store.complete(first, ANSWER)  # row 1 judged now, after row 2 was refused
    store.close()
    capsys.readouterr()

    assert main(["edge", "requeue", "--db", str(db), "--abandoned"]) == 0
    out = capsys.readouterr().out
    assert "left 1 whose image has a final result since (processed again)" in out, out
    assert _verdicts(db) == {first: "defect", image_id: "error"}
