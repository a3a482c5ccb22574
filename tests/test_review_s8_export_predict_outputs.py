"""`splitdet predict` refuses, before any image is read, a --json that --save would make into
a folder: the results were otherwise written only at the end, into a folder, and lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import run_main


def _image(folder: Path) -> Path:
    """A small grey PNG in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part.png"
    Image.fromarray(np.full((128, 160, 3), 90, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("save", ["out.json", "out.json/annotated"])
def test_a_json_that_save_makes_a_folder_of_is_refused_first(
    tiny_model_dir, tmp_path, capsys, save
):
    image = _image(tmp_path / "in")
    target = tmp_path / "out.json"
    code, out, err = run_main(
        capsys, "predict", image, "--model", tiny_model_dir, "--gate", "off",
        "--json", target, "--save", tmp_path / save, "--no-progress",
    )  # fmt: skip
    assert code == 2, out + err
    assert f"--json {target} is where --save" in err
    assert not target.exists()  # refused before --save was made: nothing written
    assert "images:" not in out  # no image was read


def test_a_json_beside_the_save_folder_is_written(tiny_model_dir, tmp_path, capsys):
    image = _image(tmp_path / "in")
    target = tmp_path / "out" / "results.json"
    target.parent.mkdir()
    code, out, err = run_main(
        capsys, "predict", image, "--model", tiny_model_dir, "--gate", "off",
        "--json", target, "--save", tmp_path / "out" / "annotated", "--no-progress",
    )  # fmt: skip
    assert code in (0, 1), out + err  # (an annotated copy's own failure is not the point)
    assert target.is_file()


def test_a_threshold_with_the_gate_off_is_refused(tiny_model_dir, tmp_path, capsys):
    """`--gate off --threshold 0.9` was taken, the threshold ignored in silence (the records
    said `gate_threshold: null`): a user comparing thresholds measured nothing."""
    image = tmp_path / "one.png"
    Image.new("L", (64, 48), 40).save(image)
    argv = ["predict", image, "--model", tiny_model_dir, "--gate", "off", "--threshold", "0.9"]
    code, out, err = run_main(capsys, *argv, "--json", tmp_path / "r.json")
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        "splitdet predict: error: --threshold 0.9 with --gate off: no image is judged by the "
        "gate (every one goes to detection); give one or the other"
    )
    assert out == "" and not (tmp_path / "r.json").exists()
