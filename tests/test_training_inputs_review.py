"""Training's inputs and refusals, as a review reproduced them:

1. training reads an image file as the edge does: the same pixels for every Pillow mode the edge
   takes, and a `VocError` naming the file for what it refuses (a float "F" TIFF was trained on
   as a black picture; a multi-frame file as its first frame), so `data check` lists it and
   `train` and `eval` stop on it;
2. resuming a run with another model configuration names the options that differ as typed
   (``--gate-on P3``, not torchvision's FPN key "1") and no preset clause when the presets match;
3. `splitdet synth` into an existing dataset gives one hint, and only one that can help.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.preprocess import ImageError, load_image
from splitdet.shared.cli import main
from splitdet.training import voc
from splitdet.training.presets import TINY
from splitdet.training.train import train

from support import make_tiny_voc

CONFIG = replace(TINY, epochs=1, eval_every=0)

# ---------------------------------------------------------- 1. the images the edge reads, alike


def _mode_files(folder: Path) -> dict[str, Path]:
    """Small images in the modes Pillow reads from the formats a VOC tree holds: the ones the
    edge takes and the ones it refuses (name: file)."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB")
    gray = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), "L")
    alpha = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8), "L")
    wide = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
    images = {
        "rgb.png": rgb,
        "gray.png": gray,
        "palette.png": rgb.convert("P"),
        "gray_alpha.png": Image.merge("LA", (gray, alpha)),
        "one_bit.png": gray.convert("1"),
        "rgba.png": Image.merge("RGBA", (*rgb.split(), alpha)),
        "cmyk.jpg": rgb.convert("CMYK"),
        "cmyk.tif": rgb.convert("CMYK"),
        "ycbcr.tif": rgb.convert("YCbCr"),
        "sixteen.png": Image.fromarray(wide),
        "sixteen_big_endian.tif": Image.fromarray(wide.astype(">u2")),
        "int32.tif": Image.fromarray(wide.astype(np.int32)),
        "float.tif": Image.fromarray(rng.random((12, 10), dtype=np.float32), "F"),
        "lab.tif": rgb.convert("LAB"),
    }
    files = {}
    for name, image in images.items():
        files[name] = folder / name
        image.save(files[name])
    for name in ("frames.tif", "frames.png"):  # a multi-page TIFF, an animated PNG
        files[name] = folder / name
        gray.save(files[name], save_all=True, append_images=[alpha])
    return files


def test_training_reads_each_image_as_the_edge_does(tmp_path):
    """Every file the edge reads, training reads to the same pixels (to its 8 bits); every file
    the edge refuses, training refuses too, naming the file, from its header already."""
    files = _mode_files(tmp_path)
    refused = []
    for name, path in files.items():
        mode = Image.open(path).mode
        try:
            edge = load_image(path)
        except ImageError as exc:
            assert str(exc).startswith(str(path)), exc
            refused.append(name)
            with pytest.raises(voc.VocError) as decoding:
                voc.load_rgb(path)
            with pytest.raises(voc.VocError) as header:
                voc.image_size(path)
            for error in (decoding.value, header.value):
                message = str(error)
                assert message.startswith(f"{path}: "), message
                assert repr(mode) in message and "the edge refuses" in message, message
            continue
        assert voc.image_size(path) == (10, 12), name
        trained = np.asarray(voc.load_rgb(path), dtype=np.float32).transpose(2, 0, 1) / 255
        # 8-bit modes: the same numbers; 16-bit ones: training's rounding to 8 bits only
        tolerance = 0.5 / 255 + 1e-6 if mode.startswith("I") else 1e-6
        assert np.abs(trained - edge).max() <= tolerance, (name, mode)
    assert sorted(refused) == ["float.tif", "frames.png", "frames.tif", "lab.tif"]


def _dataset_with(tmp_path: Path, image: Image.Image) -> tuple[Path, Path]:
    """A tiny VOC tree (one split, train, so that `data check` finds nothing else wrong) whose
    first image is replaced by ``image`` as a TIFF; (root, that file)."""
    root = make_tiny_voc(tmp_path / "data", n_defective=3, n_free=1)
    for split in ("val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").unlink()
    first = root / "JPEGImages" / "img_000.png"
    first.unlink()  # the annotation's <filename> names it; the reader finds img_000.tif instead
    victim = root / "JPEGImages" / "img_000.tif"
    image.save(victim)
    return root, victim


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The folder of a one-step tiny run (gate on P3) on a clean dataset."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_tiny_voc(tmp_path_factory.mktemp("clean"), n_defective=3, n_free=1)
        run = tmp_path_factory.mktemp("run")
        train(CONFIG, data, run, progress=False, max_iters=1)
    finally:
        torch.set_num_threads(threads)
    return run


def test_a_float_tiff_is_a_problem_that_stops_train_and_eval(tmp_path, finished_run, capsys):
    """A 32-bit float TIFF of values 0..1: the edge refuses it, and convert("RGB") made it
    black; data check said ok and train and eval ran on it."""
    pixels = np.linspace(0, 1, 128 * 160, dtype=np.float32).reshape(128, 160)
    root, victim = _dataset_with(tmp_path, Image.fromarray(pixels, "F"))
    refusal = f"{victim}: unsupported image mode 'F'"

    for decode in ([], ["--decode"]):
        assert main(["data", "check", str(root), "--no-progress", *decode]) == 1
        out = capsys.readouterr().out
        assert f"problem: {refusal}" in out, out

    assert main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--preset",
                 "tiny", "--epochs", "1", "--eval-every", "0", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert refusal in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "last.pt").exists()

    copy = tmp_path / "model.pt"  # eval writes the calibrated threshold into its checkpoint
    shutil.copy(finished_run / "last.pt", copy)
    assert main(["eval", "--checkpoint", str(copy), "--data", str(root), "--split", "train",
                 "--calibrate-split", "none", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert refusal in err and "Traceback" not in err, err


def test_a_multi_frame_tiff_is_a_problem_as_on_the_edge(tmp_path, capsys):
    """Training took the first page of a multi-page TIFF; the edge refuses the file."""
    pages = [Image.new("L", (160, 128), value) for value in (40, 200)]
    root, victim = _dataset_with(tmp_path, pages[0])
    pages[0].save(victim, save_all=True, append_images=pages[1:])
    with pytest.raises(ImageError, match="multi-frame"):
        load_image(victim)
    assert main(["data", "check", str(root), "--decode", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"problem: {victim}: a multi-frame image (2 frames, mode 'L')" in out, out


def test_an_image_past_the_edge_s_size_limits_is_a_problem_as_on_the_edge(tmp_path, capsys):
    """A 70000x2 px strip: the edge refuses a side over 65536 px; training took it."""
    root, victim = _dataset_with(tmp_path, Image.new("L", (70_000, 2), 40))
    with pytest.raises(ImageError, match="side over 65536"):
        load_image(victim)
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"problem: {victim}: 70000x2 px is more than the edge takes" in out, out


def test_a_file_past_the_edge_s_byte_limit_is_a_problem_as_on_the_edge(tmp_path, capsys):
    """A TIFF with 300 MB of data after its pixels (a sparse file: no disk used)."""
    from splitdet.edge.preprocess import MAX_FILE_BYTES

    root, victim = _dataset_with(tmp_path, Image.new("L", (160, 128), 40))
    with open(victim, "r+b") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageError, match="over the 256 MiB"):  # (one stat: never loaded)
        load_image(victim)
    assert main(["data", "check", str(root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    expected = f"is {MAX_FILE_BYTES + 1} bytes, over the 256 MiB ({MAX_FILE_BYTES} bytes) limit"
    assert f"problem: {victim} {expected}: the edge would refuse it" in out, out


# ------------------------------------------------------------ 2. resuming another configuration


def test_resuming_another_configuration_names_options_as_typed(tmp_path, finished_run, capsys):
    """A cpu-recipe run (gate P3) resumed with --gate-on P5 was refused with "gate_level '1'
    there, '3' here; preset 'cpu' there, 'cpu' here": FPN keys, and a preset that is no
    difference. (The tiny recipe is the cpu one's, smaller; without --preset a resumed run
    takes its own, from train_config.json.)"""
    import torch

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    data = make_tiny_voc(tmp_path / "data", n_defective=3, n_free=1)
    start = f"{run / 'last.pt'} holds a model of another configuration than this run's ("
    argv = ["train", "--data", str(data), "--out", str(run), "--epochs", "2", "--eval-every",
            "0", "--no-progress", "--resume"]  # fmt: skip
    expected = {
        ("--gate-on", "P5"): "(--gate-on P3 there, P5 here)",
        ("--gate-on", "pool", "--pixel-bits", "12"): (
            "(--gate-on P3 there, pool here; --pixel-bits 16 there, 12 here)"
        ),
        ("--classes", "scratch,dent"): "(--classes scratch there, scratch,dent here)",
        ("--preset", "cpu"): (
            "(box_head_dim 128 there, 512 here; max_size 160 there, 640 here; min_size 128 "
            "there, 512 here; preset 'tiny' there, 'cpu' here)"
        ),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for options, difference in expected.items():
            assert main([*argv, *options]) == 2
            err = capsys.readouterr().err
            assert start in err and difference in err and "Traceback" not in err, err
    finally:
        torch.set_num_threads(threads)


# -------------------------------------------------------------- 3. synth into an existing folder


def test_synth_into_an_existing_folder_gives_the_one_hint_that_helps(tmp_path, capsys):
    """Into its own earlier dataset: "(overwrite to replace) (choose another --out, or
    --overwrite)", the hint twice; into other data or a file, --overwrite was suggested though
    it is refused there."""
    argv = ["synth", "--size", "256x256", "--defective", "1", "--free", "1", "--test-defective",
            "0", "--test-free", "0", "--workers", "1", "--no-progress"]  # fmt: skip
    out = tmp_path / "synthetic"
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("overwrite") == 1 and err.count("another --out") == 1, err
    assert f"{out} already holds a synthetic dataset; --overwrite replaces it" in err, err

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    for target in (other, a_file):
        assert main([*argv, "--out", str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "--overwrite" not in err and err.count("choose another --out") == 1, err
    assert (other / "notes.txt").read_text() == "keep" and a_file.read_text() == "keep"
