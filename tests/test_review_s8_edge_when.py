"""A script that polls the edge store with its own clock in milliseconds (JavaScript's
Date.now(), a PLC's timestamp) as a WHEN.

`parse_since` took any finite number as unix seconds: 1796661874296 ms, read as seconds, is
the year 58903. `edge status --arrived-until` and `edge collect --arrived-until` then failed
with a Python traceback printing the window (`datetime.fromtimestamp`: year out of range),
and `edge results --since` listed no row and exited 0, as if nothing had happened. Every WHEN
now has to lie on the calendar a clock shows (years 1 to 9999); otherwise the action says so,
exit 2, and a number that reads as milliseconds is shown as the time it would be.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from splitdet.edge.cli_edge_options import clock_text, parse_since
from splitdet.edge.store import Arrival, ResultStore
from splitdet.shared.cli import CommandError

from support import run_main

#: The arrival of the one image in the store: a whole second, an hour ago.
ARRIVED = float(int(time.time()) - 3600)
#: That time as a script's millisecond clock writes it.
MILLISECONDS = str(int(ARRIVED * 1000))


@pytest.fixture
def store(tmp_path):
    """A real edge store holding one ok result that arrived at ARRIVED."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as results:
        results.record_ok(Arrival("/cam/a.png", "a|1|2|3", "0" * 64, 1, ARRIVED), 0.1, "a" * 64, {})
    return db


@pytest.mark.parametrize(
    "argv",
    [
        ("edge", "status", "--arrived-until", MILLISECONDS),
        ("edge", "results", "--json", "--since", MILLISECONDS),
        ("edge", "results", "--json", "--arrived-from", MILLISECONDS),
    ],
    ids=["status", "results-since", "results-arrived-from"],
)
def test_a_when_in_milliseconds_is_refused_naming_it(store, capsys, argv):
    code, out, err = run_main(capsys, *argv, "--db", store)
    assert code == 2 and not out, (code, out, err)
    assert "Traceback" not in err
    assert f"'{MILLISECONDS}': a time outside the years 1 to 9999" in err, err
    assert f"as milliseconds it is {clock_text(ARRIVED)}: give unix seconds" in err, err


def test_collect_refuses_it_before_writing_anything(store, tmp_path, capsys):
    out_dir = tmp_path / "review"
    code, _, err = run_main(
        capsys, "edge", "collect", "--db", store, "--out", out_dir, "--arrived-until", MILLISECONDS
    )
    assert code == 2 and "a time outside the years 1 to 9999" in err, (code, err)
    assert not out_dir.exists()


def test_an_age_reaching_before_year_one_is_refused_and_ordinary_whens_still_read():
    with pytest.raises(CommandError, match=r"--arrived-from '100000000d': a time outside"):
        parse_since("100000000d", ARRIVED, "--arrived-from")
    assert parse_since(str(ARRIVED), ARRIVED) == ARRIVED  # unix seconds as before
    assert parse_since("-5", ARRIVED) == -5.0  # (1969: a clock shows it)
    assert parse_since("2h", ARRIVED) == ARRIVED - 7200
