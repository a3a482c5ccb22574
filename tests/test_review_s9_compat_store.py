"""An edge store altered by another program or version is refused by name before anything
reads or writes it (review s9, compat).

1. A store lacking a column every store of its schema version has (dropped by a tool, a table
   rebuilt) was taken as sound: `edge status` read it, `edge results` failed with "no such
   column: reason", `edge run` only once it wrote its first result, none saying what to do.
2. A store of ours refused as damaged was said to carry "application_id 0x53504445, another
   program's": splitdet's own mark.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import StoreError
from splitdet.shared.cli import main


def _one_result(db: Path) -> None:
    with contextlib.closing(ResultStore(db)) as store:
        arrival = Arrival("/cam/a.png", "a.png|1|1|1", "0" * 64, 1, time.time())
        store.record_ok(arrival, 0.2, "fp", {}, threshold=0.5)


def _rows(db: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT id, path, verdict FROM images").fetchall()


@pytest.mark.parametrize(
    "action", [["status"], ["results", "--json"], ["prune", "--older-than", "1d"]]
)
def test_a_store_lacking_a_column_is_refused_by_name(store_db, capsys, action):
    _one_result(store_db)
    with contextlib.closing(sqlite3.connect(store_db)) as conn:
        conn.execute("DROP TRIGGER images_changed_update")  # (it names the column)
        conn.execute("ALTER TABLE images DROP COLUMN reason")
        conn.commit()
    before = _rows(store_db)
    assert main(["edge", *action, "--db", str(store_db)]) == 2
    err = capsys.readouterr().err
    assert f"{store_db}: a damaged splitdet edge store" in err, err
    assert "images.reason" in err and "restore it from a backup" in err, err
    assert "Traceback" not in err
    assert _rows(store_db) == before


def test_a_store_lacking_a_column_is_refused_before_the_writer_opens_it(store_db):
    _one_result(store_db)
    with contextlib.closing(sqlite3.connect(store_db)) as conn:
        conn.execute("ALTER TABLE outbox DROP COLUMN last_error")
        conn.commit()
    with pytest.raises(StoreError, match=r"outbox\.last_error"):
        ResultStore(store_db)
    assert len(_rows(store_db)) == 1


def test_added_columns_missing_or_unknown_ones_are_welcome(store_db, capsys):
    """A store of an earlier splitdet (no `edge` column) or with a newer one's extra column
    and table is still read."""
    _one_result(store_db)
    with contextlib.closing(sqlite3.connect(store_db)) as conn:
        conn.execute("ALTER TABLE images DROP COLUMN edge")
        conn.execute("ALTER TABLE images ADD COLUMN later TEXT")
        conn.execute("CREATE TABLE later_things (a INTEGER)")
        conn.commit()
    assert main(["edge", "results", "--db", str(store_db), "--json"]) == 0
    assert '"verdict": "ok"' in capsys.readouterr().out


def test_our_own_mark_is_not_called_another_programs(store_db, capsys):
    with contextlib.closing(sqlite3.connect(store_db)) as conn:
        conn.execute("DROP TABLE counters")
        conn.commit()
    assert main(["edge", "status", "--db", str(store_db)]) == 2
    err = capsys.readouterr().err
    assert "a damaged splitdet edge store" in err and "lacking counters" in err, err
    assert "another program's" not in err, err
