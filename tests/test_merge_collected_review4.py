"""`splitdet data merge` of a collected tree, and `data check`'s needs_boxes warning (a review
of the weekly collect → relabel → merge → retrain loop).

`data check review/` warned that images the edge judged defect still had no box (read from
review/collected.csv), but `data merge` said nothing and wrote no collected.csv, so `data
check` of the merged tree, the one `train` reads, was silent and those defects trained as
background. Now merge prints the warning of each source that has it and writes a merged
collected.csv (the sources' rows of the images they hold, ids as merged), which `data check`
of the merged tree reads. And the warning tells a reviewer how to acknowledge an image they
judged defect-free: needs_boxes set to no (the image's last row decides)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from splitdet.edge.collect import LISTING, LISTING_COLUMNS
from splitdet.shared.cli import main
from splitdet.training import voc

from support import make_tiny_voc

#: What the needs_boxes warning says (test names hold "needs_boxes": so do tmp_path's).
MARK = "(needs_boxes = yes)"


def _split(root: Path) -> Path:
    """Every annotated image of `root` split train / val / test (two in val, one in test)."""
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", ids[:-3])
    voc.write_split(root, "val", ids[-3:-1])
    voc.write_split(root, "test", ids[-1:])
    return root


def _listing(root: Path, rows: list[dict]) -> None:
    """A collected.csv as `splitdet edge collect` writes it, of `rows` (other columns empty)."""
    with open(root / LISTING, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, LISTING_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    """(data, review): a synthetic set (img_000..img_005, the last two defect-free) and a
    collected one (img_000 and img_001 boxed, img_002 and img_003 empty) whose listing marks
    img_002 (no box drawn yet) and img_000 (drawn since) needs_boxes = yes, and holds the row
    of an image removed from it since, img_005 (an id the synthetic set has too)."""
    data = _split(make_tiny_voc(tmp_path / "data", n_defective=4, n_free=2, seed=1))
    review = _split(make_tiny_voc(tmp_path / "review", n_defective=2, n_free=2, seed=2))
    _listing(
        review,
        [
            {"image_id": "img_000", "verdict": "defect", "needs_boxes": "yes"},
            {"image_id": "img_001", "verdict": "defect", "needs_boxes": "no"},
            {"image_id": "img_002", "verdict": "defect", "needs_boxes": "yes"},
            {"image_id": "img_003", "verdict": "ok", "needs_boxes": "no"},
            {"image_id": "img_005", "verdict": "defect", "needs_boxes": "yes"},  # removed
        ],
    )
    return data, review


def _check_warnings(root: Path, capsys, tmp_path: Path) -> list[str]:
    """`data check ROOT`'s warnings (--json), after its exit status 0."""
    report = tmp_path / "report.json"
    assert main(["data", "check", str(root), "--no-progress", "--json", str(report)]) == 0
    capsys.readouterr()
    return json.loads(report.read_text())["warnings"]


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / LISTING, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_merge_warns_and_the_merged_tree_keeps_the_needs_boxes_check(tmp_path, capsys):
    data, review = _sources(tmp_path)
    before = _check_warnings(review, capsys, tmp_path)
    assert any(MARK in w and "img_002" in w for w in before)
    out = tmp_path / "merged"
    assert main(["data", "merge", str(data), str(review), "--out", str(out), "--prefix",
                 "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    warned = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1, text
    assert f"{review / LISTING}: 1 image(s) the edge judged defect" in warned[0]
    assert "img_002" in warned[0]

    # the merged listing: the rows of the images the source holds, ids as merged
    assert [(r["image_id"], r["needs_boxes"]) for r in _rows(out)] == [
        ("review_img_000", "yes"), ("review_img_001", "no"), ("review_img_002", "yes"),
        ("review_img_003", "no"),
    ]  # fmt: skip
    found = [w for w in _check_warnings(out, capsys, tmp_path) if MARK in w]
    assert len(found) == 1 and "1 image(s)" in found[0] and "review_img_002" in found[0], found


def test_a_removed_images_row_does_not_mark_another_sources_image(tmp_path, capsys):
    """Ids kept (no --prefix): the review's row of its removed img_005 would name the
    synthetic set's defect-free img_005 in the merged listing. It is not carried."""
    data, review = _sources(tmp_path)
    for xml in sorted((review / "Annotations").glob("*.xml")):  # ids the data set does not have
        sample = voc.read_annotation(review, xml.stem)
        image = sample.image_path.rename(sample.image_path.with_name("c" + sample.image_path.name))
        xml.unlink()
        voc.write_annotation(
            review / "Annotations" / f"c{xml.stem}.xml",
            voc.VocSample("c" + xml.stem, image, sample.width, sample.height, sample.objects),
        )
    for split in ("train", "val", "test"):
        voc.write_split(review, split, ["c" + i for i in voc.read_split_ids(review, split)])
    rows = [{**row, "image_id": "c" + row["image_id"]} for row in _rows(review)]
    rows[-1]["image_id"] = "img_005"  # removed from review; data's img_005 is defect-free
    _listing(review, rows)
    out = tmp_path / "merged"
    assert main(["data", "merge", str(data), str(review), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert [r["image_id"] for r in _rows(out)] == ["cimg_000", "cimg_001", "cimg_002", "cimg_003"]
    found = [w for w in _check_warnings(out, capsys, tmp_path) if MARK in w]
    assert len(found) == 1 and "cimg_002" in found[0] and "img_005" not in found[0], found


def test_no_listing_no_merged_listing_and_an_unreadable_one_is_warned_of(tmp_path, capsys):
    data, review = _sources(tmp_path)
    (review / LISTING).unlink()
    out = tmp_path / "plain"
    assert main(["data", "merge", str(data), str(review), "--out", str(out), "--prefix",
                 "--no-progress"]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().out
    assert not (out / LISTING).exists()

    (review / LISTING).write_text("image_id,needs_boxes\n" + "x" * 200_000 + ",yes\n")
    out = tmp_path / "merged"
    assert main(["data", "merge", str(data), str(review), "--out", str(out), "--prefix",
                 "--no-progress"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"warning: {review / LISTING}: cannot read it" in text
    assert "repair the listing and merge again" in text


def test_needs_boxes_set_to_no_acknowledges_an_image_judged_defect_free(tmp_path, capsys):
    _, review = _sources(tmp_path)
    [found] = [w for w in _check_warnings(review, capsys, tmp_path) if MARK in w]
    assert "or set needs_boxes to no in collected.csv for an image you judged defect-free" in found

    rows = _rows(review)
    _listing(review, [*rows, {**rows[2], "needs_boxes": "no"}])  # img_002's last row: no
    assert not [w for w in _check_warnings(review, capsys, tmp_path) if MARK in w]
    rows[2]["needs_boxes"] = "No"  # as a spreadsheet may write it back
    _listing(review, rows)
    assert not [w for w in _check_warnings(review, capsys, tmp_path) if MARK in w]
