"""The edge's read commands when the wall clock steps or local time is unclear.

A. `edge results --after-id N`: a consumer's cursor no clock step moves. Before, the only cursor
   was --since (the wall clock), which never lists the rows written after the clock steps back.
B. Local times are printed with their UTC offset (the results table's `finished`, `edge
   status`'s last image and result, its "intake stopped since"). Before, the two 01:30 of the
   night the clocks go back printed alike.
C. `--since` given as a local time the clocks skip (a daylight saving gap) or pass twice (its
   end) is refused, naming it and the offsets that make it one instant. Before, it was taken
   silently (the first of the two, or a time an hour off).
D. `edge status` after the clock was set back below a failed send's stamp: the next try is said
   to be due, its stamp ahead of the clock. Before: `next try in 2.0 d (the sender pauses after
   a failed send)` while the sender waits its --retry-max at most.
E. `edge status` counts the results stamped ahead of the clock (written while it ran ahead).
   Before, nothing said so: `last result` named a date a year away.

In-process, no model, no network: each test makes its own store.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from splitdet.edge.cli_edge_options import parse_since
from splitdet.edge.cli_edge_status import _stall_lines
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.edge.store_file import WriterLock
from splitdet.shared.cli import CommandError, main

FINGERPRINT = "c" * 64
DAY = 86400.0
REAL_TIME = time.time


def _arrival(n: int) -> Arrival:
    return Arrival(f"/hot/img{n}.png", f"img{n}.png|100|{n}|{n}", f"{n:064x}", 100, time.time())


def _answer() -> Answer:
    return Answer(boxes=[[1.0, 2.0, 3.0, 4.0]], scores=[0.9], labels=[1],
                  class_names=["scratch"], timings={"round_trip": 0.01})  # fmt: skip


@contextlib.contextmanager
def _clock(monkeypatch: pytest.MonkeyPatch, offset_s: float) -> Iterator[None]:
    """The wall clock (time.time) `offset_s` off meanwhile, as after a step (the monotonic
    clocks untouched)."""
    monkeypatch.setattr(time, "time", lambda: REAL_TIME() + offset_s)
    try:
        yield
    finally:
        monkeypatch.setattr(time, "time", REAL_TIME)


@contextlib.contextmanager
def _local_zone(name: str) -> Iterator[None]:
    """This process's local time zone is `name` meanwhile (TZ and time.tzset, restored)."""
    if not Path("/usr/share/zoneinfo", name).exists():
        pytest.skip(f"no time zone data for {name}")
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def _utc(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()


def _out(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------ A. a clock-free cursor


def test_a_consumer_polling_by_id_sees_the_rows_written_after_the_clock_steps_back(
    tmp_path, capsys, monkeypatch
):
    """Before: `--after-id` did not exist (exit 2); a consumer polling with --since the time of
    its last poll never saw the row written after the clock stepped back an hour."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
    rows = json.loads(_out(capsys, "edge", "results", "--db", str(db), "--json"))
    cursor, last_poll = rows[-1]["id"], time.time() + 1
    with _clock(monkeypatch, -3600.0), contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(2), 0.1, FINGERPRINT, {})  # (NTP stepped the clock back)

    by_time = _out(capsys, "edge", "results", "--db", str(db), "--json", "--since", str(last_poll))
    assert json.loads(by_time) == []  # (what --since does: the epilog says so)
    by_id = json.loads(
        _out(capsys, "edge", "results", "--db", str(db), "--json", "--after-id", str(cursor))
    )
    assert [(r["id"], r["path"]) for r in by_id] == [(cursor + 1, "/hot/img2.png")]
    text = _out(capsys, "edge", "results", "--db", str(db), "--csv", "--after-id", str(cursor))
    [row] = list(csv.DictReader(io.StringIO(text)))  # (the CSV carries the id too)
    assert row["id"] == str(cursor + 1)
    assert _out(capsys, "edge", "results", "--db", str(db), "--json", "--after-id",
                str(cursor + 1)) == "[\n]\n"  # fmt: skip
    help_text = _out_help(capsys, "edge", "results", "--help")
    assert "--after-id N lists the rows with an" in help_text
    assert "misses the rows written after the clock steps back" in help_text


def _out_help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code == 0
    return capsys.readouterr().out


def test_the_id_cursor_rule_for_pending_rows_misses_no_later_answer(tmp_path, capsys):
    """The epilog's rule: the next cursor is the id before the first pending row listed, so the
    cloud's later answer to it is listed (a cursor past it would have missed the change)."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
        pending, _, _ = store.record_pending(_arrival(2), 0.9, "r2", b"x", FINGERPRINT, {})
        store.record_ok(_arrival(3), 0.1, FINGERPRINT, {})

    def poll(after: int) -> tuple[list[dict], int]:
        rows = json.loads(
            _out(capsys, "edge", "results", "--db", str(db), "--json", "--after-id", str(after))
        )
        waiting = [r["id"] for r in rows if r["verdict"] == "pending"]
        nxt = waiting[0] - 1 if waiting else (rows[-1]["id"] if rows else after)
        return rows, nxt

    rows, cursor = poll(0)
    assert [r["verdict"] for r in rows] == ["ok", "pending", "ok"] and cursor == pending - 1
    with contextlib.closing(ResultStore(db)) as store:
        assert store.complete(pending, _answer())
    rows, cursor = poll(cursor)
    assert [(r["id"], r["verdict"]) for r in rows] == [(pending, "defect"), (pending + 1, "ok")]
    assert cursor == pending + 1 and poll(cursor)[0] == []


def test_after_id_takes_a_cursor_and_refuses_what_is_not_one(tmp_path, capsys):
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
    for cursor, listed in (("0", 1), ("1", 0)):
        rows = _out(capsys, "edge", "results", "--db", str(db), "--json", "--after-id", cursor)
        assert len(json.loads(rows)) == listed
    assert main(["edge", "results", "--db", str(db), "--after-id", str(2**63 - 1)]) == 2
    assert "is past the last id this store gave, 1" in capsys.readouterr().err
    for bad in ("-1", "x", str(2**63)):
        with pytest.raises(SystemExit) as refused:
            main(["edge", "results", "--db", str(db), "--after-id", bad])
        assert refused.value.code == 2 and "--after-id" in capsys.readouterr().err


# ----------------------------------------------------------- B. local times with an offset


def test_times_an_hour_apart_at_the_end_of_dst_print_apart(tmp_path, capsys, monkeypatch):
    """Before: both results' `finished` printed as 2026-11-01 01:30:05 (no offset), and so did
    `edge status`'s last result."""
    db = tmp_path / "edge.sqlite"
    first = _utc(2026, 11, 1, 5, 30, 5)  # 01:30:05 EDT, then 01:30:05 EST an hour later
    for n, at in enumerate((first, first + 3600), 1):
        with _clock(monkeypatch, at - REAL_TIME()), contextlib.closing(ResultStore(db)) as store:
            store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
    with _local_zone("America/New_York"):
        table = _out(capsys, "edge", "results", "--db", str(db))
        status = _out(capsys, "edge", "status", "--db", str(db))
        stall = _stall_lines({"outbox_full_since": first + 3600,
                              "outbox_caps": {"requests": 5, "bytes": 5e6}},
                             {"requests": 5, "bytes": 4e6})  # fmt: skip
    lines = table.splitlines()
    assert lines[0].index("export") == lines[1].index("c" * 12), table  # (columns aligned)
    assert "2026-11-01 01:30:05 -0400" in lines[1] and "2026-11-01 01:30:05 -0500" in lines[2]
    assert lines[1].index("/hot/") == lines[2].index("/hot/") == lines[0].index("path")
    assert "last result 2026-11-01 01:30:05 -0500" in status, status
    assert "intake stopped since 01:30:05 -0500 (" in stall[0], stall


# --------------------------------------------------------- C. --since at a DST change


def test_since_refuses_a_local_time_the_clocks_skip(tmp_path, capsys):
    """Before: 2026-03-29T02:30 in Europe/Berlin (which does not exist) was taken silently."""
    db = tmp_path / "edge.sqlite"
    ResultStore(db).close()
    with _local_zone("Europe/Berlin"):
        with pytest.raises(CommandError) as refused:
            parse_since("2026-03-29T02:30")
        assert main(["edge", "results", "--db", str(db), "--since", "2026-03-29T02:30"]) == 2
        err = capsys.readouterr().err
        assert parse_since("2026-03-29T01:30") == _utc(2026, 3, 29, 0, 30)  # (before the gap)
    message = str(refused.value)
    assert message.startswith("--since '2026-03-29T02:30': 2026-03-29 02:30:00 does not exist")
    assert "+01:00" in message and "offset" in message and "Z" in message
    assert "does not exist in the local time zone" in err


def test_since_refuses_a_local_time_the_clocks_pass_twice(tmp_path, capsys):
    """Before: 2026-11-01T01:45 in America/New_York was taken silently as its first (EDT)."""
    db = tmp_path / "edge.sqlite"
    ResultStore(db).close()
    with _local_zone("America/New_York"):
        with pytest.raises(CommandError) as refused:
            parse_since("2026-11-01T01:45")
        assert main(["edge", "collect", "--db", str(db), "--out", str(tmp_path / "r"),
                     "--since", "2026-11-01T01:45"]) == 2  # fmt: skip
        err = capsys.readouterr().err
        # an offset or a Z makes it one instant; a time away from the change is as before
        assert parse_since("2026-11-01T01:45-04:00") == _utc(2026, 11, 1, 5, 45)
        assert parse_since("2026-11-01T01:45-05:00") == _utc(2026, 11, 1, 6, 45)
        assert parse_since("2026-11-01T06:45Z") == _utc(2026, 11, 1, 6, 45)
        assert parse_since("2026-11-01T03:00") == _utc(2026, 11, 1, 8)
    message = str(refused.value)
    assert "occurs twice" in message, message
    assert "2026-11-01T01:45:00-04:00 for the first" in message
    assert "2026-11-01T01:45:00-05:00 for the second" in message
    assert "occurs twice in the local time zone" in err


# ------------------------------------------------------- D. the next try after a step back


def test_status_does_not_wait_out_a_failed_sends_stamp_after_the_clock_is_set_back(
    tmp_path, capsys, monkeypatch
):
    """Before: `next try in 2.0 d (the sender pauses after a failed send)`, the failed send
    having been stamped before the clock was set back two days."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        ids = [store.record_pending(_arrival(n), 0.9, f"r{n}", b"x", FINGERPRINT, {})[0]
               for n in (1, 2)]  # fmt: skip
        with _clock(monkeypatch, 2 * DAY):  # (the clock ran two days ahead)
            for image_id in ids:
                store.retry_later(image_id, time.time() + 20, "UNAVAILABLE: connection refused")
    lock = WriterLock(db)  # (a daemon runs: its sender is the one to try)
    try:
        text = _out(capsys, "edge", "status", "--db", str(db))
        outbox = json.loads(_out(capsys, "edge", "status", "--db", str(db), "--json"))["outbox"]
    finally:
        lock.release()
    assert "next try in" not in text, text
    assert "next try due (its stamp is 2.0 d ahead of the clock: the clock was set back" in text
    assert outbox["sender_waits_s"] is None
    assert 2 * DAY < outbox["next_try_ahead_s"] < 2 * DAY + 30


def test_status_still_counts_the_senders_pause_when_the_clock_is_right(tmp_path, capsys):
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        image_id, _, _ = store.record_pending(_arrival(1), 0.9, "r1", b"x", FINGERPRINT, {})
        store.retry_later(image_id, time.time() + 600, "UNAVAILABLE: connection refused")
    lock = WriterLock(db)
    try:
        text = _out(capsys, "edge", "status", "--db", str(db))
        outbox = json.loads(_out(capsys, "edge", "status", "--db", str(db), "--json"))["outbox"]
    finally:
        lock.release()
    assert re.search(r"next try in \d+\.\d min \(the sender pauses after a failed send\)", text)
    assert outbox["next_try_ahead_s"] is None and 500 < outbox["sender_waits_s"] <= 600


# ------------------------------------------------------- E. results stamped in the future


def test_status_counts_results_stamped_ahead_of_the_clock(tmp_path, capsys, monkeypatch):
    """Before: `last result 2027-...` and nothing saying the stamps lie ahead of the clock."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
        with _clock(monkeypatch, 365 * DAY):  # (a bad time source: a year ahead)
            store.record_ok(_arrival(2), 0.1, FINGERPRINT, {})
            ahead, _ = store.record_ok(_arrival(3), 0.1, FINGERPRINT, {})
        store.rekey(ahead, "img3.png|100|3|99")  # (changed since, by the clock set right)
    text = _out(capsys, "edge", "status", "--db", str(db))
    summary = json.loads(_out(capsys, "edge", "status", "--db", str(db), "--json"))
    assert re.search(r"^ {14}2 results stamped ahead of the clock \(written while it ran ahead; "
                     r"the furthest 365\.0 d ahead\)", text, re.M), text  # fmt: skip
    assert summary["stamped_ahead"]["results"] == 2
    assert 365 * DAY - 60 < summary["stamped_ahead"]["furthest_s"] <= 365 * DAY

    right = tmp_path / "right.sqlite"
    with contextlib.closing(ResultStore(right)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
    assert "stamped ahead" not in _out(capsys, "edge", "status", "--db", str(right))
    summary = json.loads(_out(capsys, "edge", "status", "--db", str(right), "--json"))
    assert summary["stamped_ahead"] == {"results": 0, "furthest_s": None}


@pytest.mark.parametrize("when", ["0001-01-01", "9999-12-31T23:59:59"])
def test_since_at_the_ends_of_the_calendar_is_one_line(when, tmp_path, capsys):
    """A review: a local time at either end of datetime's range ended in a traceback
    (`ValueError: year 0 is out of range`), where it had been the one-line refusal."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
    assert main(["edge", "results", "--db", str(db), "--since", when]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--since {when!r}" in err, err
