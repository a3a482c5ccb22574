"""A val split whose every object is marked difficult: mAP, which picks best.pt, ignores
difficult objects, so `train` ran every epoch to "val mAP 0.000", wrote no best.pt and ended
without a word (the next `eval --checkpoint RUN/best.pt` found no file), while `data check`
said "ok". Both now name val.txt and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitdet.training import voc

from support import make_tiny_voc, run_main, train_argv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _difficult_val(root: Path) -> Path:
    """A tiny VOC tree whose val split holds one defect-free image and one defective image
    whose every object is marked difficult; train holds regular objects, and no image is in
    two splits (no test split: a warning)."""
    data = make_tiny_voc(root, n_defective=3, n_free=2)
    path = data / "Annotations" / "img_000.xml"
    path.write_text(
        path.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>")
    )
    assert all(o.difficult for o in voc.read_annotation(data, "img_000").objects)
    voc.write_split(data, "train", ["img_001", "img_002", "img_003"])
    voc.write_split(data, "val", ["img_000", "img_004"])
    (data / "ImageSets" / "Main" / "test.txt").unlink()
    return data


def test_data_check_reports_a_val_split_of_difficult_objects_only(tmp_path, capsys):
    data = _difficult_val(tmp_path / "data")
    code, out, err = run_main(capsys, "data", "check", data)
    assert code == 1, out + err
    val = data / "ImageSets" / "Main" / "val.txt"
    assert f"problem: {val}: every object of the validation images is marked difficult" in out


def test_train_refuses_a_val_split_of_difficult_objects_only(tmp_path, capsys):
    data = _difficult_val(tmp_path / "data")
    run = tmp_path / "run"
    argv = [*train_argv(data, run)[:-3], "--eval-every", "1", "--no-progress"]
    code, _, err = run_main(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    assert "val.txt: every object of the validation images is marked difficult" in err
    assert "`splitdet data check" in err
    assert not run.exists()  # refused before training: no run ending without best.pt


def test_a_val_split_with_one_regular_object_still_trains_and_keeps_best_pt(tmp_path, capsys):
    data = _difficult_val(tmp_path / "data")
    voc.write_split(data, "train", ["img_002", "img_003"])
    voc.write_split(data, "val", ["img_000", "img_001", "img_004"])
    code, out, err = run_main(capsys, "data", "check", data)
    assert code == 0, out + err
    assert "marked difficult" not in out + err
    run = tmp_path / "run"
    argv = [*train_argv(data, run)[:-3], "--eval-every", "1", "--no-progress"]
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    assert (run / "best.pt").is_file()
