"""The synthetic gasket generator and `splitdet synth`."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import main
from splitdet.training import synth, synth_image, voc

SIZE = (512, 448)  # (width, height)


@pytest.fixture(scope="module")
def defective_images() -> list[synth_image.SynthImage]:
    return [synth_image.generate_image(7, i, SIZE, defective=True) for i in range(6)]


def test_image_shape_and_dtype(defective_images):
    img = defective_images[0]
    assert img.image.shape == (SIZE[1], SIZE[0], 3)
    assert img.image.dtype == np.uint8
    assert img.boxes.dtype == np.float32 and img.boxes.shape[1] == 4
    assert len(img.masks) == len(img.boxes) == len(img.labels) >= 1
    assert set(img.labels) == {synth_image.CLASS_NAME}
    assert 90 <= img.jpeg_quality <= 95


def test_deterministic_per_seed():
    a = synth_image.generate_image(3, 5, SIZE, defective=True)
    b = synth_image.generate_image(3, 5, SIZE, defective=True)
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.boxes, b.boxes)
    other_seed = synth_image.generate_image(4, 5, SIZE, defective=True)
    other_index = synth_image.generate_image(3, 6, SIZE, defective=True)
    other_stream = synth_image.generate_image(
        3, 5, SIZE, defective=True, stream=synth_image.STREAM_TEST
    )
    for other in (other_seed, other_index, other_stream):
        assert other.image.tobytes() != a.image.tobytes()


def test_boxes_are_tight_around_their_masks(defective_images):
    h, w = SIZE[1], SIZE[0]
    for img in defective_images:
        for box, mask in zip(img.boxes, img.masks, strict=True):
            full = mask.full(h, w)
            ys, xs = np.nonzero(full)
            assert len(xs) > 0
            x1, y1, x2, y2 = (int(v) for v in box)
            assert (x1, y1, x2, y2) == tuple(float(v) for v in box)  # integer pixel edges
            # every scratch pixel lies inside its box ...
            assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
            # ... and each box edge touches the stroke
            assert full[:, x1].any() and full[:, x2 - 1].any()
            assert full[y1, :].any() and full[y2 - 1, :].any()
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_scratch_pixels_are_exactly_the_changed_pixels():
    """Rendered with and without scratches, the two images differ only inside the masks."""
    for index in range(4):
        dirty = synth_image.generate_image(11, index, SIZE, defective=True)
        clean = synth_image.generate_image(11, index, SIZE, defective=False)
        assert len(clean.boxes) == 0 and clean.masks == []
        changed = (dirty.image != clean.image).any(axis=2)
        union = np.zeros(changed.shape, dtype=bool)
        for mask in dirty.masks:
            union |= mask.full(*changed.shape)
        assert not (changed & ~union).any(), "a pixel changed outside every scratch mask"
        # and each scratch is actually visible in the pixels
        for mask in dirty.masks:
            assert (changed & mask.full(*changed.shape)).sum() >= 5


def _clutter(grey: np.ndarray) -> float:
    """RMS pixel-to-pixel detail of a grey patch (texture and noise), grey levels."""
    detail = np.concatenate([np.diff(grey, axis=0).ravel(), np.diff(grey, axis=1).ravel()])
    return float(np.sqrt(np.mean(detail**2) / 2))


def test_every_labelled_scratch_stands_out_from_the_texture_around_it():
    """A box is a promise that something is visible: along each labelled stroke the scratch
    changes the pixels by several times the clean image's local clutter (version 1 labelled
    strokes fainter than the lathe marks)."""
    ratios = []
    for index in range(8):
        dirty = synth_image.generate_image(3, index, SIZE, defective=True)
        clean = synth_image.generate_image(3, index, SIZE, defective=False)
        change = np.abs(dirty.image[..., 1].astype(float) - clean.image[..., 1].astype(float))
        for mask in dirty.masks:
            x1, y1, x2, y2 = (int(v) for v in mask.box)
            core = mask.alpha >= 0.5
            stroke = np.median(change[y1:y2, x1:x2][core])
            ratios.append(stroke / _clutter(clean.image[y1:y2, x1:x2, 1].astype(float)))
    assert len(ratios) >= 8
    assert min(ratios) >= 1.5, sorted(ratios)[:5]
    assert np.median(ratios) >= 3.0, np.median(ratios)


def test_scratch_widths_and_lengths_are_plausible(defective_images):
    for img in defective_images:
        for box in img.boxes:
            x1, y1, x2, y2 = box
            assert max(x2 - x1, y2 - y1) >= 8  # never a dot
            assert max(x2 - x1, y2 - y1) <= max(SIZE)


def test_scratches_stay_strokes_at_reduced_sizes():
    # Widths stay 1-6 px at any size while lengths scale: a short wide scratch would be a dot
    # like a dust speck (generator version 2 made some). Longer side over mean width (area at
    # half coverage / longer side; curvature only makes the width look larger) stays >= 7: in
    # 100 images version 3's lowest is ~8.3 on three seeds, version 2 had ~3 under 7.
    ratios = []
    for i in range(100):
        for mask in synth_image.generate_image(11, i, SIZE, defective=True).masks:
            longer = max(mask.alpha.shape)
            mean_width = (mask.alpha >= 0.5).sum() / longer
            ratios.append(longer / mean_width)
    assert len(ratios) >= 200
    assert min(ratios) >= 7.0, sorted(ratios)[:5]


def test_short_scratches_keep_their_camera_length_at_reduced_sizes():
    # The shortest scratch is 30 px long at 2448x2048 and stays so at any size (version 3 scaled
    # it to 10 px at 612x512, beside dust specks of up to 7 px); the visible part of each is at
    # least 2/3 of that. A quarter-size image still holds short scratches: the floor is reached.
    extents = [
        max(mask.alpha.shape)
        for i in range(60)
        for mask in synth_image.generate_image(12, i, (612, 512), defective=True).masks
    ]
    assert len(extents) >= 100
    assert min(extents) >= 20, sorted(extents)[:5]
    assert sum(extent < 40 for extent in extents) >= 5


def test_defect_free_images_have_no_boxes_but_have_lookalikes():
    kinds = set()
    for index in range(6):
        img = synth_image.generate_image(5, index, SIZE, defective=False)
        assert img.boxes.shape == (0, 4)
        assert img.masks == []
        assert len(img.lookalikes) >= 1
        kinds |= {kind for kind, _ in img.lookalikes}
    assert {"dust", "toolmark"} <= kinds


def test_image_looks_like_a_ring_on_a_dark_background():
    img = synth_image.generate_image(1, 0, SIZE, defective=False).image[..., 1].astype(float)
    h, w = img.shape
    corner = img[:20, :20].mean()
    centre = img[h // 2 - 5 : h // 2 + 5, w // 2 - 5 : w // 2 + 5].mean()  # the bore
    ring = img[h // 2 - 5 : h // 2 + 5, int(w * 0.25) : int(w * 0.3)].mean()  # on the metal
    assert corner < 60 and centre < 60
    assert ring > 80


def test_bad_size_is_rejected():
    with pytest.raises(ValueError, match="size"):
        synth_image.generate_image(0, 0, (32, 32))
    assert synth_image.parse_size("640x512") == (640, 512)
    with pytest.raises(ValueError):
        synth_image.parse_size("640")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "README.md"
    }


def test_generate_dataset_writes_a_voc_tree_and_is_worker_independent(tmp_path):
    kwargs = dict(
        seed=2,
        size=(256, 256),
        n_defective=5,
        n_free=5,
        val_fraction=0.4,
        n_test_defective=2,
        n_test_free=1,
        progress=False,
    )
    serial = synth.generate_dataset(tmp_path / "a", workers=1, **kwargs)
    synth.generate_dataset(tmp_path / "b", workers=2, **kwargs)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")

    root = tmp_path / "a"
    assert serial.counts["train"]["defective"] == 3 and serial.counts["train"]["free"] == 3
    assert serial.counts["val"]["defective"] == 2 and serial.counts["val"]["free"] == 2
    assert serial.counts["test"]["defective"] == 2 and serial.counts["test"]["free"] == 1
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["seed"] == 2 and meta["size"] == [256, 256] and meta["complete"] is True
    assert (root / "README.md").is_file()

    all_ids = []
    for split in ("train", "val", "test"):
        samples = voc.read_split(root, split, class_names=["scratch"])
        all_ids += [s.image_id for s in samples]
        c = serial.counts[split]
        assert sum(s.is_defective for s in samples) == c["defective"]
        assert sum(len(s.objects) for s in samples) == c["boxes"]
        for s in samples:
            assert (s.width, s.height) == (256, 256)
            with Image.open(s.image_path) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 256)
    assert len(all_ids) == len(set(all_ids)) == 13
    assert voc.class_names_of(root) == ["scratch"]

    # the annotation's boxes are the generator's boxes
    test_ids = voc.read_split_ids(root, "test")
    sample = voc.read_annotation(root, test_ids[0])
    # locate which (stream, index) it came from by regenerating the test stream
    regenerated = [
        synth_image.generate_image(
            2, i, (256, 256), defective=i < 2, stream=synth_image.STREAM_TEST
        )
        for i in range(3)
    ]
    got = sorted(tuple(o.box) for o in sample.objects)
    assert any(sorted(map(tuple, r.boxes.tolist())) == got for r in regenerated)

    # refuses to clobber without overwrite; replaces with it
    with pytest.raises(FileExistsError):
        synth.generate_dataset(root, workers=1, **kwargs)
    synth.generate_dataset(root, workers=1, overwrite=True, **kwargs)
    assert _tree_bytes(root) == _tree_bytes(tmp_path / "b")
    other = tmp_path / "not_ours"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synth.generate_dataset(other, workers=1, overwrite=True, **kwargs)
    assert (other / "keep.txt").read_text() == "x"


def test_cli_synth_end_to_end(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = [
        "synth",
        "--out",
        str(out),
        "--size",
        "256x256",
        "--defective",
        "3",
        "--free",
        "2",
        "--test-defective",
        "1",
        "--test-free",
        "1",
        "--workers",
        "1",
        "--seed",
        "9",
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["test"] == {
        "defective": 1,
        "free": 1,
        "boxes": summary["counts"]["test"]["boxes"],
    }
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        assert (out / sub).is_dir()
    ids = []
    for split in ("train", "val", "test"):
        ids += (out / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    assert len(ids) == 7
    for image_id in ids:
        assert (out / "JPEGImages" / f"{image_id}.jpg").is_file()
        root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
        assert root.tag == "annotation"
        assert root.findtext("size/width") == "256"

    # a second run into the same folder is a one-line user error
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_synth_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "x"), "--size", "big"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "y"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_cli_synth_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "splitdet synth --out" in capsys.readouterr().out


def test_cli_module_imports_no_numpy():
    code = (
        "import sys, splitdet.training.cli_synth; "
        "sys.exit(1 if 'numpy' in sys.modules or 'PIL' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
