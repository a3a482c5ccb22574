"""`splitdet predict --save` after a review: it wrote its annotated copies over any file of the
same name in DIR, a dataset's training images too (`--save ds/JPEGImages`), silently, exit 0.

Now a copy goes only where nothing is, or over an earlier run's annotated copy; anything else
at a copy's name (a file, a symbolic link, a folder, a file that cannot be read) refuses the run
before any image is read (exit 2, naming it), and one put there during the run is left as it
is (that image's error). Real files, a real exported model, the in-process cloud half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import main

from support import nobody_scratch

CLI = "import sys; from splitdet.shared.cli import main; sys.exit(main(sys.argv[1:]))"


def write_image(path: Path, size: tuple[int, int], seed: int) -> bytes:
    """A random RGB image of `size` (w, h) at `path` (its folder made), in the format its
    suffix names; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def predict(model: Path, *argv: str) -> int:
    """`splitdet predict ARGV --model MODEL --gate off --no-progress` in this process (every
    image flagged, so every image gets an annotated copy); its exit status."""
    return main(["predict", *argv, "--model", str(model), "--gate", "off", "--no-progress"])


def listing(folder: Path) -> list[str]:
    """The names in `folder`, hidden ones (temporary files) too, sorted."""
    return sorted(os.listdir(folder))


def test_save_into_a_dataset_folder_replaces_none_of_its_images(tiny_model_dir, tmp_path, capsys):
    """The reviewer's case: a copy of a training image predicted with --save naming the
    dataset's image folder replaced the training image with an annotated re-encoded copy.
    The run is refused before any image is read, naming the file: nothing there changes."""
    dataset = tmp_path / "ds" / "JPEGImages"
    originals = {
        name: write_image(dataset / name, (96, 80), seed)
        for seed, name in enumerate(["img_001.jpg", "img_002.jpg", "img_003.jpg"])
    }
    given = tmp_path / "x"
    given.mkdir()
    for name in originals:
        (given / name).write_bytes(originals[name])
    out = tmp_path / "out.json"
    code = predict(tiny_model_dir, str(given), "--save", str(dataset), "--json", str(out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert (
        f"--save {dataset}: {dataset / 'img_001.jpg'}, where an annotated copy would go, is a "
        "file that is not an annotated copy from predict (and 2 more:"
    ) in err, err
    assert "choose another --save" in err
    assert {name: (dataset / name).read_bytes() for name in originals} == originals
    assert listing(dataset) == sorted(originals)  # no copy beside them, no temporary file
    assert not out.exists()  # refused before any image was read


def test_a_rerun_into_the_same_folder_replaces_its_own_copies(tiny_model_dir, tmp_path, capsys):
    """Re-running predict into the same --save folder shows the latest run: the earlier run's
    copies are replaced (here a.png changed size between the runs), while the folder's other
    files, under names no copy takes, are left alone."""
    given, saved = tmp_path / "in", tmp_path / "annotated"
    write_image(given / "a.png", (120, 90), 1)
    write_image(given / "b.png", (100, 100), 2)
    notes = saved / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("the operator's notes\n")
    other = write_image(saved / "c.jpg", (64, 64), 3)
    assert predict(tiny_model_dir, str(given), "--save", str(saved)) == 0
    first = (saved / "a.jpg").read_bytes()
    assert Image.open(saved / "a.jpg").size == (120, 90)
    write_image(given / "a.png", (140, 70), 4)
    out = tmp_path / "out.json"
    code = predict(tiny_model_dir, str(given), "--save", str(saved), "--json", str(out))
    assert code == 0, capsys.readouterr().err
    assert (saved / "a.jpg").read_bytes() != first
    assert Image.open(saved / "a.jpg").size == (140, 70)
    records = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert records["a.png"]["annotated"] == str(saved / "a.jpg")
    assert records["a.png"]["error"] is None
    assert listing(saved) == ["a.jpg", "b.jpg", "c.jpg", "notes.txt"]
    assert (saved / "c.jpg").read_bytes() == other
    assert notes.read_text() == "the operator's notes\n"


@pytest.mark.parametrize("kind", ["symbolic link", "dangling link", "folder"])
def test_a_link_or_a_folder_at_a_copys_name_refuses_the_run(tiny_model_dir, tmp_path, capsys, kind):
    """A symbolic link at a copy's name had the copy written through it onto the file it
    points at (or made that file, for a dangling one); a folder there failed each image after
    its detection (exit 1). Each now refuses the run, naming it, and is left as it was."""
    given, saved, elsewhere = tmp_path / "in", tmp_path / "annotated", tmp_path / "elsewhere"
    write_image(given / "a.png", (120, 90), 1)
    saved.mkdir()
    elsewhere.mkdir()
    target = saved / "a.jpg"
    pointed = elsewhere / "kept.jpg"
    if kind == "folder":
        target.mkdir()
        (target / "inside.txt").write_text("kept\n")
    else:
        if kind == "symbolic link":
            write_image(pointed, (50, 40), 5)
        target.symlink_to(pointed)
    before = pointed.read_bytes() if pointed.exists() else None
    assert predict(tiny_model_dir, str(given), "--save", str(saved)) == 2
    err = capsys.readouterr().err
    found = "a folder" if kind == "folder" else "a symbolic link"
    assert f"{target}, where an annotated copy would go, is {found};" in err, err
    assert "Traceback" not in err, err
    if kind == "folder":
        assert (target / "inside.txt").read_text() == "kept\n"
    else:
        assert target.is_symlink() and os.readlink(target) == str(pointed)
        assert (pointed.read_bytes() if pointed.exists() else None) == before
    assert listing(saved) == ["a.jpg"]


def test_an_unreadable_file_at_a_copys_name_refuses_the_run(tiny_model_dir):
    """A file at a copy's name that predict cannot read cannot be told to be an annotated
    copy: the run is refused, naming it as unreadable, and it keeps its bytes (the folder
    being writable, it was replaced). Run as an unprivileged user: root reads anything."""
    with nobody_scratch(tiny_model_dir) as (prefix, root, model):
        given, saved = root / "in", root / "annotated"
        write_image(given / "a.png", (120, 90), 1)
        given.chmod(0o755)
        (given / "a.png").chmod(0o644)
        target = saved / "a.jpg"
        original = write_image(target, (60, 60), 6)
        saved.chmod(0o777)
        target.chmod(0o000)
        result = subprocess.run(
            [*prefix, sys.executable, "-c", CLI, "predict", str(given), "--model", str(model),
             "--save", str(saved), "--gate", "off", "--no-progress", "--threads", "1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert (
            f"{target}, where an annotated copy would go, is a file that cannot be read "
            "(Permission denied)"
        ) in result.stderr, result.stderr
        assert target.read_bytes() == original
        assert listing(saved) == ["a.jpg"]


def test_a_file_put_at_a_copys_name_during_the_run_is_left_alone(tiny_model_dir, tmp_path):
    """The check before the run cannot see a file that appears later (another program, a
    user copying files in): the copy is then not written (it is created exclusively, or
    replaces only an annotated copy), that image's record says why, and the file keeps its
    bytes. The file is put there as the run finishes the image before."""
    from splitdet.edge.cli_predict import local_detector
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import predict_paths
    from splitdet.edge.runtime import EdgeRuntime

    given, saved = tmp_path / "in", tmp_path / "annotated"
    paths = [given / "a.png", given / "b.png"]
    write_image(paths[0], (120, 90), 1)
    write_image(paths[1], (100, 100), 2)
    saved.mkdir()
    late = saved / "b.jpg"
    bytes_put = {}

    def put_a_file(prediction) -> None:
        if Path(prediction.path) == paths[0]:
            bytes_put["b.jpg"] = write_image(late, (40, 40), 7)

    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=1), gate=False)
    detector = local_detector(str(tiny_model_dir), 1)
    first, second = predict_paths(paths, pipeline, detector, 0.5, saved, on_result=put_a_file)
    assert first.annotated == str(saved / "a.jpg") and first.error is None
    assert second.verdict == "defect" and second.annotated is None
    assert second.error == (
        f"{paths[1]}: cannot write the annotated image {late}: it exists and is a file that "
        "is not an annotated copy from predict; left as it is"
    )
    assert late.read_bytes() == bytes_put["b.jpg"]
    assert listing(saved) == ["a.jpg", "b.jpg"]  # no temporary file left


def test_inputs_are_protected_as_before(tiny_model_dir, tmp_path, capsys):
    """The input checks come first and say what they said: --save in an input's own folder,
    and a link in --save to an input, are refused as threats to the inputs; the inputs keep
    their bytes."""
    cam = tmp_path / "cam"
    original = write_image(cam / "a.jpg", (120, 90), 1)
    assert predict(tiny_model_dir, str(cam / "a.jpg"), "--save", str(cam)) == 2
    assert f"--save {cam} is in the input {cam / 'a.jpg'}" in capsys.readouterr().err
    review = tmp_path / "review"
    review.mkdir()
    (review / "a.jpg").symlink_to(cam / "a.jpg")
    assert predict(tiny_model_dir, str(cam / "a.jpg"), "--save", str(review)) == 2
    err = capsys.readouterr().err
    assert f"its annotated copy {review / 'a.jpg'} would be written over the input" in err, err
    assert (cam / "a.jpg").read_bytes() == original
    assert listing(cam) == ["a.jpg"]
