"""File names that differ only in their Unicode normalisation: a dataset copied from a Mac,
whose file system writes names NFD ("e" + a combining accent), annotated or listed NFC (one
"é"). The "not found" messages say that such a file exists and which one to rename, instead of
naming the same-looking name as missing twice."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from splitdet.shared.cli import main
from splitdet.training import voc

from support import make_tiny_voc, write_voc_image

NFC = unicodedata.normalize("NFC", "pièce_07")
NFD = unicodedata.normalize("NFD", NFC)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A tiny VOC tree, disjoint splits, plus the defective image NFC (annotation,
    <filename>, train.txt)."""
    assert NFC != NFD
    root = make_tiny_voc(tmp_path / "voc", n_defective=3, n_free=1)
    image = np.full((128, 160, 3), 40, np.uint8)
    write_voc_image(root, NFC, image, [voc.VocObject("scratch", (10.0, 10.0, 60.0, 13.0))])
    voc.write_split(root, "train", ["img_000", "img_003", NFC])
    voc.write_split(root, "val", ["img_001"])
    voc.write_split(root, "test", ["img_002"])
    assert voc.read_annotation(root, NFC).objects  # read while every name is NFC
    return root


def _problems(root: Path, capsys) -> list[str]:
    out = root.parent / "report.json"
    assert main(["data", "check", str(root), "--no-progress", "--json", str(out)]) == 1
    capsys.readouterr()
    return json.loads(out.read_text())["problems"]


def test_an_image_named_nfd_on_disk_is_named_with_what_to_rename(dataset, capsys):
    images = dataset / "JPEGImages"
    (images / f"{NFC}.png").rename(images / f"{NFD}.png")
    annotation = dataset / "Annotations" / f"{NFC}.xml"
    with pytest.raises(voc.VocError) as caught:
        voc.read_split(dataset, "train")
    assert str(caught.value) == (
        f"{annotation}: image file not found: no {images / NFC}"
        f"{{{','.join(voc.IMAGE_EXTENSIONS)}}}; {images / NFD}.png exists, whose name differs "
        "only in its Unicode normalisation (NFD there, NFC here; macOS writes names NFD): "
        "rename it to its NFC form"
    )

    assert _problems(dataset, capsys) == [
        str(caught.value),
        f"{images / NFD}.png: no annotation (Annotations/{NFD}.xml); {annotation} exists, "
        "whose name differs only in its Unicode normalisation (NFC there, NFD here; macOS "
        f"writes names NFD): rename {images / NFD}.png to its NFC form",
    ]  # not "a defect-free image needs one": it has one

    (images / f"{NFD}.png").rename(images / "piece_07.png")  # no accent: another name
    with pytest.raises(voc.VocError, match=r"image file not found: no \S+\{[^}]+\}$"):
        voc.read_annotation(dataset, NFC)
    assert not any("normalisation" in p for p in _problems(dataset, capsys))


def test_an_annotation_named_nfd_that_a_split_lists_nfc_is_named(dataset, capsys):
    annotations = dataset / "Annotations"
    (annotations / f"{NFC}.xml").rename(annotations / f"{NFD}.xml")
    (dataset / "JPEGImages" / f"{NFC}.png").rename(dataset / "JPEGImages" / f"{NFD}.png")
    note = (
        f"; {annotations / NFD}.xml exists, whose name differs only in its Unicode "
        "normalisation (NFD there, NFC here; macOS writes names NFD): rename it to its NFC form"
    )
    with pytest.raises(voc.VocError) as caught:
        voc.read_split(dataset, "train")
    assert str(caught.value) == f"{annotations / NFC}.xml: annotation file not found{note}"

    problems = _problems(dataset, capsys)
    train_txt = dataset / "ImageSets" / "Main" / "train.txt"
    assert problems == [f"{train_txt}: lists {NFC!r}, which has no Annotations/{NFC}.xml{note}"]
