"""`splitdet data check` and what collecting the edge's images leaves in a dataset: images
`edge collect` marked needs_boxes = yes whose annotation still holds no box, and the same
image stored under two ids (one in train, the other in test: a leak between splits)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from splitdet.edge.collect import LISTING, LISTING_COLUMNS
from splitdet.shared.cli import main
from splitdet.training import voc, voc_check_collected
from splitdet.training.voc_check_collected import same_image_warning

from support import make_tiny_voc, write_voc_image

TRAIN = ["img_000", "img_001", "img_002", "img_006"]
VAL = ["img_003", "img_004"]
TEST = ["img_005", "img_007"]


def _voc(root: Path, train=TRAIN, val=VAL, test=TEST) -> Path:
    """A tiny VOC tree (8 distinct noisy images, 6 defective) split without overlap."""
    make_tiny_voc(root)
    for split, ids in (("train", train), ("val", val), ("test", test)):
        voc.write_split(root, split, ids)
    return root


def _check(root: Path, capsys, tmp_path: Path) -> tuple[int, list[str], list[str]]:
    """(exit status, the text report's warning lines, the --json report's warnings)."""
    out = tmp_path / "report.json"
    code = main(["data", "check", str(root), "--no-progress", "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    return (
        code,
        [line for line in lines if line.startswith("warning")],
        json.loads(out.read_text())["warnings"],
    )


def _the_warning(root: Path, capsys, tmp_path: Path, key: str) -> str:
    """The one warning holding `key`, the same in the text report and in --json (exit 0)."""
    code, text, warnings = _check(root, capsys, tmp_path)
    found = [w for w in warnings if key in w]
    assert code == 0 and len(found) == 1, warnings
    assert [w for w in text if key in w] == [f"warning: {found[0]}"]
    return found[0]


def _noise(seed: int):
    """A noisy image, as `make_tiny_voc`'s (distinct bytes per seed)."""
    return np.random.default_rng(seed).normal(40, 6, (128, 160, 3)).clip(0, 255).astype(np.uint8)


def _listing(root: Path, rows: list[dict], columns=LISTING_COLUMNS) -> None:
    with open(root / LISTING, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _collected(root: Path) -> Path:
    """`_voc` plus two collected images: col_a (edge: defect, no box drawn) and col_b (edge:
    ok), both listed in train; img_000 marked needs_boxes = yes but given its boxes since."""
    _voc(root, train=[*TRAIN, "col_a", "col_b"])
    for seed, image_id in enumerate(("col_a", "col_b"), 7):
        write_voc_image(root, image_id, _noise(seed), [])
    _listing(
        root,
        [
            {"image_id": "col_a", "verdict": "defect", "needs_boxes": "yes"},
            {"image_id": "col_b", "verdict": "ok", "needs_boxes": "no"},
            {"image_id": "img_000", "verdict": "defect", "needs_boxes": "yes"},
        ],
    )
    return root


def test_collected_images_without_boxes_are_warned_of_until_drawn(tmp_path, capsys):
    root = _collected(tmp_path / "review")
    found = _the_warning(root, capsys, tmp_path, "needs_boxes")
    assert "1 image(s) the edge judged defect" in found
    assert "col_a" in found and "img_000" not in found and "col_b" not in found
    assert "draw their boxes, or remove the image: as they are they train as defect-free" in found

    # its boxes drawn: nothing left to say
    sample = voc.read_annotation(root, "col_a")
    box = voc.VocObject("scratch", (10.0, 10.0, 50.0, 13.0))
    voc.write_annotation(
        root / "Annotations" / "col_a.xml",
        voc.VocSample(sample.image_id, sample.image_path, sample.width, sample.height, (box,)),
    )
    code, text, warnings = _check(root, capsys, tmp_path)
    assert code == 0 and text == [] and warnings == []


def test_an_older_or_unreadable_listing_does_not_stop_the_check(tmp_path, capsys):
    root = _collected(tmp_path / "review")
    old = [c for c in LISTING_COLUMNS if c != "needs_boxes"]
    _listing(root, [{"image_id": "col_a", "verdict": "defect"}], columns=old)
    code, text, warnings = _check(root, capsys, tmp_path)
    assert code == 0 and text == [] and warnings == []

    # a field past the csv module's limit: csv.Error, a note rather than a crash
    (root / LISTING).write_text("image_id,needs_boxes\n" + "x" * 200_000 + ",yes\n")
    code, text, warnings = _check(root, capsys, tmp_path)
    assert code == 0
    assert len(warnings) == 1 and "cannot read it" in warnings[0], warnings


def _copy_as(root: Path, source_id: str, image_id: str) -> None:
    """Store `source_id`'s image again, byte for byte, as `image_id` (its own annotation)."""
    sample = voc.read_annotation(root, source_id)
    path = root / "JPEGImages" / f"{image_id}.png"
    shutil.copyfile(sample.image_path, path)
    voc.write_annotation(
        root / "Annotations" / f"{image_id}.xml",
        voc.VocSample(image_id, path, sample.width, sample.height, sample.objects),
    )


def test_the_same_image_in_train_and_test_is_warned_of_as_a_leak(tmp_path, capsys):
    root = _voc(tmp_path / "data", test=[*TEST, "img_dup"])
    write_voc_image(root, "img_dup", _noise(9), [])
    code, text, warnings = _check(root, capsys, tmp_path)
    assert code == 0 and text == [] and warnings == []  # distinct images: nothing to say
    _copy_as(root, "img_001", "img_dup")  # now the same as img_001
    found = _the_warning(root, capsys, tmp_path, "the same bytes")
    assert "img_001.png (train) = img_dup.png (test)" in found
    assert "the same image in train and test: its test figures are not held out" in found


def test_the_same_image_twice_in_one_split_is_warned_of_without_a_leak(tmp_path, capsys):
    root = _voc(tmp_path / "data", train=[*TRAIN, "img_dup"])
    _copy_as(root, "img_001", "img_dup")
    found = _the_warning(root, capsys, tmp_path, "the same bytes")
    assert "img_001.png (train) = img_dup.png (train)" in found and "not held out" not in found


def test_only_files_sharing_a_size_are_read(tmp_path, monkeypatch):
    folder = tmp_path / "JPEGImages"
    folder.mkdir()
    files = {}
    for name, data in (("a", b"1" * 10), ("b", b"2" * 10), ("c", b"3" * 11), ("d", b"1" * 10)):
        files[name] = [folder / f"{name}.png"]
        files[name][0].write_bytes(data)
    read: list[str] = []
    real = hashlib.file_digest

    def counted(fh, digest):
        read.append(Path(fh.name).stem)
        return real(fh, digest)

    monkeypatch.setattr(voc_check_collected.hashlib, "file_digest", counted)
    warning = same_image_warning(files, {}, {"a": "train", "d": "val"})
    assert sorted(read) == ["a", "b", "d"]  # c's size is its own: never read
    assert warning is not None and "a.png (train) = d.png (val)" in warning
    assert "b.png" not in warning
    assert "the same image in train and val: its val figures are not held out" in warning
