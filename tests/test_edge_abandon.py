"""`splitdet edge abandon`: the waiting requests of a model export that no cloud will serve
again become dead letters (kept for `edge requeue`), the other exports' requests untouched.
Before, they waited in the outbox for good: retried every --retry-max with an ERROR line, the
oldest-pending alert firing, `prune` never deleting pending rows and `requeue` only taking
dead letters (a rollout review). And `edge results --fingerprint`: one export's rows, the
table naming each row's export."""

from __future__ import annotations

import json
import time

import pytest

from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.shared.cli import main

RETIRED = "aaaaaaaa1" + "0" * 55
CURRENT = "aaaaaaaa2" + "0" * 55


@pytest.fixture
def db(tmp_path):
    """A store with 3 requests of the retired export and 1 of the current one waiting."""
    path = tmp_path / "edge.sqlite"
    store = ResultStore(path)
    for n, fingerprint in enumerate([RETIRED, RETIRED, CURRENT, RETIRED]):
        arrival = Arrival(f"/hot/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())
        store.record_pending(arrival, 0.9, f"r{n}", b"payload", fingerprint, {})
    store.close()
    return path


def _status(path):
    db = open_readonly(path)
    try:
        return store_status(db)
    finally:
        db.close()


def test_abandon_dead_letters_one_exports_requests_and_requeue_brings_them_back(db, capsys):
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", "AAAAAAAA1",
                 "--dry-run"]) == 0  # fmt: skip
    assert "would make 3 request(s) of export aaaaaaaa1" in capsys.readouterr().out
    assert _status(db)["outbox"]["requests"] == 4  # a dry run changes nothing

    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", RETIRED]) == 0
    assert "made 3 request(s)" in capsys.readouterr().out
    status = _status(db)
    assert status["outbox"]["by_model"] == {CURRENT: 1}
    assert status["dead_letters"]["kept"] == 3 and status["verdicts"]["error"] == 3
    rows = {r["request_id"]: r for r in ResultStore(db).results()}
    assert rows["r0"]["error_kind"] == "dead_letter" and "abandoned" in rows["r0"]["reason"]
    assert rows["r0"]["attempts"] == 0  # not a send attempt
    assert rows["r2"]["verdict"] == "pending"

    # the export served after all (a plain requeue leaves abandoned dead letters)
    assert main(["edge", "requeue", "--db", str(db), "--abandoned"]) == 0
    assert _status(db)["outbox"]["by_model"] == {RETIRED: 3, CURRENT: 1}


def test_abandon_keeps_requests_within_the_daemons_dead_letter_cap(tmp_path, capsys):
    """abandon kept the dead letters within the built-in 256 MB whatever the daemon's
    --dead-letter-max-mb, dropping requests the README says requeue sends again. It takes the
    daemon's cap now, and says what it dropped."""
    path = tmp_path / "edge.sqlite"
    store = ResultStore(path)
    for n in range(3):  # three 100 MB requests (the size column is what the cap counts)
        arrival = Arrival(f"/hot/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())
        store.record_pending(arrival, 0.9, f"r{n}", b"payload", RETIRED, {})
    store._db.execute("UPDATE outbox SET size_bytes = 100000000")
    store._db.commit()
    store.close()
    wide = tmp_path / "wide.sqlite"
    wide.write_bytes(path.read_bytes())

    assert main(["edge", "abandon", "--db", str(wide), "--fingerprint", RETIRED,
                 "--dead-letter-max-mb", "1000"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "3 dead letter(s) kept for requeue" in out and "dropped" not in out
    assert _status(wide)["dead_letters"]["kept"] == 3

    assert main(["edge", "abandon", "--db", str(path), "--fingerprint", RETIRED]) == 0
    out = capsys.readouterr().out
    assert "2 dead letter(s) kept for requeue" in out
    assert "1 kept request(s) dropped" in out and "--dead-letter-max-mb 256" in out


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("aaaa", "first 8 or more hex digits"),
        ("not-hex!", "first 8 or more hex digits"),
        ("aaaaaaaa", "names 2 exports"),
    ],
)
def test_abandon_refuses_what_names_no_single_export(db, capsys, given, said):
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", given]) == 2
    assert said in capsys.readouterr().err
    assert _status(db)["outbox"]["requests"] == 4


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_abandon_with_nothing_of_that_export_waiting_is_done(db, capsys, dry_run):
    """An export retired on every edge of a line: the edges with nothing waiting for it failed
    (exit 2), so a script abandoning it fleet-wide saw failures where there was nothing to do.
    Now exit 0, saying there was nothing to abandon and what the outbox holds."""
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", "bbbbbbbb", *dry_run]) == 0
    out = capsys.readouterr().out
    assert "nothing to abandon: no request in the outbox was made with export bbbbbbbb" in out
    assert RETIRED[:12] in out and _status(db)["outbox"]["requests"] == 4


def test_results_show_and_filter_by_export(db, capsys):
    """Before: no export in the table, and no way to list one export's results but the JSON."""
    assert main(["edge", "results", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "export" in lines[0] and sum(RETIRED[:12] in line for line in lines) == 3
    assert main(["edge", "results", "--db", str(db), "--fingerprint", "AAAAAAAA2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["request_id"] for r in rows] == ["r2"] and rows[0]["fingerprint"] == CURRENT
