"""A shift supervisor's question: "how many defects did camera 3 find between 06:00 and 14:00,
and how many are still pending?", and "collect that shift's images for review".

`edge results` had --arrived-from/--arrived-until (a shift by arrival, half-open); `edge
status` summarised the whole store only and `edge collect` chose from every arrival. Both now
take the same window, parsed, described and refused as `edge results` does:

A. `edge status`: what is about images (by verdict, error kind, frame warning, export, the
   last image and result) counts only the window's; the outbox, dead letters, daemon,
   counters and file stay the whole store's, and both the text and --json say which is which
   (JSON: the window's bounds).
B. `edge collect`: only the window's results go into collected.csv and the tree, and the
   summary (text and --json) names the window.
C. One definition: the same help, the same refusals, the same warning for a shift not over.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image
from test_edge_results_shift_review import local_zone

from splitdet.edge.cli_edge_options import clock_text
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import build_parser

from support import run_main

FP_A, FP_B = "a" * 64, "b" * 64
#: The shift's bounds, whole seconds well in the past (no "shift not over" warning).
T0 = float(int(time.time()) - 20 * 3600)
T1 = T0 + 8 * 3600
SHIFT = ("--arrived-from", str(T0), "--arrived-until", str(T1))


def _arrival(name: str, arrived: float, path: str | None = None) -> Arrival:
    """The arrival of NAME at unix s `arrived` (its file hashed when `path` names one)."""
    path = path or f"/cam/{name}"
    file = Path(path)
    digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else (
        hashlib.sha256(name.encode()).hexdigest())  # fmt: skip
    return Arrival(path, f"{name}|1|2|3", digest, 1, arrived)


def _defect(store: ResultStore, name: str, arrived: float, path: str | None = None) -> int:
    row, _, _ = store.record_pending(
        _arrival(name, arrived, path), 0.9, f"r-{name}", b"x", FP_B, {}, stored_path=path
    )
    answer = Answer(boxes=[[1.0, 1.0, 9.0, 9.0]], scores=[0.9], labels=[1],
                    class_names=["scratch"])  # fmt: skip
    assert store.complete(row, answer)
    return row


@pytest.fixture
def shifts(tmp_path) -> Path:
    """A store of three shifts: before T0, the shift [T0, T1), after T1 (images at T0 in the
    shift, at T1 in the next). In the shift: ok 2 (one a blank frame), defect 1, pending 1,
    error 2 (a quarantine, a dead letter); exports A 3, B 3. Outside it: an ok and a pending
    before, an ok and a dead letter after: the store's outbox holds 2 requests, its dead
    letters 2."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival("night.png", T0 - 60), 0.1, FP_A, {})
        night, _, _ = store.record_pending(_arrival("night-flag.png", T0 - 30), 0.9, "r0", b"x",
                                           FP_A, {})  # fmt: skip
        store.record_ok(_arrival("boundary.png", T0), 0.1, FP_A, {})
        store.record_ok(_arrival("cap.png", T0 + 10), 0.1, FP_A, {}, warnings=("blank_frame",))
        _defect(store, "scratch.png", T0 + 20)
        store.record_pending(_arrival("waiting.png", T0 + 30), 0.9, "r1", b"x", FP_B, {})
        store.record_error(_arrival("torn.png", T0 + 40), "quarantine", "truncated", FP_A)
        dead, _, _ = store.record_pending(_arrival("refused.png", T0 + 50), 0.9, "r2", b"x",
                                          FP_B, {})  # fmt: skip
        store.dead_letter(dead, "dead letter: INTERNAL: bug")
        store.record_ok(_arrival("late.png", T1), 0.1, FP_A, {})
        late, _, _ = store.record_pending(_arrival("late-refused.png", T1 + 10), 0.9, "r3", b"x",
                                          FP_A, {})  # fmt: skip
        store.dead_letter(late, "dead letter: INTERNAL: bug")
        store.retry_later(night, time.time() + 60, "cloud unreachable")  # (its `updated` moves)
    return db


def _status_json(capsys, db: Path, *options: object) -> dict:
    code, out, err = run_main(capsys, "edge", "status", "--db", db, "--json", *options)
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------ A. edge status


def test_status_counts_the_shifts_images_and_the_whole_stores_outbox_and_dead_letters(
    shifts, capsys
):
    whole = _status_json(capsys, shifts)
    shift = _status_json(capsys, shifts, *SHIFT)
    assert shift["verdicts"] == {"ok": 2, "defect": 1, "pending": 1, "error": 2}
    assert shift["errors"] == {"dead_letter": 1, "quarantine": 1}
    assert shift["warnings"]["blank_frame"] == 1
    assert {fp: m["results"] for fp, m in shift["results_by_model"].items()} == {
        FP_A: 3, FP_B: 3}  # fmt: skip
    assert shift["last_arrival"] == T0 + 50  # (the shift's last image, not the store's)
    # the whole store's, whatever the window: the pending image of the night before is in the
    # outbox, the dead letter after the shift among the dead letters
    assert shift["outbox"]["requests"] == whole["outbox"]["requests"] == 2
    assert shift["dead_letters"] == whole["dead_letters"] == {
        "kept": 2, "kept_bytes": 2, "not_kept": 0}  # fmt: skip
    assert shift["counters"] == whole["counters"]
    assert shift["store"] == whole["store"] == {"images": 10, "last_arrival": T1 + 10}
    assert whole["verdicts"] == {"ok": 4, "defect": 1, "pending": 2, "error": 3}


def test_status_json_says_the_windows_bounds_and_which_keys_it_restricts(shifts, capsys):
    shift = _status_json(capsys, shifts, *SHIFT)
    window = shift["window"]
    assert (window["arrived_from"], window["arrived_until"]) == (T0, T1)
    assert set(window["windowed"]) == {"verdicts", "errors", "warnings", "last_arrival",
                                       "last_finished", "results_by_model"}  # fmt: skip
    assert {"outbox", "dead_letters", "daemon", "counters", "file", "in_watch",
            "store"} <= set(window["not_windowed"])  # fmt: skip
    assert set(window["windowed"]) | set(window["not_windowed"]) >= set(shift) - {"window"}
    whole = _status_json(capsys, shifts)["window"]
    assert (whole["arrived_from"], whole["arrived_until"]) == (None, None)  # the whole store
    since = _status_json(capsys, shifts, "--arrived-from", str(T1))["window"]
    assert (since["arrived_from"], since["arrived_until"]) == (T1, None)


def test_status_text_names_the_window_and_labels_the_rest_as_the_whole_stores(shifts, capsys):
    code, out, err = run_main(capsys, "edge", "status", "--db", shifts, *SHIFT)
    assert code == 0 and not err, err
    lines = out.splitlines()

    def at(start: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(start))

    assert lines[at("window")] == (
        f"window        only the images that arrived from {clock_text(T0)} until "
        f"{clock_text(T1)} (not at it), by --arrived-from/--arrived-until: the lines from "
        "`images` to `last image`"
    )
    assert lines[at("images")].startswith("images        6: ok 2, defect 1, pending 1, error 2")
    assert lines[at("last image")].startswith(f"last image    {clock_text(T0 + 50)}")
    assert lines[at("whole store")].startswith(
        "whole store   not windowed: the lines below are the whole store's (10 images)"
    )
    assert lines[at("outbox")].startswith("outbox        2 requests")
    assert lines[at("dead letters")].startswith("dead letters  2 kept")
    assert at("window") < at("images") < at("last image") < at("whole store")
    assert at("whole store") < at("daemon") < at("outbox") < at("dead letters") < at("counters")
    # without a window: as before, no window line, the whole store counted
    code, out, _ = run_main(capsys, "edge", "status", "--db", shifts)
    assert code == 0 and "window" not in out and "whole store" not in out
    assert "images        10: ok 4, defect 1, pending 2, error 3" in out


def test_a_pending_image_stays_in_the_shift_it_arrived_in_whatever_its_retries(shifts, capsys):
    """The night's pending image, retried during the shift (its `updated` moved), is counted
    in the night's window, not in the shift's: consecutive windows count each image once."""
    night = _status_json(capsys, shifts, "--arrived-until", str(T0))
    shift = _status_json(capsys, shifts, *SHIFT)
    after = _status_json(capsys, shifts, "--arrived-from", str(T1))
    assert night["verdicts"] == {"ok": 1, "defect": 0, "pending": 1, "error": 0}
    total = {v: night["verdicts"][v] + shift["verdicts"][v] + after["verdicts"][v]
             for v in night["verdicts"]}  # fmt: skip
    assert total == _status_json(capsys, shifts)["verdicts"]


def test_an_empty_window_counts_nothing_and_keeps_the_whole_stores_parts(shifts, capsys):
    """A window no image arrived in (a stopped line, a day off) is no error: zeros, "-" for the
    last image, and the store's outbox and dead letters as they are."""
    empty = ("--arrived-from", str(T0 + 100), "--arrived-until", str(T0 + 200))
    summary = _status_json(capsys, shifts, *empty)
    assert summary["verdicts"] == {"ok": 0, "defect": 0, "pending": 0, "error": 0}
    assert summary["results_by_model"] == {} and summary["errors"] == {}
    assert summary["last_arrival"] is None and summary["last_finished"] is None
    assert summary["outbox"]["requests"] == 2 and summary["dead_letters"]["kept"] == 2
    code, out, _ = run_main(capsys, "edge", "status", "--db", shifts, *empty)
    assert code == 0
    assert "images        0: ok 0, defect 0, pending 0, error 0" in out
    assert "last image    -, last result -" in out and "results by export: -" in out


def test_a_shift_under_way_or_to_come_is_counted_so_far_and_warned_of(shifts, capsys):
    """A window whose end is to come (the shift under way, or one in the future) counts what
    arrived so far (nothing, for one to come), with the warning `edge results` gives: images
    still being judged are not in the store yet."""
    now = time.time()
    code, out, err = run_main(capsys, "edge", "status", "--db", shifts, "--json",
                              "--arrived-from", str(now + 3600),
                              "--arrived-until", "1h")  # fmt: skip
    assert code == 2 and "is not after --arrived-from" in err  # (from > until: refused)
    code, out, err = run_main(capsys, "edge", "status", "--db", shifts, "--json",
                              "--arrived-from", str(now + 3600),
                              "--arrived-until", str(now + 7200))  # fmt: skip
    assert code == 0
    assert json.loads(out)["verdicts"] == {"ok": 0, "defect": 0, "pending": 0, "error": 0}
    assert err.startswith("splitdet edge status: warning: --arrived-until ")
    assert "still being judged (or wait for room in the outbox) are not counted; ask again " in err


def test_a_window_across_the_night_the_clocks_go_back_counts_both_0230s(tmp_path, capsys):
    """Europe/Berlin, 2024-10-27: 02:30 comes twice (+02:00, then +01:00). A window given in
    local times that are not ambiguous counts both; the ambiguous one is refused, naming the
    offsets to give, as `edge results` does; the text shows the bounds with their offsets."""
    db = tmp_path / "edge.sqlite"
    first = datetime.fromisoformat("2024-10-27T02:30+02:00").timestamp()
    second = datetime.fromisoformat("2024-10-27T02:30+01:00").timestamp()
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival("first.png", first), 0.1, FP_A, {})
        store.record_ok(_arrival("second.png", second), 0.1, FP_A, {})
    with local_zone("Europe/Berlin"):
        night = ("--arrived-from", "2024-10-27T02:00+02:00", "--arrived-until", "2024-10-27T04:00")
        assert _status_json(capsys, db, *night)["verdicts"]["ok"] == 2
        code, out, _ = run_main(capsys, "edge", "status", "--db", db, *night)
        assert "from 2024-10-27 02:00:00 +0200 until 2024-10-27 04:00:00 +0100" in out
        for command in (["status"], ["collect", "--out", tmp_path / "review"]):
            code, _, err = run_main(capsys, "edge", *command, "--db", db,
                                    "--arrived-from", "2024-10-27T02:30")  # fmt: skip
            assert code == 2 and "--arrived-from '2024-10-27T02:30'" in err
            assert "occurs twice" in err and "2024-10-27T02:30:00+02:00" in err


# ------------------------------------------------------------------ B. edge collect


@pytest.fixture
def archived(tmp_path) -> tuple[Path, Path]:
    """(db, archive): final results whose files are in an archive, one before the shift,
    two in it (an ok at T0, a defect), one at T1 (the next shift's), and a pending one in it."""
    archive, db = tmp_path / "archive", tmp_path / "edge.sqlite"
    archive.mkdir()

    def image(name: str, level: int) -> str:
        path = archive / name
        Image.new("L", (32, 24), level).save(path)
        return str(path)

    with contextlib.closing(ResultStore(db)) as store:
        for name, arrived, level in (("night.png", T0 - 60, 10), ("boundary.png", T0, 20),
                                     ("late.png", T1, 40)):  # fmt: skip
            path = image(name, level)
            store.record_ok(_arrival(name, arrived, path), 0.1, FP_A, {}, stored_path=path)
        _defect(store, "scratch.png", T0 + 20, image("scratch.png", 30))
        path = image("waiting.png", 50)
        store.record_pending(_arrival("waiting.png", T0 + 30, path), 0.9, "r", b"x", FP_B, {},
                             stored_path=path)  # fmt: skip
    return db, archive


def _listed(out: Path) -> list[str]:
    with open(out / "collected.csv", encoding="utf-8", newline="") as fh:
        return [Path(row["source"]).name for row in csv.DictReader(fh)]


def test_collect_takes_only_the_shifts_results_and_says_its_window(archived, tmp_path, capsys):
    db, _ = archived
    out = tmp_path / "review"
    code, text, err = run_main(capsys, "edge", "collect", "--db", db, "--out", out, "--json",
                               *SHIFT)  # fmt: skip
    assert code == 0, err
    summary = json.loads(text)
    assert summary["window"] == {"arrived_from": T0, "arrived_until": T1}
    assert summary["matched"] == 2 and summary["collected"] == 2  # (the pending one: not final)
    assert _listed(out) == ["boundary.png", "scratch.png"]
    assert sorted(p.stem.split("-", 1)[1] for p in (out / "Annotations").iterdir()) == [
        "boundary", "scratch"]  # fmt: skip
    assert len(list((out / "JPEGImages").iterdir())) == 2
    # the next shift into the same folder adds its own only; the text summary names it
    code, text, _ = run_main(capsys, "edge", "collect", "--db", db, "--out", out,
                             "--arrived-from", str(T1))  # fmt: skip
    assert code == 0
    assert f"(of 1 matching results whose image arrived from {clock_text(T1)} on)" in text
    assert _listed(out) == ["boundary.png", "scratch.png", "late.png"]
    # without a window: every arrival, as before (the night's too), and a window of none
    code, text, _ = run_main(capsys, "edge", "collect", "--db", db, "--out", out, "--json")
    assert json.loads(text)["window"] == {"arrived_from": None, "arrived_until": None}
    assert _listed(out)[-1] == "night.png"


def test_collect_of_an_empty_window_writes_nothing(archived, tmp_path, capsys):
    db, _ = archived
    out = tmp_path / "review"
    code, text, _ = run_main(capsys, "edge", "collect", "--db", db, "--out", out,
                             "--arrived-from", str(T0 + 100),
                             "--arrived-until", str(T0 + 200))  # fmt: skip
    assert code == 0
    assert text.startswith(f"{out}: 0 image(s) collected, 0 already there, 0 not available (of "
                           f"0 matching results whose image arrived from {clock_text(T0 + 100)} "
                           f"until {clock_text(T0 + 200)} (not at it));")  # fmt: skip
    assert not (out / "collected.csv").exists()


def test_collect_relists_only_the_windows_images_a_cut_run_left_unlisted(
    archived, tmp_path, capsys
):
    """A run cut short left two images copied and annotated but not listed: a shift's collect
    writes the row of its own only; the other's waits for a run whose window holds it."""
    db, _ = archived
    out = tmp_path / "review"
    assert run_main(capsys, "edge", "collect", "--db", db, "--out", out)[0] == 0
    listing = out / "collected.csv"
    lines = listing.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if "night.png" not in line and "scratch.png" not in line]
    listing.write_text("".join(kept), encoding="utf-8")
    code, text, _ = run_main(capsys, "edge", "collect", "--db", db, "--out", out, "--json",
                             *SHIFT)  # fmt: skip
    assert code == 0 and len(json.loads(text)["relisted"]) == 1
    assert _listed(out) == ["boundary.png", "late.png", "scratch.png"]


def test_collect_warns_of_a_shift_not_over(archived, tmp_path, capsys):
    db, _ = archived
    code, _, err = run_main(capsys, "edge", "collect", "--db", db, "--out", tmp_path / "r",
                            "--arrived-from", str(T0), "--arrived-until", "30s ago")  # fmt: skip
    assert code == 0
    assert err.startswith("splitdet edge collect: warning: --arrived-until 30s ago is less than ")
    assert "are not collected; collect again once the shift is over" in err


# ------------------------------------------------------------------ C. one definition


def _edge_action(name: str) -> argparse.ArgumentParser:
    """The parser of `splitdet edge NAME`."""
    parser = build_parser()

    def sub(p: argparse.ArgumentParser, choice: str) -> argparse.ArgumentParser:
        actions = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        return actions.choices[choice]

    return sub(sub(parser, "edge"), name)


@pytest.mark.parametrize("action", ["status", "collect"])
def test_the_window_options_are_results_own(action):
    def options(name: str) -> list[tuple]:
        return [(a.option_strings, a.metavar, a.help, a.default, a.type)
                for a in _edge_action(name)._actions
                if set(a.option_strings) & {"--arrived-from", "--arrived-until"}]  # fmt: skip

    assert len(options("results")) == 2
    assert options(action) == options("results")


@pytest.mark.parametrize(
    "window",
    [
        ("--arrived-from", "1000", "--arrived-until", "1000"),
        ("--arrived-from", "2000", "--arrived-until", "1000"),
        ("--arrived-from", "yesterday"),
        ("--arrived-until", "2024-13-01T06:00"),
        ("--arrived-until", "1e999"),
    ],
)
def test_a_window_is_refused_as_results_refuses_it(window, store_db, tmp_path, capsys):
    """The same refusal, word for word, before anything is read or written."""
    errors = []
    for command in (["results"], ["status"], ["collect", "--out", tmp_path / "review"]):
        code, out, err = run_main(capsys, "edge", *command, "--db", store_db, *window)
        assert code == 2 and not out
        errors.append(err)
    assert errors[0].startswith("splitdet edge: error: --arrived-")
    assert errors[1] == errors[0] and errors[2] == errors[0]
    assert not (tmp_path / "review").exists()
