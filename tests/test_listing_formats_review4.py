"""collected.csv saved again by a spreadsheet (a review of the weekly collect → relabel →
merge → retrain loop).

The docs invite setting needs_boxes to no in collected.csv by hand. Excel's "CSV UTF-8" saves
it with a byte order mark (and CRLF line ends): the header's first column became
"\\ufeffimage_id", so `data check` no longer warned of defect verdicts without a box, the next
`edge collect` brought back an image the reviewer removed and appended rows without an id, and
`data merge` dropped that source's rows without a word (its merged header gaining a junk
column). Excel in a locale whose decimal mark is the comma saves semicolons between columns:
the same, and the listing became a mix of ';' and ',' rows. Now one reader
(`splitdet.edge.collect.read_listing`) reads either; collect rewrites such a listing as it
writes one before adding rows; one it cannot read (another encoding, other separators) is
said so by all three, and collect refuses to add to it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from test_collect_removed_review4 import _collect, _defect, _image, _reviewed
from test_merge_collected_review4 import MARK, _check_warnings, _rows, _sources

from splitdet.edge.collect import LISTING, LISTING_COLUMNS
from splitdet.edge.store import ResultStore
from splitdet.shared.cli import main

#: How the spreadsheets save a listing again: (delimiter, with a byte order mark).
SAVED_AS = {"csv_utf8": (",", True), "semicolons": (";", True), "semicolons_no_bom": (";", False)}
#: What every unreadable listing's message says to do.
HINT = "save it as CSV UTF-8 (comma delimited)"


def _resave(listing: Path, delimiter: str, bom: bool, encoding: str = "utf-8") -> None:
    """What a spreadsheet does to `listing` on save: its rows written again with `delimiter`
    between columns and CRLF line ends, a byte order mark first with `bom`."""
    with open(listing, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows, columns = list(reader), list(reader.fieldnames or [])
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, delimiter=delimiter, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    listing.write_bytes(("\ufeff" if bom else "").encode() + text.getvalue().encode(encoding))


@pytest.mark.parametrize("saved_as", sorted(SAVED_AS))
def test_collect_again_after_a_spreadsheet_saved_the_listing(tmp_path, capsys, saved_as):
    db, archive, out, _, _ = _reviewed(tmp_path, capsys, 2)  # 00000002-part2 removed
    _resave(out / LISTING, *SAVED_AS[saved_as])
    store = ResultStore(db)
    _defect(store, 4, _image(archive / "part4.png", 200))
    store.close()

    summary = _collect(db, out, capsys)
    assert summary["removed"] == 1 and summary["collected"] == 1  # part2 left out
    assert not (out / "Annotations" / "00000002-part2.xml").exists()
    data = (out / LISTING).read_bytes()
    assert data.startswith(b"image_id,")  # rewritten as collect writes it: no BOM, commas
    assert b";" not in data
    with open(out / LISTING, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["image_id"] for row in rows] == [
        "00000001-part1", "00000002-part2", "00000003-part3", "00000004-part4",
    ]  # fmt: skip
    assert all(len(row) == len(LISTING_COLUMNS) and None not in row for row in rows)


@pytest.mark.parametrize("saved_as", sorted(SAVED_AS))
def test_data_check_reads_a_listing_a_spreadsheet_saved(tmp_path, capsys, saved_as):
    _, review = _sources(tmp_path)
    _resave(review / LISTING, *SAVED_AS[saved_as])
    [found] = [w for w in _check_warnings(review, capsys, tmp_path) if MARK in w]
    assert "img_002" in found


@pytest.mark.parametrize("saved_as", sorted(SAVED_AS))
def test_data_merge_carries_a_listing_a_spreadsheet_saved(tmp_path, capsys, saved_as):
    data, review = _sources(tmp_path)
    _resave(review / LISTING, *SAVED_AS[saved_as])
    out = tmp_path / "merged"
    assert main(["data", "merge", str(data), str(review), "--out", str(out), "--prefix",
                 "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"warning: {review / LISTING}" in text and MARK in text
    header = (out / LISTING).read_bytes().splitlines()[0].decode()
    assert header == ",".join(LISTING_COLUMNS)  # no "\ufeffimage_id" column
    ids = {row["image_id"] for row in _rows(out)}
    assert {"review_img_000", "review_img_002"} <= ids


#: Listings no reader can take as one: (delimiter, with a byte order mark, encoding).
UNREADABLE = {
    "tabs": ("\t", False, "utf-8"),
    "windows_1252": (",", False, "cp1252"),
}


def _unreadable(listing: Path, kind: str) -> None:
    """`listing` saved again as an unreadable `kind` (its verdicts in French, for the encoding
    to show)."""
    text = listing.read_text(encoding="utf-8").replace("defect", "défaut")
    listing.write_text(text, encoding="utf-8")
    _resave(listing, *UNREADABLE[kind])


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_collect_refuses_to_add_to_a_listing_it_cannot_read(tmp_path, capsys, kind):
    db, archive, out, _, _ = _reviewed(tmp_path, capsys, 2)  # 00000002-part2 removed
    _unreadable(out / LISTING, kind)
    before = (out / LISTING).read_bytes()
    store = ResultStore(db)
    _defect(store, 4, _image(archive / "part4.png", 200))
    store.close()

    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(out / LISTING) in err and HINT in err
    assert (out / LISTING).read_bytes() == before  # nothing added, nothing guessed
    assert not (out / "Annotations" / "00000002-part2.xml").exists()
    assert not (out / "Annotations" / "00000004-part4.xml").exists()


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_check_and_merge_say_a_listing_cannot_be_read(tmp_path, capsys, kind):
    data, review = _sources(tmp_path)
    _unreadable(review / LISTING, kind)
    [found] = [w for w in _check_warnings(review, capsys, tmp_path) if str(review / LISTING) in w]
    assert "cannot read it" in found and HINT in found

    out = tmp_path / "merged"
    assert main(["data", "merge", str(data), str(review), "--out", str(out), "--prefix",
                 "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"warning: {review / LISTING}: cannot read it" in text and HINT in text
    assert not (out / LISTING).exists()  # no source's rows: no merged listing
