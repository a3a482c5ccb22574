"""Training-data faults a review reproduced: small defects lost to crops, difficult-only images
taught as defect-free, EXIF-turned images, splits without a defective image, an --init checkpoint
of other classes, and the counts of overlapping splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitdet.training import voc
from splitdet.training.dataset import CropSettings, VocDetection

W, H = 160, 128


def _sample(root: Path, image_id: str, objects=(), size=(W, H), exif=None) -> voc.VocSample:
    """An image of ``size`` (dark noise, bright where the boxes are) and its annotation, on disk;
    ``exif``: an EXIF orientation tag to store with the JPEG."""
    rng = np.random.default_rng(len(image_id))
    pixels = rng.normal(40, 6, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8)
    for obj in objects:
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        pixels[y1:y2, x1:x2] = 230
    path = root / "JPEGImages" / f"{image_id}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {}
    if exif is not None:
        tags = Image.Exif()
        tags[voc.EXIF_ORIENTATION] = exif
        options["exif"] = tags.tobytes()
    Image.fromarray(pixels).save(path, quality=95, **options)
    sample = voc.VocSample(image_id, path, size[0], size[1], tuple(objects))
    voc.write_annotation(root / "Annotations" / f"{image_id}.xml", sample)
    return sample


# ------------------------------------------------------------------ 1. small boxes inside crops


def test_a_small_box_wholly_inside_a_crop_is_kept(tmp_path):
    """A 3x3 px defect: every crop centred on it holds it whole, so every crop keeps its box
    (the 4 px rule is for boxes a crop cuts through)."""
    dot = voc.VocObject("scratch", (70.0, 60.0, 73.0, 63.0))
    sample = _sample(tmp_path, "dot", [dot])
    data = VocDetection([sample], ["scratch"], train=True, crop=CropSettings(64, 1.0))
    for epoch in range(5):
        data.set_epoch(epoch)
        _, target = data[0]
        assert len(target["boxes"]) == 1, epoch
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        assert (x2 - x1, y2 - y1) == (3.0, 3.0)


def test_a_box_a_crop_cuts_to_a_sliver_is_still_dropped(tmp_path):
    """A 38 px stroke at the right edge of a 100x64 image, 64 px crops placed at random: a
    crop cutting it to under 4 px gives no box for it (the rule the fix keeps)."""
    stroke = voc.VocObject("scratch", (62.0, 10.0, 100.0, 13.0))
    sample = _sample(tmp_path, "stroke", [stroke], size=(100, 64))
    data = VocDetection([sample], ["scratch"], train=True, crop=CropSettings(64, 0.0), flips=False)
    widths = []
    for epoch in range(200):
        data.set_epoch(epoch)
        boxes = data[0][1]["boxes"]
        widths.append(float(boxes[0, 2] - boxes[0, 0]) if len(boxes) else 0.0)
    assert 0.0 in widths  # crops at x 0 or 1 keep 2 or 3 px of it: dropped
    assert all(w == 0.0 or w >= 4.0 for w in widths)


# ------------------------------------------------------ 2. images whose only objects are difficult


def test_an_image_of_difficult_objects_only_is_defective_to_the_gate(tmp_path):
    """Its difficult box is no detection positive, but the image (and a crop holding the box)
    is defective, as `VocSample.is_defective`, eval and calibration count it."""
    hard = voc.VocObject("scratch", (40.0, 50.0, 80.0, 53.0), difficult=True)
    only_hard = _sample(tmp_path, "hard", [hard])
    free = _sample(tmp_path, "free")
    assert only_hard.is_defective and not free.is_defective
    for crop in (None, CropSettings(64, 1.0)):
        data = VocDetection([only_hard, free], ["scratch"], train=True, crop=crop)
        for epoch in range(3):
            data.set_epoch(epoch)
            (_, target), (_, free_target) = data[0], data[1]
            assert len(target["boxes"]) == len(target["labels"]) == 0  # no detection positive
            assert target["defective"].item() is True, (crop, epoch)
            assert free_target["defective"].item() is False
    evaluation = VocDetection([only_hard, free], ["scratch"])
    assert [t["defective"].item() for _, t in (evaluation[0], evaluation[1])] == [True, False]


def test_a_crop_missing_the_difficult_object_is_defect_free(tmp_path):
    """Crop labels stay per crop: a crop that does not show the difficult object is a negative."""
    hard = voc.VocObject("scratch", (150.0, 120.0, 156.0, 124.0), difficult=True)
    data = VocDetection(
        [_sample(tmp_path, "corner", [hard])], ["scratch"], train=True,
        crop=CropSettings(64, 0.5), flips=False,
    )  # fmt: skip
    labels = set()
    for epoch in range(30):
        data.set_epoch(epoch)
        labels.add(data[0][1]["defective"].item())
    assert labels == {True, False}


def test_the_gate_loss_takes_the_image_label(tmp_path):
    from splitdet.shared.model import defect_loss

    hard = voc.VocObject("scratch", (40.0, 50.0, 80.0, 53.0), difficult=True)
    _, target = VocDetection([_sample(tmp_path, "hard", [hard])], ["scratch"], train=True)[0]
    confident = torch.tensor([8.0])  # the gate says: defective
    assert float(defect_loss(confident, None, [target], stride=8)) < 0.01


# ------------------------------------------------------------------- 3. EXIF-turned images


def _exif_tree(root: Path) -> Path:
    """Images tagged upright (1), untagged, upside down (3, same size), square and turned (6),
    and a mirrored PNG (2): the sizes all match their annotations."""
    box = [voc.VocObject("scratch", (10.0, 10.0, 60.0, 14.0))]
    _sample(root, "upright", box, exif=1)
    _sample(root, "untagged", box)
    _sample(root, "phone180", box, exif=3)
    _sample(root, "square90", box, size=(128, 128), exif=6)
    mirrored = _sample(root, "mirror", box)
    tags = Image.Exif()
    tags[voc.EXIF_ORIENTATION] = 2
    png = mirrored.image_path.with_suffix(".png")
    Image.open(mirrored.image_path).save(png, exif=tags.tobytes())
    mirrored.image_path.unlink()
    for split in ("train", "val"):
        voc.write_split(root, split, ["upright", "untagged", "phone180", "square90", "mirror"])
    return root


def test_an_exif_turned_image_of_the_right_size_is_refused_naming_it(tmp_path):
    root = _exif_tree(tmp_path)
    assert voc.read_annotation(root, "upright").width == W
    assert voc.read_annotation(root, "untagged").width == W
    for image_id, shown in [
        ("phone180", "turned by 180 degrees"),
        ("square90", "turned by 90 degrees clockwise"),
        ("mirror", "mirrored left to right"),
    ]:
        with pytest.raises(voc.VocError) as info:
            voc.read_annotation(root, image_id)
        message = str(info.value)
        assert message.startswith(str(root / "Annotations" / f"{image_id}.xml"))
        assert f"{image_id}." in message and shown in message
        assert "exif_transpose" in message and "exiftool -Orientation=1 -n" in message
    with pytest.raises(voc.VocError, match=r"phone180\.xml"):
        voc.read_split(root, "train")  # what train and eval read


def test_data_check_lists_every_exif_turned_image(tmp_path, capsys):
    from splitdet.shared.cli import main

    root = _exif_tree(tmp_path)
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if "EXIF orientation" in line]
    assert len(problems) == 3
    for image_id in ("phone180", "square90", "mirror"):
        assert sum(f"{image_id}.xml" in line for line in problems) == 1


def test_an_exif_turned_image_without_boxes_is_taken_as_it_is(tmp_path, capsys):
    """`data split --write-empty` wrote empty annotations for EXIF-turned images, which `data
    check` and `train` then refused ("boxes drawn on the turned view lie on other pixels"):
    with no box there is nothing to lie on the wrong pixels. Its <size> may be the turned
    view's (width and height swapped), as a tool shows it."""
    from splitdet.shared.cli import main

    box = [voc.VocObject("scratch", (10.0, 10.0, 60.0, 14.0))]
    _sample(tmp_path, "d0", box)
    _sample(tmp_path, "d1", box)
    _sample(tmp_path, "free90", exif=6)
    _sample(tmp_path, "free180", exif=3)
    _sample(tmp_path, "free270", exif=8)
    note = tmp_path / "Annotations" / "free270.xml"  # its size as a tool shows it: turned
    note.write_text(note.read_text().replace(f"<width>{W}</width>", f"<width>{H}</width>", 1)
                    .replace(f"<height>{H}</height>", f"<height>{W}</height>", 1))  # fmt: skip
    for image_id in ("free90", "free180", "free270"):
        sample = voc.read_annotation(tmp_path, image_id)
        assert sample.objects == () and (sample.width, sample.height) == (W, H)
    voc.write_split(tmp_path, "train", ["d0", "free90", "free180"])
    voc.write_split(tmp_path, "val", ["d1", "free270"])
    assert main(["data", "check", str(tmp_path), "--no-progress"]) == 0
    assert "EXIF" not in capsys.readouterr().out
    _sample(tmp_path, "turned", box, exif=6)  # a box on a turned image: still refused
    with pytest.raises(voc.VocError, match=r"turned\.xml.*EXIF orientation"):
        voc.read_annotation(tmp_path, "turned")


# ------------------------------------------------- 4. splits without a single defective image


def _tree(root: Path, defective: int, free: int) -> list[str]:
    """``defective`` images with a scratch, then ``free`` defect-free ones; no split files."""
    box = [voc.VocObject("scratch", (10.0, 10.0, 60.0, 14.0))]
    ids = [f"d{k}" for k in range(defective)] + [f"f{k}" for k in range(free)]
    for image_id in ids:
        _sample(root, image_id, box if image_id.startswith("d") else ())
    return ids


def test_data_check_calls_a_train_split_without_defects_a_problem(tmp_path, capsys):
    from splitdet.shared.cli import main

    ids = _tree(tmp_path, defective=2, free=4)
    voc.write_split(tmp_path, "train", ids[2:])  # defect-free images only
    voc.write_split(tmp_path, "val", ids[:2])
    assert main(["data", "check", str(tmp_path), "--no-progress"]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem")]
    assert len(problems) == 1 and "train.txt: no defective image" in problems[0]


@pytest.mark.parametrize("defective", [0, 1])
def test_data_split_refuses_a_val_split_without_defects(tmp_path, capsys, defective):
    from splitdet.shared.cli import main

    _tree(tmp_path, defective=defective, free=9)
    assert main(["data", "split", str(tmp_path), "--val", "0.2", "--test", "0.1"]) == 2
    err = capsys.readouterr().err
    assert f"{defective} defective image(s) leave the val split without one" in err
    assert "--val 0" in err
    assert not (tmp_path / "ImageSets").exists()  # nothing written
    assert main(["data", "split", str(tmp_path), "--val", "0", "--test", "0.1"]) == 0


# ----------------------------------------------------- 5. --init from a run of other classes


def _tiny_model(class_names: tuple[str, ...]):
    from dataclasses import replace

    from splitdet.shared.model import MultiTaskRCNN
    from splitdet.training.presets import TINY

    return MultiTaskRCNN(replace(TINY.model, class_names=class_names))


def test_init_from_a_run_of_other_class_order_moves_the_class_rows(tmp_path):
    """`train --init runs/x/last.pt --classes dent,scratch` of a run of scratch,dent: every
    tensor fits, but each class keeps its own box-predictor rows."""
    from splitdet.shared.checkpoint import save_checkpoint
    from splitdet.training.initial_weights import load_initial_weights

    torch.manual_seed(0)
    before = _tiny_model(("scratch", "dent"))
    save_checkpoint(tmp_path / "last.pt", before, epoch=0)
    saved = before.state_dict()
    cls, box = "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.bias"

    swapped = _tiny_model(("dent", "scratch"))
    report = load_initial_weights(swapped, str(tmp_path / "last.pt"))
    state = swapped.state_dict()
    assert torch.equal(state[cls][0], saved[cls][0])  # background
    assert torch.equal(state[cls][1], saved[cls][2]) and torch.equal(state[cls][2], saved[cls][1])
    assert torch.equal(state[box][4:8], saved[box][8:12])  # dent's four box deltas
    assert report["skipped"] == []
    assert report["class_rows"] == {"dent": "dent", "scratch": "scratch"}
    assert torch.equal(state["backbone.fpn.layer_blocks.0.0.weight"],
                       saved["backbone.fpn.layer_blocks.0.0.weight"])  # fmt: skip

    more = _tiny_model(("dent", "pit", "scratch"))  # a new class: fresh rows, the others moved
    fresh = more.state_dict()[cls].clone()
    report = load_initial_weights(more, str(tmp_path / "last.pt"))
    state = more.state_dict()
    assert report["class_rows"]["pit"] is None
    assert torch.equal(state[cls][1], saved[cls][2]) and torch.equal(state[cls][3], saved[cls][1])
    assert torch.equal(state[cls][2], fresh[2])


# ------------------------------------------------------------- 6. counts of overlapping splits


def test_a_split_repeating_another_is_counted_and_only_the_overlap_reported(tmp_path, capsys):
    import json

    from splitdet.shared.cli import main

    ids = _tree(tmp_path, defective=3, free=2)
    voc.write_split(tmp_path, "train", ids)
    voc.write_split(tmp_path, "val", ids[:1])  # also in train
    voc.write_split(tmp_path, "test", ids[1:2] + ids[3:4])  # both also in train
    out = tmp_path / "report.json"
    assert main(["data", "check", str(tmp_path), "--no-progress", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["splits"]["val"]["images"] == report["splits"]["val"]["defective"] == 1
    assert report["splits"]["test"]["images"] == 2 and report["splits"]["test"]["defect_free"] == 1
    assert report["splits"]["train"]["images"] == 5
    assert len(report["problems"]) == 3  # the three overlapping ids, nothing else
    assert all("also in train.txt" in line for line in report["problems"]), report["problems"]
    assert report["unlisted"] == []


def test_training_images_are_resized_as_the_model_resizes_them(tmp_path):
    """A camera image larger than the model's input: training shrinks it as torchvision's
    transform does at inference (no antialiasing), not with Pillow's blurring resize; 1 px
    scratches then look the same in training as where the model meets them."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from splitdet.training.dataset import input_scale

    pixels = np.full((320, 400, 3), 40, np.uint8)
    pixels[:, 7::13] = 230  # 1 px bright lines
    path = tmp_path / "lines.png"
    Image.fromarray(pixels).save(path)
    sample = voc.VocSample("lines", path, 400, 320)
    min_size, max_size = 100, 125
    dataset = VocDetection(
        [sample], ["scratch"], train=True, input_size=(min_size, max_size), flips=False
    )
    trained, _ = dataset[0]
    model_view = GeneralizedRCNNTransform(min_size, max_size, (0, 0, 0), (1, 1, 1)).eval()
    seen, _ = model_view([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])
    height, width = seen.image_sizes[0]
    assert tuple(trained.shape[1:]) == (height, width)
    assert abs(input_scale(320, 400, min_size, max_size) - width / 400) < 0.01
    difference = (trained - seen.tensors[0, :, :height, :width]).abs().max()
    assert float(difference) <= 0.5 / 255 + 1e-6  # only the 8-bit rounding


def test_the_annotations_filename_chooses_between_two_images_of_its_id(tmp_path):
    """im00.jpg and im00.png side by side, the annotation naming im00.png: its boxes belong
    to im00.png (before: to im00.jpg, first in extension order), and data check says the
    other is never used."""
    from splitdet.training.voc_check import check_dataset

    box = voc.VocObject("scratch", (40.0, 50.0, 80.0, 53.0))
    named = tmp_path / "JPEGImages" / "im00.png"
    named.parent.mkdir(parents=True)
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(named)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(named.with_suffix(".jpg"))
    voc.write_annotation(
        tmp_path / "Annotations" / "im00.xml", voc.VocSample("im00", named, W, H, (box,))
    )
    assert voc.read_annotation(tmp_path, "im00", check_image=True).image_path == named
    warnings = check_dataset(tmp_path).warnings
    assert any("im00.jpg never used" in w and str(named) in w for w in warnings), warnings


def test_data_check_decode_warns_of_12_bit_values_in_16_bit_images(tmp_path):
    """A Mono12 camera's values saved unscaled in 16-bit PNGs: scaled by 65535 they are dark
    and training keeps a few grey levels; data check --decode says so (full-range ones pass)."""
    from splitdet.training.voc_check import check_dataset

    rng = np.random.default_rng(0)
    for image_id, level in (("mono12", 1500), ("full16", 40000)):
        path = tmp_path / "JPEGImages" / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.normal(level, 60, (H, W)).clip(0, 65535).astype(np.uint16)
        Image.fromarray(pixels).save(path)
        voc.write_annotation(
            tmp_path / "Annotations" / f"{image_id}.xml", voc.VocSample(image_id, path, W, H)
        )
    warned = [w for w in check_dataset(tmp_path, decode=True).warnings if "of 65535" in w]
    assert len(warned) == 1 and "mono12.png: one of 1 16-bit images" in warned[0], warned
    assert "grey levels" in warned[0]
    assert not [w for w in check_dataset(tmp_path).warnings if "of 65535" in w]  # header only
