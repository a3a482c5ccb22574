"""`splitdet predict`: detections equal the monolithic detector's; bad files do not stop it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitdet.edge.preprocess import load_image
from splitdet.shared.cli import main
from splitdet.shared.manifest import read_manifest
from splitdet.training.export import export_model

from conftest import make_tiny_model
from support import bomb_png, run_without_torch, sliver_png


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index, (h, w) in enumerate([(300, 400), (333, 517), (256, 256)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            folder / f"good{index}.png"
        )
    return folder


def test_predict_lossless_equals_monolithic(tiny_model, tiny_model_dir, image_dir, tmp_path):
    out = tmp_path / "results.json"
    code = main(
        [
            "predict",
            str(image_dir),
            "--model",
            str(tiny_model_dir),
            "--codec",
            "fp32",
            "--gate",
            "off",
            "--score-threshold",
            "0",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    records = json.loads(out.read_text())
    assert len(records) == 3
    manifest = read_manifest(tiny_model_dir, verify=False)
    for record in records:
        assert record["verdict"] == "defect" and record["bytes_sent"] > 0
        assert record["fingerprint"] == manifest.fingerprint  # which export said so
        assert (record["gate_threshold"], record["codec"]) == (None, "fp32")  # --gate off
        assert record["score_threshold"] == 0  # (the boxes kept: every one)
        image = torch.from_numpy(load_image(record["path"]))
        with torch.inference_mode():
            reference = tiny_model([image])[0]
        assert len(reference["boxes"]) > 0
        assert len(record["boxes"]) == len(reference["boxes"])
        np.testing.assert_allclose(record["boxes"], reference["boxes"].numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose(record["scores"], reference["scores"].numpy(), rtol=0, atol=1e-4)
        assert record["labels"] == reference["labels"].tolist()
        assert {"read", "preprocess", "gate", "complete", "encode", "cloud_rpn"} <= set(
            record["timings"]
        )


def test_predict_reports_bad_files_and_goes_on(tiny_model_dir, image_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in image_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image\n" * 20)
    (folder / "corrupt.png").write_bytes((image_dir / "good0.png").read_bytes()[:300])
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "sliver.png").write_bytes(sliver_png())  # a valid image no input size can hold
    out = tmp_path / "results.json"
    saved = tmp_path / "annotated"
    code = main(
        [
            "predict",
            str(folder),
            "--model",
            str(tiny_model_dir),
            "--threshold",
            "0",
            "--json",
            str(out),
            "--save",
            str(saved),
            "--no-progress",
        ]
    )
    assert code == 1  # some files were errors
    records = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(out.read_text())}
    assert len(records) == 8
    for name in ("empty.jpg", "text.jpg", "corrupt.png", "bomb.png", "sliver.png"):
        assert records[name]["verdict"] == "error"
        assert name in records[name]["error"]
    assert "too elongated" in records["sliver.png"]["error"]
    for name in ("good0.png", "good1.png", "good2.png"):
        assert records[name]["verdict"] == "defect" and records[name]["error"] is None
        assert (saved / name.replace(".png", ".jpg")).is_file()


def test_predict_edge_side_never_imports_torch(tiny_model_dir, image_dir):
    code = f"""
    import sys
    from splitdet.shared.cli import main
    status = main(["predict", {str(image_dir)!r}, "--model", {str(tiny_model_dir)!r},
                   "--threshold", "2", "--json", "-", "--no-progress"])
    assert status == 0, status
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch loaded"
    """
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["verdict"] for r in records] == ["ok"] * 3

    # a flagged image needs the cloud half: a clear message, no traceback
    flagged = run_without_torch(code.replace('"2"', '"0"').replace("status == 0", "status == 2"))
    assert flagged.returncode == 0, flagged.stderr
    assert "needs the full install with torch" in flagged.stderr
    assert "Traceback" not in flagged.stderr


def test_without_torch_a_run_that_can_flag_is_refused_before_any_image(
    tiny_model_dir, image_dir, tmp_path
):
    """On the edge-only install, predict without --cloud read and gated every image up to the
    first flagged one, then refused the run (torch missing) and dropped the gate's work on them
    all. It is refused before the first image now (a threshold above 1, which flags none, runs:
    test_predict_edge_side_never_imports_torch); at 1 too, which a saturated gate's p reaches."""
    import shutil

    folder = tmp_path / "in"
    shutil.copytree(image_dir, folder)
    (folder / "broken.png").write_bytes(b"not a png")  # read first: its error line shows it was
    out, save = tmp_path / "out.json", tmp_path / "annotated"
    result = run_without_torch(f"""
        from splitdet.shared.cli import main
        status = main(["predict", {str(folder)!r}, "--model", {str(tiny_model_dir)!r},
                           "--threshold", "1", "--json", {str(out)!r}, "--save", {str(save)!r},
                       "--no-progress"])
        assert status == 2, status
        """)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "needs the full install with torch" in result.stderr and "--cloud" in result.stderr
    assert "broken.png" not in result.stderr, result.stderr  # no image was read
    assert not out.exists() and not save.exists()


def test_predict_through_the_server_equals_in_process(tiny_model_dir, image_dir, tmp_path):
    """`--cloud ADDRESS` with torch blocked gives the in-process detections, box for box (on
    the server's one torch thread: with two, a sum may be split otherwise, a float32 step off),
    boxes on the image's edge included (the edge clamped the server's onto it, in-process ones
    went unclamped: both now clamp in the detection core)."""
    from cloud_fixtures import start_cloud_process

    local = tmp_path / "local.json"
    args = [
        str(image_dir),
        "--model",
        str(tiny_model_dir),
        "--threshold",
        "0",
        "--score-threshold",
        "0",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert main(["predict", *args, "--json", str(local)]) == 0
    server = start_cloud_process(tiny_model_dir, tmp_path / "cloud", "predict")
    try:
        remote = run_without_torch(
            f"""
            import sys
            from splitdet.shared.cli import main
            status = main(["predict", *{args!r}, "--json", "-", "--cloud", {server.address!r}])
            assert status == 0, status
            assert "torch" not in sys.modules
            """
        )
    finally:
        server.stop()
    assert remote.returncode == 0, remote.stderr
    ours, theirs = json.loads(local.read_text()), json.loads(remote.stdout)
    assert [r["path"] for r in ours] == [r["path"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["verdict"] == b["verdict"] == "defect" and len(a["boxes"]) > 0
        assert a["boxes"] == b["boxes"] and a["scores"] == b["scores"]
        assert a["labels"] == b["labels"] and a["bytes_sent"] == b["bytes_sent"]
        assert "cloud_rpn" in b["timings"] and "round_trip" in b["timings"]


def test_predict_refuses_a_server_with_another_model(tiny_model_dir, image_dir, tmp_path, capsys):
    from cloud_fixtures import start_cloud_process

    other = tmp_path / "other"
    export_model(make_tiny_model(seed=7), other)
    server = start_cloud_process(other, tmp_path / "cloud", "other")
    try:
        code = main(
            [
                "predict",
                str(image_dir),
                "--model",
                str(tiny_model_dir),
                "--threshold",
                "0",
                "--cloud",
                server.address,
                "--no-progress",
            ]
        )
    finally:
        server.stop()
    assert code == 2
    assert "deploy the same export on both sides" in capsys.readouterr().err


def test_predict_with_a_dead_cloud_fails_clearly(tiny_model_dir, image_dir, capsys, caplog):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(
        [
            "predict",
            str(image_dir),
            "--model",
            str(tiny_model_dir),
            "--threshold",
            "0",
            "--cloud",
            f"127.0.0.1:{port}",
            "--timeout",
            "3",
            "--no-progress",
        ]
    )
    assert code == 1  # each flagged image an error, the others judged (the run goes on)
    err = capsys.readouterr().err + caplog.text
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err


def test_token_files_drop_a_bom_and_refuse_non_ascii(tiny_model_dir, image_dir, tmp_path, capsys):
    """A token saved with a byte-order mark still works; one gRPC cannot carry (non-ASCII) is
    refused by name before any image is read, not found out when the first image fails."""
    from splitdet.shared.cli import CommandError, read_token

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffs3cret-token\r\n".encode())
    assert read_token(bom) == "s3cret-token"
    for name, text in (("accent.txt", "pässword\n"), ("nbsp.txt", "abc\u00a0def\n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(CommandError, match=f"{name}.*printable ASCII"):
            read_token(tmp_path / name)
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(CommandError, match=r"blank\.txt is empty"):
        read_token(tmp_path / "blank.txt")
    code = main(
        ["predict", str(image_dir), "--model", str(tiny_model_dir), "--threshold", "0",
         "--cloud", "127.0.0.1:9", "--token-file", str(tmp_path / "accent.txt"),
         "--json", str(tmp_path / "out.json"), "--no-progress"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "accent.txt" in err and "printable ASCII" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["missing folder", "a directory"])
def test_predict_refuses_an_unwritable_json_before_reading_images(
    tiny_model_dir, image_dir, tmp_path, capsys, where
):
    """Found only at the end, an unwritable --json would lose the whole run's results."""
    target = tmp_path / "nowhere" / "out.json" if where == "missing folder" else tmp_path
    code = main(["predict", str(image_dir), "--model", str(tiny_model_dir), "--json", str(target)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--json {target}" in err and "Traceback" not in err
    assert "images:" not in err  # refused before any image was processed


def test_predict_refuses_a_save_folder_it_cannot_make(tiny_model_dir, image_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should go\n")
    code = main(
        ["predict", str(image_dir), "--model", str(tiny_model_dir), "--save", str(blocker / "x")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"--save {blocker / 'x'}: cannot make the folder" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "where", ["the input folder", "inside it, recursive", "an input file's folder"]
)
def test_predict_refuses_to_save_among_its_inputs(tiny_model_dir, image_dir, tmp_path, capsys,
                                                  where):  # fmt: skip
    """--save into the images' own folder wrote each annotated copy over its original; the
    refused run makes no folder."""
    images = tmp_path / "in"
    images.mkdir()
    original = (image_dir / "good0.png").read_bytes()
    (images / "good0.png").write_bytes(original)
    given = images / "good0.png" if where == "an input file's folder" else images
    save = images / "annotated" if where.startswith("inside") else images
    argv = ["predict", str(given), "--model", str(tiny_model_dir), "--threshold", "0"]
    if where.startswith("inside"):
        argv.append("--recursive")
    assert main([*argv, "--save", str(save), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--save {save} is in the input {given}" in err and "Traceback" not in err
    assert (images / "good0.png").read_bytes() == original
    assert sorted(p.name for p in images.iterdir()) == ["good0.png"]


def test_predict_may_save_in_a_subfolder_of_a_folder_it_does_not_recurse(
    tiny_model_dir, image_dir, tmp_path
):
    """Without --recursive, in/annotated/good0.jpg can neither overwrite an image of in/ nor
    join this run's images."""
    images = tmp_path / "in"
    images.mkdir()
    (images / "good0.png").write_bytes((image_dir / "good0.png").read_bytes())
    argv = ["predict", str(images), "--model", str(tiny_model_dir), "--threshold", "0"]
    assert main([*argv, "--save", str(images / "annotated"), "--no-progress"]) == 0
    assert (images / "annotated" / "good0.jpg").is_file()


@pytest.mark.parametrize(
    ("flag", "value"), [("--threshold", "nan"), ("--score-threshold", "nan"), ("--threads", "-1")]
)
def test_predict_names_a_value_that_cannot_work(tiny_model_dir, image_dir, capsys, flag, value):
    """A NaN threshold passed every image as ok; --threads -1 was a traceback (exit 1)."""
    assert main(["predict", str(image_dir), "--model", str(tiny_model_dir), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err and "Traceback" not in err


def test_annotated_copies_of_long_names_fit_the_file_system(tiny_model_dir, image_dir, tmp_path):
    """A 250-character name as .png and .jpg: the second copy's `_2` made its name too long
    ("File name too long": an error on that image, exit 1)."""
    images, saved = tmp_path / "in", tmp_path / "annotated"
    images.mkdir()
    stem = "n" * 250
    (images / f"{stem}.png").write_bytes((image_dir / "good0.png").read_bytes())
    Image.open(image_dir / "good1.png").save(images / f"{stem}.jpg")
    argv = ["predict", str(images), "--model", str(tiny_model_dir), "--threshold", "0"]
    assert main([*argv, "--save", str(saved), "--no-progress"]) == 0
    names = sorted(p.name for p in saved.iterdir())
    assert len(names) == 2 and all(len(n.encode()) <= 255 for n in names)


def test_annotated_images_of_the_same_name_do_not_overwrite_each_other(
    tiny_model_dir, image_dir, tmp_path
):
    """a/good0.png and b/good0.png (and b/good0.jpg) each get their own annotated copy."""
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "good0.png").write_bytes((image_dir / "good0.png").read_bytes())
    Image.open(image_dir / "good1.png").save(second / "good0.jpg")
    out, saved = tmp_path / "out.json", tmp_path / "annotated"
    args = ["predict", str(first), str(second), "--model", str(tiny_model_dir), "--threshold", "0"]
    assert main([*args, "--save", str(saved), "--json", str(out), "--no-progress"]) == 0
    records = json.loads(out.read_text())
    written = [r["annotated"] for r in records]
    assert len(set(written)) == 3 and all(Path(w).is_file() for w in written)
    assert sorted(p.name for p in saved.iterdir()) == ["good0.jpg", "good0_2.jpg", "good0_3.jpg"]
    # each annotated copy shows its own image: the .jpg source had another size
    sizes = [Image.open(r["annotated"]).size for r in records]
    assert sorted(sizes) == sorted(Image.open(r["path"]).size for r in records)
    assert len(set(sizes)) == 2


def test_a_failed_detection_call_makes_the_exit_status_1(
    tiny_model_dir, image_dir, tmp_path, capsys
):
    """The server refuses every call (features beyond its 1 MiB decode bound): each flagged
    image is an error in the JSON and the run's status says so (it said 0 before)."""
    from splitdet.cloud.core import DetectionCore, load_cloud
    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import MIB, ServerConfig

    # (`splitdet cloud --max-decoded-mib 1` now refuses to serve this export at all; a core
    # given to the server is the caller's, not checked at start)
    config = ServerConfig(model_dir=tiny_model_dir, listen="127.0.0.1:0", threads=1)
    core = DetectionCore(*load_cloud(tiny_model_dir), store=None, max_decoded_bytes=MIB)
    server = CloudServer(config, core).start()
    out = tmp_path / "out.json"
    try:
        code = main(
            ["predict", str(image_dir), "--model", str(tiny_model_dir), "--threshold", "0",
             "--codec", "fp32", "--cloud", f"127.0.0.1:{server.port}", "--json", str(out),
             "--no-progress"]
        )  # fmt: skip
    finally:
        server.stop(0)
    records = json.loads(out.read_text())
    assert code == 1
    # no detections to report: an error (p_defect kept), not a defect with no boxes, and
    # none of its bytes were delivered
    assert all(r["verdict"] == "error" and r["boxes"] == [] for r in records), records
    assert all(r["p_defect"] is not None and r["bytes_sent"] == 0 for r in records)
    assert all("detection failed" in r["error"] for r in records), records
    summary = capsys.readouterr().out
    assert "3 images: 0 ok, 0 defect (0 boxes), 3 errors; 0.00 MB of features sent" in summary


def test_recursive_takes_the_images_of_subfolders(tiny_model_dir, image_dir, tmp_path, capsys):
    """A camera archive of dated subfolders: --recursive takes them (hidden ones skipped); without
    it a folder holding only subfolders is refused with the hint."""
    archive = tmp_path / "archive"
    for sub in ("2026-12-01", "2026-12-02/line-b", ".trash"):
        (archive / sub).mkdir(parents=True)
    good = (image_dir / "good0.png").read_bytes()
    for name in ("2026-12-01/a.png", "2026-12-02/line-b/b.png", ".trash/c.png"):
        (archive / name).write_bytes(good)
    base = ["predict", str(archive), "--model", str(tiny_model_dir), "--no-progress"]
    assert main(base) == 2
    assert "--recursive takes those of subfolders too" in capsys.readouterr().err
    out = tmp_path / "out.json"
    assert main([*base, "--recursive", "--json", str(out)]) == 0
    found = sorted(
        Path(r["path"]).relative_to(archive).as_posix() for r in json.loads(out.read_text())
    )
    assert found == ["2026-12-01/a.png", "2026-12-02/line-b/b.png"]
