"""Mutant audit, second round: `edge.store_reads`' result filter.

`result_filter`: rows whose `updated` is "at or after ``since``" (`ResultStore.results`: "only
rows created or changed at or after this unix time"; `edge results --since`, `edge collect
--since`). A real store; the test names the one-line mutant it kills.
"""

from __future__ import annotations

import contextlib
import time

from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import iter_results


def test_since_takes_a_row_updated_at_that_very_time(tmp_path):
    """Kills: `updated >= ?` made `updated > ?` in `result_filter` (a row changed at the
    instant a consumer last read up to left out of its next read)."""
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        for n in range(2):
            arrival = Arrival(f"/hot/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())
            store.record_ok(arrival, 0.1, "f" * 64, {})
        second = store.results()[-1]
        assert second["id"] in [r["id"] for r in store.results(since=second["updated"])]
        assert [r["id"] for r in store.results(since=second["updated"] + 1e-3)] == []
    finally:
        store.close()


def test_a_change_cursor_keeps_the_id_bound_too(tmp_path):
    """Kills: the `id > after_id` condition dropped from `iter_results`' read in change order
    (`edge results --after-id 2 --changed-after 0` listed rows 1 and 2 as well: each filter
    narrows the rows, as the docstring lists them)."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    try:
        for n in range(3):
            arrival = Arrival(f"/hot/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())
            store.record_ok(arrival, 0.1, "f" * 64, {})
    finally:
        store.close()
    with contextlib.closing(open_readonly(db)) as conn:
        assert [r["id"] for r in iter_results(conn, changed_after=0)] == [1, 2, 3]
        assert [r["id"] for r in iter_results(conn, after_id=2, changed_after=0)] == [3]
