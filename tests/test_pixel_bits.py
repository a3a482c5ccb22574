"""`--pixel-bits`: a Mono12 camera's values saved unscaled in 16-bit files (0..4095) are read
over 0..4095 in training, carried by the checkpoint and the export's manifest, and read the same
way on the edge; a pixel past the range is refused by name; exports made before the setting
existed keep their fingerprint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.preprocess import ImageError, decode_image, load_image
from splitdet.shared.checkpoint import read_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.manifest import MANIFEST_NAME, read_manifest
from splitdet.training import voc

from support import daemon_config, image_rows, make_tiny_voc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_12_bit(path: Path, values: np.ndarray) -> Path:
    """`values` (uint16 [H, W], 0..4095 as a Mono12 camera gives them) as a 16-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def to_12_bit(root: Path) -> Path:
    """Rewrite a VOC tree's 8-bit images as 16-bit PNGs of 12-bit values (v * 4095 / 255)."""
    for image_id in voc.read_split_ids(root, "train"):
        sample = voc.read_annotation(root, image_id)
        gray = np.asarray(Image.open(sample.image_path).convert("L"), dtype=np.float64)
        sample.image_path.unlink()
        path = save_12_bit(sample.image_path.with_suffix(".png"), np.rint(gray * 4095 / 255))
        voc.write_annotation(
            root / "Annotations" / f"{image_id}.xml",
            voc.VocSample(image_id, path, sample.width, sample.height, sample.objects),
        )
    return root


@pytest.fixture(scope="module")
def voc_12_bit(tmp_path_factory) -> Path:
    return to_12_bit(make_tiny_voc(tmp_path_factory.mktemp("voc12"), n_defective=3, n_free=1))


def test_the_edge_scales_them_by_4095_and_refuses_a_pixel_past_it(tmp_path):
    values = np.array([[0, 1, 2048, 4095]] * 4, np.uint16)
    path = save_12_bit(tmp_path / "mono12.png", values)
    image = load_image(path, pixel_bits=12)
    assert image.shape == (3, 4, 4)
    expected = np.float32(values[0]) / np.float32(4095)
    np.testing.assert_allclose(image[:, 0], np.stack([expected] * 3), rtol=0)
    # the default, 16 bits, reads the same file 16 times darker
    np.testing.assert_allclose(load_image(path)[0, 0], values[0] / 65535, rtol=1e-6)
    past = save_12_bit(tmp_path / "mono14.png", values * 4)
    with pytest.raises(ImageError) as refused:
        decode_image(past.read_bytes(), str(past), pixel_bits=12)
    message = str(refused.value)
    assert str(past) in message and "16380" in message and "12-bit range (0..4095)" in message


def test_training_reads_them_as_the_edge_does(tmp_path):
    values = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    path = save_12_bit(tmp_path / "ramp.png", values)
    trained = np.asarray(voc.load_rgb(path, pixel_bits=12), dtype=np.float32)
    edge = load_image(path, pixel_bits=12).transpose(1, 2, 0) * 255
    assert np.abs(trained - edge).max() <= 0.5 + 1e-3  # 8-bit rounding, no more
    assert trained.max() == 255 and trained.min() == 0  # the whole range, not 1/16 of it
    past = save_12_bit(tmp_path / "past.png", values + 1)
    with pytest.raises(voc.VocError, match=r"past\.png: a pixel is 4096, past the 12-bit range"):
        voc.load_rgb(past, pixel_bits=12)


def _train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--epochs", "1",
            "--eval-every", "0", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def run_12_bit(voc_12_bit, tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny run trained with --pixel-bits 12, its export)."""
    run = tmp_path_factory.mktemp("run12")
    model_dir = tmp_path_factory.mktemp("export12") / "model"
    assert main(_train_argv(voc_12_bit, run, "--pixel-bits", "12")) == 0
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(model_dir)]) == 0
    return run, model_dir


def _camera_images(folder: Path) -> np.ndarray:
    """mono12.png (a Mono12 camera's values) and mono16.png (the same scaled to 16 bits: a
    camera set to another depth than the model's) in `folder`; the 12-bit values [H, W]."""
    values = np.random.default_rng(0).integers(0, 4096, (128, 160)).astype(np.uint16)
    save_12_bit(folder / "mono12.png", values)
    save_12_bit(folder / "mono16.png", values * 16)
    return values


def _p_defect_over(model_dir: Path, values: np.ndarray, full_scale: int) -> float:
    """The export's p(defect) for `values` read over 0..full_scale."""
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.runtime import EdgeRuntime

    image = (values / np.float32(full_scale)).astype(np.float32)
    return EdgePipeline(EdgeRuntime(model_dir)).process_array(np.stack([image] * 3)).p_defect


def test_train_records_it_and_export_and_predict_use_it(voc_12_bit, run_12_bit, tmp_path):
    run, model_dir = run_12_bit
    assert read_checkpoint(run / "last.pt")["config"]["pixel_bits"] == 12
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert manifest["input"]["pixel_bits"] == 12 == manifest["model_config"]["pixel_bits"]

    values = _camera_images(tmp_path / "images")
    out = tmp_path / "predictions.json"
    argv = ["predict", str(tmp_path / "images"), "--model", str(model_dir), "--json", str(out)]
    assert main([*argv, "--no-progress"]) == 1  # an image was refused, the other not
    records = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert "12-bit range (0..4095)" in records["mono16.png"]["error"]
    assert records["mono12.png"]["error"] is None
    expected = _p_defect_over(model_dir, values, 4095)
    assert records["mono12.png"]["p_defect"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - _p_defect_over(model_dir, values, 65535)) > 1e-4  # tells them apart

    # resuming with other bits is refused by name; the run is left as it was
    assert main(_train_argv(voc_12_bit, run, "--resume", "--pixel-bits", "10")) == 2
    assert read_checkpoint(run / "last.pt")["config"]["pixel_bits"] == 12


def test_the_daemon_reads_them_with_the_export_s_bits(run_12_bit, tmp_path):
    """`edge run` decodes with the manifest's bits: the 12-bit image gets the p(defect) of its
    values over 4095; the 16-bit one is quarantined, its reason naming the range."""
    from splitdet.edge.daemon import EdgeDaemon

    model_dir = run_12_bit[1]
    config = daemon_config(model_dir, tmp_path, settle_s=0.0, after="archive")
    values = _camera_images(config.watch)
    assert EdgeDaemon(config).run() == 0
    found = {Path(row["path"]).name: row for row in image_rows(config.db)}
    assert found["mono12.png"]["verdict"] == "ok"
    p_defect = _p_defect_over(model_dir, values, 4095)
    assert found["mono12.png"]["p_defect"] == pytest.approx(p_defect, rel=1e-5)
    assert found["mono16.png"]["verdict"] == "error"
    assert "12-bit range (0..4095)" in found["mono16.png"]["reason"]


def test_training_refuses_a_pixel_past_the_bits(voc_12_bit, tmp_path, capsys):
    """Training reads its images with the run's bits: 4096 in a 12-bit run names the file."""
    root = shutil.copytree(voc_12_bit, tmp_path / "voc")
    victim = sorted((root / "JPEGImages").glob("*.png"))[0]
    values = np.asarray(Image.open(victim)).copy()
    values[0, 0] = 4096
    save_12_bit(victim, values)
    assert main(_train_argv(root, tmp_path / "run", "--pixel-bits", "12")) == 2
    err = capsys.readouterr().err
    assert f"{victim}: a pixel is 4096" in err and "Traceback" not in err, err
    # the command it names finds it (a plain `data check` reads no pixels)
    command = f"splitdet data check {root} --decode --pixel-bits 12"
    assert f"`{command}` lists every problem at once" in err, err
    assert main([*command.split()[1:], "--no-progress"]) == 1
    assert f"{victim}: a pixel is 4096" in capsys.readouterr().out


def test_exports_from_before_the_setting_keep_their_fingerprint(tiny_model_dir, tmp_path):
    """A manifest written before `pixel_bits` existed (no such key, its fingerprint hashed
    without it) still verifies, and a new export at the default has that same fingerprint; the
    setting, once not the default, is covered by the fingerprint."""
    old = shutil.copytree(tiny_model_dir, tmp_path / "old")
    data = json.loads((old / MANIFEST_NAME).read_text())
    # written at the default, the setting is left out of the model config (older splitdet
    # versions refuse keys they do not know) and only shown in "input"
    assert "pixel_bits" not in data["model_config"] and data["input"].pop("pixel_bits") == 16
    canonical = {  # what format 1 hashed before the setting existed
        "artifacts": dict(sorted(data["artifacts"].items())),
        "spec_version": data["spec_version"],
        "model_config": data["model_config"],
        "gate_threshold": data["gate_threshold"],
    }
    data["fingerprint"] = hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(old).fingerprint == read_manifest(tiny_model_dir).fingerprint
    data["model_config"]["pixel_bits"] = 12
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fingerprint does not match"):
        read_manifest(old)


def test_data_check_suggests_the_bits_and_refuses_pixels_past_them(voc_12_bit, tmp_path, capsys):
    root = shutil.copytree(voc_12_bit, tmp_path / "voc")
    check = ["data", "check", str(root), "--decode", "--no-progress", "--json", "-"]
    report = _report(capsys, main(check))
    assert any("--pixel-bits 12" in w and "of 65535" in w for w in report["warnings"]), report
    assert any("--pixel-bits 16 (the default)" in w for w in report["warnings"]), report
    report = _report(capsys, main([*check, "--pixel-bits", "12"]))
    assert not any("--pixel-bits" in w for w in report["warnings"]), report
    assert not any("pixel" in p for p in report["problems"]), report
    victim = sorted((root / "JPEGImages").glob("*.png"))[0]
    values = np.asarray(Image.open(victim)).copy()
    values[0, 0] = 4096
    save_12_bit(victim, values)
    report = _report(capsys, main([*check, "--pixel-bits", "12"]))
    assert any(p.startswith(f"{victim}: a pixel is 4096") for p in report["problems"]), report
    # the text report counts it beside the images read, not among them (4 = 3 + 1 was 3 + 1 + 1)
    text = ["data", "check", str(root), "--decode", "--no-progress", "--pixel-bits", "12"]
    assert main(text) == 1
    assert "train: 3 images (2 defective + 1 defect-free), and 1 more with a problem" in (
        capsys.readouterr().out
    )


def _report(capsys, status: int) -> dict:
    """data check's JSON report (exit status 1: the tiny tree's splits overlap, a problem)."""
    out, err = capsys.readouterr()
    assert status in (0, 1) and "Traceback" not in err, err
    report = json.loads(out)
    assert status == (1 if report["problems"] else 0)
    return report


def test_edge_check_says_how_the_export_reads_16_bit_images(run_12_bit, tmp_path, capsys):
    """Before going live, `edge check --image` on a camera's own file: the model line names
    the bits, and a file of another depth fails naming the range."""
    model_dir = run_12_bit[1]
    _camera_images(tmp_path)
    check = ["edge", "check", "--model", str(model_dir), "--image"]
    assert main([*check, str(tmp_path / "mono12.png")]) == 0
    out = capsys.readouterr().out
    assert "16-bit images read as 12-bit values (0..4095)" in out, out
    assert main([*check, str(tmp_path / "mono16.png")]) == 1
    out = capsys.readouterr().out
    assert "12-bit range (0..4095)" in out, out


def test_data_check_says_when_the_bits_change_nothing(tmp_path, capsys):
    """--pixel-bits 12 on a dataset of 8-bit images: nothing to apply it to, and data check
    says so (the export would still record it)."""
    root = make_tiny_voc(tmp_path / "voc8", n_defective=2, n_free=1)
    check = ["data", "check", str(root), "--decode", "--no-progress", "--json", "-"]
    report = _report(capsys, main([*check, "--pixel-bits", "12"]))
    assert any("no image is 16-bit grayscale" in w for w in report["warnings"]), report
    report = _report(capsys, main(check))
    assert not any("16-bit" in w for w in report["warnings"]), report


def test_data_check_does_not_say_no_16_bit_image_beside_one_past_the_bits(tmp_path, capsys):
    """A 16-bit image past --pixel-bits 11 is a problem; the warning "no image is 16-bit ...
    train without it" beside it gave the wrong fix (the camera's bits are more, not none)."""
    from PIL import Image

    root = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=1)
    first = sorted((root / "JPEGImages").iterdir())[0]
    Image.fromarray(np.full((128, 160), 4095, np.uint16)).save(first)  # a 12-bit camera's
    check = ["data", "check", str(root), "--decode", "--no-progress", "--json", "-"]
    report = _report(capsys, main([*check, "--pixel-bits", "11"]))
    assert any("past the 11-bit range" in p for p in report["problems"]), report
    assert not any("no image is 16-bit" in w for w in report["warnings"]), report
