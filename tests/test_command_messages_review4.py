"""A log-parser review of command messages (synth's Ctrl-C line, which now names the unfinished
--out as SIGTERM's does, is asserted in test_synth_review3.py): `splitdet predict`
without --cloud said "MB of features sent" though nothing was sent; `splitdet loadtest` named
a skipped image's path twice, in a line that did not say which command wrote it.

Real commands: predict in-process, loadtest against a real cloud server on loopback."""

from __future__ import annotations

import numpy as np
from cloud_fixtures import shared_model_dir
from PIL import Image

from splitdet.edge.cli_predict import summary
from splitdet.edge.predict import Prediction
from splitdet.shared.cli import main

#: The loopback port of this review's cloud (its range: 53300-53399).
CLOUD_PORT = 53321


def _images(folder, broken: str | None = None):
    """Two small images in `folder`, and an undecodable file named `broken` if given."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
    if broken is not None:
        (folder / broken).write_bytes(b"not an image")
    return folder


def test_predict_without_cloud_says_the_features_would_be_sent(tiny_model_dir, tmp_path, capsys):
    images = _images(tmp_path / "images")
    argv = ["predict", str(images), "--model", str(tiny_model_dir), "--threshold", "0",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 images: 0 ok, 2 defect" in out and " MB of features would be sent" in out, out


def test_the_summary_says_sent_for_a_cloud_and_would_be_sent_in_process():
    flagged = Prediction("a.png", "defect", 0.9, boxes=[[1.0, 2.0, 3.0, 4.0]], bytes_sent=10**6)
    ended = "1 images: 0 ok, 1 defect (1 boxes), 0 errors; 1.00 MB of features"
    assert summary([flagged], 1, sent=True) == f"{ended} sent"
    assert summary([flagged], 1) == f"{ended} would be sent"


def test_loadtest_names_a_skipped_image_once(tmp_path, capsys):
    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    _, model_dir, _ = shared_model_dir(0)
    images = _images(tmp_path / "images", broken="broken.png")
    config = ServerConfig(model_dir=model_dir, listen=f"127.0.0.1:{CLOUD_PORT}", threads=1,
                          answers_db=tmp_path / "answers.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        argv = ["loadtest", str(images), "--model", str(model_dir), "--cloud",
                f"127.0.0.1:{server.port}", "--clients", "1", "--seconds", "0.5"]  # fmt: skip
        code = main(argv)
    finally:
        server.stop(0)
    err = capsys.readouterr().err
    assert code == 0, err
    broken = str(images / "broken.png")
    [line] = [line for line in err.splitlines() if "broken.png" in line]
    assert line.startswith(f"splitdet loadtest: skipped {broken}: "), line
    assert line.count(broken) == 1, line
