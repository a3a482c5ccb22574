"""Dataset reading, training and predict inputs, as a review reproduced them:

1. a box past the image by floating-point noise is read, clamped; a box truly past it is
   refused with its coordinates as written and which side is past;
2. an annotation without ``<size>`` is read like ``<size>`` 0x0, from the image header, by
   `data check`, `train` and `eval` alike;
3. `--init imagenet|coco` refused for a preset's model names the preset that takes it;
4. a run without validation split warns at its start, and its checkpoint records that its gate
   threshold was not calibrated (``gate_calibrated``);
5. a run its --epochs ends before its --minutes says so;
6. `train` logs the scale its images are read at, and it and `data check` warn when that scale
   leaves many boxes under 2 px;
7. `predict FOLDER` says which files its folder scan left out, and why.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.checkpoint import read_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.model import MultiTaskRCNN
from splitdet.training import voc
from splitdet.training.evaluate_export import read_samples
from splitdet.training.initial_weights import InitError, load_initial_weights
from splitdet.training.presets import CPU, CPU_R50, TINY
from splitdet.training.train import train
from splitdet.training.voc_check import check_dataset

from support import make_tiny_voc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 320, 256


def _one_image(root: Path, image_id: str, size: tuple[int, int] = (W, H)) -> Path:
    """A grey PNG of ``size`` in ``root/JPEGImages``."""
    path = root / "JPEGImages" / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (60, 60, 60)).save(path)
    return path


def _annotation(root: Path, image_id: str, box: tuple[str, str, str, str], size: str) -> None:
    """``Annotations/ID.xml`` with one scratch ``box`` (xmin, ymin, xmax, ymax as written) and
    ``size`` (the <size> element, or "" for none)."""
    xmin, ymin, xmax, ymax = box
    path = root / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{image_id}.png</filename>{size}<object><name>scratch</name>"
        f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
        "</bndbox></object></annotation>"
    )


SIZE = f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>"


# ------------------------------------------------------- 1. a box past the image by rounding


def test_a_box_past_the_image_by_rounding_noise_is_clamped(tmp_path):
    """``xmax`` 320.00000000000006 in a 320 px wide image (a tool scaling its boxes) is read
    as 320; before, it was refused as "xmax=320 ... lies outside the 320x256 image"."""
    _one_image(tmp_path, "noise")
    _annotation(tmp_path, "noise", ("233.8", "68.2", "320.00000000000006", "81.6"), SIZE)
    sample = voc.read_annotation(tmp_path, "noise")
    assert sample.objects[0].box == (232.8, 67.2, 320.0, 81.6)
    _annotation(tmp_path, "noise", ("-0.000001", "1", "10", "256.004"), SIZE)
    assert voc.read_annotation(tmp_path, "noise").objects[0].box == (0.0, 0.0, 10.0, 256.0)


@pytest.mark.parametrize(
    ("box", "shown"),
    [
        (("233", "68", "320.02", "81"), "xmax=320.02 ymax=81 lies outside the 320x256 image "
         "(xmax 320.02 > width 320"),
        (("233", "68", "300", "256.5"), "(ymax 256.5 > height 256"),
        (("-1", "68", "300", "80"), "(xmin -1 < 0"),
    ],
)  # fmt: skip
def test_a_box_past_the_image_shows_why(tmp_path, box, shown):
    """Past the tolerance a box is refused, its coordinates with every digit they hold (not
    ``:g``'s six) and the side that is past named, and what to correct."""
    _one_image(tmp_path, "past")
    _annotation(tmp_path, "past", box, SIZE)
    with pytest.raises(voc.VocError) as info:
        voc.read_annotation(tmp_path, "past")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "Annotations" / "past.xml")), message
    assert shown in message and "correct the box" in message, message


# ------------------------------------------------------------------ 2. an annotation without size


def test_an_annotation_without_size_is_read_from_the_image_header(tmp_path):
    """No <size> reads like <size> 0x0: the image header's size, in data check, train's and
    eval's readers (all of them `voc.read_annotation`). Before, "missing <size>"."""
    _one_image(tmp_path, "nosize")
    _one_image(tmp_path, "zero")
    _annotation(tmp_path, "nosize", ("10", "10", "40", "12"), "")
    _annotation(tmp_path, "zero", ("10", "10", "40", "12"), "<size><width>0</width>"
                "<height>0</height></size>")  # fmt: skip
    voc.write_split(tmp_path, "train", ["nosize", "zero"])
    voc.write_split(tmp_path, "val", ["nosize"])
    voc.write_split(tmp_path, "test", ["zero"])
    train_split = voc.read_split(tmp_path, "train")  # as `splitdet train` reads it
    assert [(s.width, s.height) for s in train_split] == [(W, H), (W, H)]
    assert train_split[0].objects == train_split[1].objects
    assert [(s.width, s.height) for s in read_samples(tmp_path, "val", ["scratch"])] == [(W, H)]
    report = check_dataset(tmp_path)
    assert not [p for p in report.problems if "Annotations" in p], report.problems
    assert report.image_sizes == {(W, H): 2}
    # the image is what tells the size: a box past it is refused as with <size> given
    _annotation(tmp_path, "nosize", ("10", "10", "330", "12"), "")
    with pytest.raises(voc.VocError, match=r"xmax 330 > width 320"):
        voc.read_annotation(tmp_path, "nosize")


# ------------------------------------------------------------------ 3. --init for a preset's model


@pytest.mark.parametrize(("preset", "init"), [(TINY, "imagenet"), (CPU_R50, "coco")])
def test_init_refusals_name_the_preset_that_takes_the_weights(preset, init):
    """Before: "use norm batch or frozen" / "need depth 50 with norm batch or frozen", which no
    option of `splitdet train` sets."""
    with pytest.raises(InitError) as info:
        load_initial_weights(MultiTaskRCNN(preset.model), init, progress=False)
    message = str(info.value)
    for needle in (
        f"--init {init}",
        "norm batch or frozen",
        f"norm {preset.model.norm}",
        "train with --preset paper",
        "no option sets norm or depth",
        "cpu (depth 18, norm group)",
        "--init none",
    ):
        assert needle in message, message


def test_train_with_init_imagenet_names_the_preset_in_one_line(tmp_path, capsys):
    data = make_tiny_voc(tmp_path / "data", n_defective=1, n_free=1)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--init", "imagenet", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--preset paper" in err, err


# ------------------------------------------ 4, 5, 6. a run without validation, capped by epochs


class _Records(logging.Handler):
    """Keeps every record the `splitdet` loggers emit."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


def _logged_run(data: Path, out: Path, config) -> tuple[dict, _Records]:
    """`train` one iteration of `config`, with every log record of it."""
    handler = _Records()
    logger = logging.getLogger("splitdet")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        row = train(config, data, out, progress=False, max_iters=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return row, handler


@pytest.fixture(scope="module")
def thin_voc(tmp_path_factory) -> Path:
    """320x256 images with 3 px strokes: 1.5 px at the tiny preset's 160x128 input."""
    return make_tiny_voc(tmp_path_factory.mktemp("voc"), n_defective=2, n_free=1, size=(W, H))


@pytest.fixture(scope="module")
def no_val(thin_voc, tmp_path_factory) -> tuple[Path, _Records]:
    """One epoch of the tiny preset with a 5-minute budget on a dataset whose val.txt is empty
    (as `data split --val 0` leaves it): the run folder and its log."""
    data = tmp_path_factory.mktemp("data") / "voc"
    shutil.copytree(thin_voc, data)
    voc.write_split(data, "val", [])
    out = tmp_path_factory.mktemp("run")
    _, records = _logged_run(data, out, replace(TINY, epochs=1, minutes=5.0, eval_every=1))
    return out, records


def test_a_run_without_validation_warns_and_records_an_uncalibrated_gate(no_val):
    """Before: no warning, no best.pt, and the gate threshold silently stayed 0.5."""
    out, records = no_val
    warnings = [w for w in records.lines(logging.WARNING) if "no validation split" in w]
    assert len(warnings) == 1, records.lines(logging.WARNING)
    for needle in ("val.txt lists no image", "no best.pt", "uncalibrated 0.5",
                   "splitdet eval", "--calibrate-split", str(out / "last.pt")):  # fmt: skip
        assert needle in warnings[0], warnings[0]
    assert not (out / "best.pt").exists()
    checkpoint = read_checkpoint(out / "last.pt")
    assert checkpoint["gate_calibrated"] is False and checkpoint["gate_threshold"] == 0.5


def test_a_run_with_validation_records_a_calibrated_gate(thin_voc, tmp_path):
    data = tmp_path / "voc"
    shutil.copytree(thin_voc, data)
    samples = voc.read_split(data, "train", ("scratch",))
    defective = [s.image_id for s in samples if s.is_defective]
    voc.write_split(data, "val", defective[:1])  # disjoint from train
    voc.write_split(data, "train", [s.image_id for s in samples if s.image_id != defective[0]])
    _, records = _logged_run(data, tmp_path / "run", replace(TINY, epochs=1, eval_every=1))
    assert not any("no validation split" in w for w in records.lines(logging.WARNING))
    assert not any("train.txt too" in w for w in records.lines(logging.WARNING))
    for name in ("last.pt", "best.pt"):
        assert read_checkpoint(tmp_path / "run" / name)["gate_calibrated"] is True


def test_a_run_whose_validation_images_are_in_train_says_so(thin_voc, tmp_path):
    """Before: validation (best.pt, the gate's calibration) judged on training images, without
    a word; only `data check` told. The tiny VOC lists every image in every split."""
    _, records = _logged_run(thin_voc, tmp_path, replace(TINY, epochs=1, eval_every=1))
    shared = [w for w in records.lines(logging.WARNING) if "train.txt too" in w]
    assert len(shared) == 1, records.lines(logging.WARNING)
    assert "3 of the 3 validation images" in shared[0], shared[0]
    first = voc.read_split_ids(thin_voc, "val")[0]
    assert repr(first) in shared[0] and "splitdet data check" in shared[0], shared[0]


def test_a_run_its_epochs_end_before_its_minutes_says_so(no_val, capsys):
    """`train --preset tiny --minutes 2` ended "trained to epoch 1 in 0.1 min", silently."""
    _, records = no_val
    capped = [line for line in records.lines(logging.INFO) if "stopped at --epochs 1" in line]
    assert len(capped) == 1, records.lines(logging.INFO)
    assert "--minutes 5" in capped[0] and "whichever comes first" in capped[0], capped[0]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "ends at whichever comes first, --minutes or --epochs" in help_text, help_text


def test_train_logs_its_input_scale_and_warns_of_thin_boxes(no_val):
    """The tiny preset (min_size 128, max_size 160) halves 320x256 images: 3 px strokes are
    1.5 px at the model's input. Before, nothing said so."""
    _, records = no_val
    scale = [line for line in records.lines(logging.INFO) if "input size of preset" in line]
    assert scale == [
        "input size of preset tiny (min_size 128, max_size 160): images 320x256 are read at "
        "160x128 (x0.5)"
    ]
    thin = [w for w in records.lines(logging.WARNING) if "under 2 px" in w]
    assert len(thin) == 1, records.lines(logging.WARNING)
    assert "2 of 2 boxes are under 2 px on their short side at the tiny preset's input size "
    "(min_size 128, max_size 160" in thin[0], thin[0]


def test_data_check_warns_of_boxes_thin_at_the_cpu_presets_input(tmp_path, capsys):
    """1224x1024 images at the cpu preset's 612x512 (x0.5): 3 px strokes are 1.5 px."""
    data = make_tiny_voc(tmp_path / "big", n_defective=2, n_free=1, size=(1224, 1024))
    report = check_dataset(data)
    thin = [w for w in report.warnings if "under 2 px" in w]
    assert len(thin) == 1, report.warnings
    for needle in ("boxes are under 2 px on their short side at the cpu preset's input size",
                   "min_size 512, max_size 640: 1224x1024 are read at 612x512 (x0.5)",
                   f"--preset paper (min_size {CPU.model.min_size * 4}, "):  # fmt: skip
        assert needle in thin[0], thin[0]
    main(["data", "check", str(data)])  # (1: make_tiny_voc lists every image in every split)
    assert "under 2 px" in capsys.readouterr().out
    # images the cpu preset does not shrink: no warning
    small = make_tiny_voc(tmp_path / "small", n_defective=2, n_free=1, size=(320, 256))
    assert not [w for w in check_dataset(small).warnings if "under 2 px" in w]


# --------------------------------------------------------------- 7. predict's folder scan


def _png(path: Path, fmt: str = "PNG") -> None:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(path, format=fmt)


def test_predict_names_the_files_its_folder_scan_left_out(tiny_model_dir, tmp_path, caplog, capsys):
    """a.webp and c.jpe are read when named, left out of a folder scan: before silently, and
    a folder of only such files was "no image files in FOLDER"."""
    folder = tmp_path / "frames"
    folder.mkdir()
    _png(folder / "a.webp", "WEBP")
    _png(folder / "c.jpe", "JPEG")
    (folder / ".hidden.webp").write_bytes(b"")  # skipped by the scan, not reported
    base = ["predict", str(folder), "--model", str(tiny_model_dir), "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "folder scan left out" not in caplog.text  # the error says it, not a log line too
    for needle in ("no image files in", "2 file(s) of an extension a folder scan does not take",
                   ".webp 1", ".jpe 1", "a.webp", "c.jpe", ".jpg .jpeg .png"):  # fmt: skip
        assert needle in err, err
    assert ".hidden" not in err
    _png(folder / "b.png")
    out = tmp_path / "out.json"
    assert main([*base, "--json", str(out)]) == 0
    left_out = [r.getMessage() for r in caplog.records if "folder scan left out" in r.getMessage()]
    assert len(left_out) == 1, left_out
    assert [r.levelno for r in caplog.records if "folder scan" in r.getMessage()] == [
        logging.WARNING
    ]
    assert "2 file(s)" in left_out[0] and "a.webp" in left_out[0], left_out
