"""An image the model's input would shrink to under 1 px on a side (2000x1 at the tiny
preset's 128/160) is refused by name before training, as the edge refuses it: `train` went
into its first epoch and ended in torch's traceback ("Input and output sizes should be greater
than 0"), and `data check` passed the dataset."""

from __future__ import annotations

import numpy as np

from splitdet.training import voc

from support import make_tiny_voc, run_main, train_argv, write_voc_image


def _with_sliver(tmp_path, split: str):
    """A tiny VOC tree whose `split` also lists a 2000x1 defect-free image."""
    root = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=1)
    write_voc_image(root, "sliver", np.full((1, 2000, 3), 90, np.uint8), [])
    voc.write_split(root, split, [*voc.read_split_ids(root, split), "sliver"])
    return root


def test_train_refuses_a_too_elongated_image_by_name_before_training(tmp_path, capsys):
    root = _with_sliver(tmp_path, "train")
    run = tmp_path / "run"
    code, _, err = run_main(capsys, *train_argv(root, run))
    assert code == 2, err  # (a problem of the data, as its other refusals)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("splitdet train: error: "), err
    assert "sliver.png: 2000x1 px is too elongated for the model's input size" in last, last
    assert "take them out of the split" in last
    assert not (run / "last.pt").exists()  # refused before the first epoch


def test_train_refuses_one_in_the_validation_split_too(tmp_path, capsys):
    root = _with_sliver(tmp_path, "val")
    code, _, err = run_main(capsys, *train_argv(root, tmp_path / "run", "--eval-every", "1"))
    assert code == 2, err  # (a problem of the data, as its other refusals)
    assert "sliver.png: 2000x1 px is too elongated" in err.strip().splitlines()[-1], err


def test_an_image_in_both_splits_is_counted_once(tmp_path, capsys):
    root = _with_sliver(tmp_path, "train")
    voc.write_split(root, "val", [*voc.read_split_ids(root, "val"), "sliver"])
    code, _, err = run_main(capsys, *train_argv(root, tmp_path / "run", "--eval-every", "1"))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert ": 1 image(s) cannot be read at" in last, last
    assert last.count("sliver.png") == 1, last


def test_data_check_calls_it_a_problem(tmp_path, capsys):
    root = _with_sliver(tmp_path, "train")
    code, out, err = run_main(capsys, "data", "check", root)
    assert code == 1, (out, err)
    problems = [line for line in (out + err).splitlines() if "too elongated" in line]
    assert len(problems) == 1, out + err
    assert problems[0].startswith(f"problem: {root / 'JPEGImages' / 'sliver.png'}: 2000x1 px")
    assert "at the cpu preset's input" in problems[0]


def test_eval_refuses_a_split_holding_one_by_name(tiny_voc, finished_run, capsys):
    write_voc_image(tiny_voc, "sliver", np.full((1, 2000, 3), 90, np.uint8), [])
    voc.write_split(tiny_voc, "sliver_test", ["img_000", "sliver"])
    code, out, err = run_main(
        capsys, "eval", "--data", tiny_voc, "--checkpoint", finished_run / "last.pt",
        "--split", "sliver_test", "--calibrate-split", "none", "--no-progress",
    )  # fmt: skip
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"splitdet eval: error: {tiny_voc / 'ImageSets' / 'Main' / 'sliver_test.txt'}: 1 image(s)"
    ), last
    assert "sliver.png: 2000x1 px is too elongated" in last, last
