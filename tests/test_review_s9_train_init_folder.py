"""`train --init FOLDER`: a run folder or a model export given where a checkpoint file goes.

Both were refused as "not imagenet, coco, none, nor an existing file", though the folder
exists: the message now says it is a folder and which file to give."""

from __future__ import annotations

from pathlib import Path

from splitdet.shared.cli import main

from support import train_argv


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_init_with_a_run_folder_names_its_checkpoints(tiny_voc, tmp_path, capsys):
    earlier = tmp_path / "earlier-run"
    earlier.mkdir()
    for name in ("last.pt", "best.pt"):
        (earlier / name).write_bytes(b"")
    assert main(train_argv(tiny_voc, tmp_path / "run", "--init", str(earlier))) == 2
    error = _error(capsys)
    assert "not imagenet, coco, none, nor an existing file" not in error, error
    wanted = f"--init {earlier}: a folder, not a checkpoint file; give a checkpoint file in it: "
    assert wanted + "best.pt, last.pt" in error, error


def test_init_with_an_export_says_it_holds_no_whole_model(
    tiny_voc, tiny_model_dir: Path, tmp_path, capsys
):
    assert main(train_argv(tiny_voc, tmp_path / "run", "--init", str(tiny_model_dir))) == 2
    error = _error(capsys)
    assert f"--init {tiny_model_dir}: a folder, not a checkpoint file; it is a model export" in (
        error
    ), error
    assert not (tmp_path / "run" / "last.pt").exists()
