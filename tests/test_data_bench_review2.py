"""A reviewer's second look at `data split --write-empty`, split files and the benchmark:

1. the refusal's scan of annotations splitdet does not read stopped after the hints' cap of
   files per folder (`MAX_LOOKED_AT`): past it, images beside their LabelImg ``.xml`` (or
   CVAT's sub-folders, listed after the top level) were given empty annotations;
2. any ``.xml`` was called an annotation: a camera's settings file beside the images was to be
   moved into Annotations, and a sidecar made --write-empty refuse;
3. the refusal counted files, not images, and for ``ID.XML`` beside the images said "move into
   Annotations", after which it was still not read;
4. a UTF-16 split file was named as such in `data check` and `data split` only (train said
   "'utf-8' codec can't decode byte 0xff"), and one without a byte-order mark not at all;
5. the --images suggested for one rate was then refused for making two rates one stream;
6. the bootstrap resampled all images together, so a resample's defective count varied and the
   interval measured streams of other rates, not the timing spread.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_voc_byo_review import _move, _unsplit

from splitdet.shared.cli import main
from splitdet.training import voc, voc_layout

from support import make_tiny_voc, train_argv

CAMERA_XML = '<?xml version="1.0"?>\n<camera><exposure>1/250</exposure></camera>\n'
SIDECAR_XML = "<CameraMetadata><iso>100</iso></CameraMetadata>\n"


# ------------------------------------------------ 1: the refusal's scan is complete, uncapped


def test_annotations_beside_the_images_are_all_found_past_the_hint_cap(tmp_path, monkeypatch):
    """(The reviewer's 120,000 files, scaled down with the hints' cap: the refusal must not
    depend on it.)"""
    monkeypatch.setattr(voc_layout, "MAX_LOOKED_AT", 5)
    root = _unsplit(tmp_path / "d")
    for k in range(8):
        _move(root, f"img_{k:03d}", root / "JPEGImages" / f"img_{k:03d}.xml")
    for k in range(40):
        (root / "JPEGImages" / f"notes_{k:03d}.txt").write_text("x")

    found = voc_layout.unread_annotations(root)

    assert sorted(found) == [f"img_{k:03d}" for k in range(8)]


def test_a_sub_folder_annotation_is_found_behind_a_full_top_level(tmp_path, monkeypatch):
    """The walk lists the top level first: with more top-level annotations than the cap, the
    sub-folder's was never reached."""
    monkeypatch.setattr(voc_layout, "MAX_LOOKED_AT", 5)
    root = _unsplit(tmp_path / "d")
    _move(root, "img_001", root / "Annotations" / "task1" / "img_001.xml")
    for k in range(20):
        (root / "Annotations" / f"other_{k:03d}.xml").write_text("<annotation/>")

    found = voc_layout.unread_annotations(root)

    assert [a.kind for a in found["img_001"]] == ["sub-folder"]


# -------------------------------------------------- 2: only <annotation> files are annotations


def test_a_camera_settings_file_beside_the_images_is_not_called_an_annotation(tmp_path):
    root = make_tiny_voc(tmp_path / "d")
    (root / "JPEGImages" / "camera_settings.xml").write_text(CAMERA_XML)
    (root / "JPEGImages" / "broken.xml").write_bytes(b"\x00\xff not xml")

    assert voc_layout.beside_images_note(root) is None
    assert voc_layout.unread_annotations(root) == {}


@pytest.mark.parametrize("encoding", ["Shift_JIS", "x-camera"])
def test_a_sidecar_in_an_encoding_expat_cannot_read_is_no_annotation(encoding, tmp_path, capsys):
    """`data check` ended in a traceback (LookupError, or ValueError for a multi-byte encoding)
    and `data split --write-empty` in a message naming neither file nor cause."""
    root = _unsplit(tmp_path / "d")
    (root / "Annotations" / "img_007.xml").unlink()  # a defect-free image left bare
    sidecar = f'<?xml version="1.0" encoding="{encoding}"?>\n<camera/>\n'
    (root / "JPEGImages" / "settings.xml").write_text(sidecar)

    assert voc_layout.beside_images_note(root) is None
    assert voc_layout.unread_annotations(root) == {}
    code = main(["data", "split", str(root), "--write-empty", "--val", "0.2"])
    assert code == 0, capsys.readouterr().err
    assert (root / "Annotations" / "img_007.xml").is_file()
    assert main(["data", "check", str(root), "--no-progress"]) == 0, capsys.readouterr()


def test_the_note_still_names_a_real_annotation_beside_the_images(tmp_path):
    root = make_tiny_voc(tmp_path / "d")
    (root / "JPEGImages" / "camera_settings.xml").write_text(CAMERA_XML)
    real = (root / "Annotations" / "img_000.xml").read_text()
    (root / "JPEGImages" / "img_000.xml").write_text("<!-- LabelImg -->\n" + real)

    note = voc_layout.beside_images_note(root)

    assert note is not None and "holds 1 .xml annotation(s)" in note and "img_000.xml" in note


def test_write_empty_writes_beside_a_sidecar_that_is_no_annotation(tmp_path, capsys):
    root = _unsplit(tmp_path / "d")
    (root / "Annotations" / "img_007.xml").unlink()  # a defect-free image left bare
    (root / "JPEGImages" / "img_007.xml").write_text(SIDECAR_XML)

    code = main(["data", "split", str(root), "--write-empty", "--val", "0.2"])

    assert code == 0, capsys.readouterr().err
    assert (root / "Annotations" / "img_007.xml").is_file()
    assert (root / "JPEGImages" / "img_007.xml").read_text() == SIDECAR_XML


# ---------------------------------------------------------- 3: the refusal's count and fix


def test_the_refusal_counts_images_not_files(tmp_path, capsys):
    root = _unsplit(tmp_path / "d")
    annotation = (root / "Annotations" / "img_001.xml").read_bytes()
    _move(root, "img_001", root / "JPEGImages" / "img_001.xml")
    (root / "Annotations" / "t").mkdir()
    (root / "Annotations" / "t" / "img_001.xml").write_bytes(annotation)

    assert main(["data", "split", str(root), "--write-empty"]) == 2

    err = capsys.readouterr().err
    assert "1 image(s) without Annotations/ID.xml" in err, err


def test_an_upper_case_xml_beside_the_images_is_to_be_moved_as_id_xml(tmp_path, capsys):
    root = _unsplit(tmp_path / "d")
    _move(root, "img_002", root / "JPEGImages" / "img_002.XML")

    assert main(["data", "split", str(root), "--write-empty"]) == 2

    err = capsys.readouterr().err
    assert f"move it to {root / 'Annotations' / 'img_002.xml'}" in err, err
    assert not (root / "Annotations" / "img_002.xml").exists()


# ----------------------------------------------------- 4: UTF-16 split files, for every reader


UTF16_MESSAGE = "it is UTF-16 text (as PowerShell's `>` writes it)"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_the_split_reader_names_utf16_with_or_without_a_bom(tmp_path, encoding):
    """`voc.read_split_ids` is what train, eval and merge read split files with."""
    root = make_tiny_voc(tmp_path / "d")
    path = root / "ImageSets" / "Main" / "train.txt"
    path.write_bytes("img_000\r\nimg_001\r\n".encode(encoding))

    with pytest.raises(voc.VocError) as raised:
        voc.read_split_ids(root, "train")

    assert UTF16_MESSAGE in str(raised.value) and "save it as UTF-8" in str(raised.value)


def test_train_names_a_utf16_split_file(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "d")
    path = root / "ImageSets" / "Main" / "train.txt"
    path.write_bytes("img_000\r\nimg_001\r\n".encode("utf-16"))

    assert main(train_argv(root, tmp_path / "run")) != 0

    err = capsys.readouterr().err
    assert UTF16_MESSAGE in err and "codec can't decode" not in err, err


def test_data_check_names_a_utf16_split_file_without_a_bom(tmp_path):
    root = make_tiny_voc(tmp_path / "d")
    (root / "ImageSets" / "Main" / "val.txt").write_bytes("img_000\nimg_001\n".encode("utf-16-le"))
    out = tmp_path / "report.json"

    main(["data", "check", str(root), "--no-progress", "--json", str(out)])

    problems = json.loads(out.read_text())["problems"]
    assert any(UTF16_MESSAGE in p for p in problems), problems
    assert not any("\\x00" in p for p in problems), problems


def test_utf8_split_files_are_read_as_before(tmp_path):
    root = make_tiny_voc(tmp_path / "d")
    path = root / "ImageSets" / "Main" / "train.txt"
    path.write_bytes("\ufeffimg_000 1\nimg_\u00e4\n".encode())
    assert voc.read_split_ids(root, "train") == ["img_000", "img_\u00e4"]


# ------------------------------------------------------ 5: a suggested --images passes all checks


@pytest.mark.parametrize("rates", [(0.05, 0.12, 0.5), (0.5, 0.6), (0.95, 0.9, 0.05), (0.01, 0.02)])
def test_every_suggested_image_count_passes_every_check(rates):
    from splitdet.bench.streams import rates_problem

    for images in range(1, 60):
        problem = rates_problem("--defect-rates", rates, "--images", images)
        if problem is None:
            continue
        suggested = int(re.search(r"use --images (\d+)", problem)[1])
        assert rates_problem("--defect-rates", rates, "--images", suggested) is None, problem


def test_the_default_rates_with_ten_images_suggest_thirteen(tmp_path, capsys):
    argv = ["bench", "--model", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "none")]
    argv += ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--images", "10"]

    assert main(argv) == 2

    err = capsys.readouterr().err
    assert "use --images 13 or more" in err, err


# --------------------------------------------- 6: the bootstrap keeps the stream's defect count


def test_without_timing_noise_the_reduction_interval_has_no_width():
    """The reviewer's stream: 30 images, 2 defective; monolithic 2.5 s flat, the gated system
    1.4 s on a defective image and 0.8 s on a defect-free one (the interval was 64.0%-68.0%)."""
    from splitdet.bench.report import add_confidence_intervals

    defective = [k in (4, 17) for k in range(30)]
    gated = [1.4 if d else 0.8 for d in defective]
    summaries = {"monolithic": {}, "gated": {}}

    add_confidence_intervals(summaries, {"monolithic": [2.5] * 30, "gated": gated}, defective)

    reduction = 1 - np.mean(gated) / 2.5
    assert summaries["gated"]["reduction_ci95"] == [pytest.approx(reduction)] * 2
    assert summaries["gated"]["mean_s_ci95"] == [pytest.approx(np.mean(gated))] * 2


def test_each_kind_is_resampled_with_its_own_size_and_the_same_images_for_all():
    from splitdet.bench.report import bootstrap_means

    rng = np.random.default_rng(3)
    defective = [k % 5 == 0 for k in range(40)]
    mono = rng.uniform(1.0, 3.0, 40)
    means = bootstrap_means(
        {"monolithic": mono, "same": mono, "flags": np.array(defective, float)},
        resamples=300,
        defective=defective,
    )
    assert np.ptp(means["monolithic"]) > 0  # (times within each kind still vary)
    np.testing.assert_array_equal(means["same"], means["monolithic"])  # paired
    np.testing.assert_allclose(means["flags"], 8 / 40)  # always 8 of 40 defective
    with pytest.raises(ValueError, match="3 defective flags for 40 images"):
        bootstrap_means({"monolithic": mono}, defective=[True, False, False])


def test_the_report_paragraph_says_the_bootstrap_is_stratified():
    from splitdet.bench.report import markdown

    text = markdown(
        {
            "command": "splitdet bench",
            "machine": {"cpu_count": 2, "platform": "test", "versions": {}},
            "model": {"depth_label": "R", "input": "i", "gate_threshold": 0.5, "fingerprint": "f"},
            "rates": {},
            "figures": [],
        }
    )
    assert "paired, stratified bootstrap" in text and "defect-free ones apart" in text
