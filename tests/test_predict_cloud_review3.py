"""`predict --cloud` and `eval --model --cloud` with a cloud that is down when the first
flagged image is reached (review 3).

Before, the model check that precedes the first detection call was made once, not retried:
a cloud restarting at that moment stopped the run at once with exit status 2, whatever
--timeout, and `predict --json` was never written (the images judged before were lost). Now
the check is retried within --timeout as a detection call is; a cloud still unreachable then
is that image's error (exit status 1, --json written), and a cloud that refuses the model for
good still stops the run (exit status 2), the records finished before written first.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import main

from support import wait_for


def _free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports nothing listens on (all bound at once while chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


#: Loopback ports of this module, free when it is loaded (none fixed: another run may hold one).
PORT_LATE, PORT_OTHER, PORT_DOWN, PORT_EVAL = _free_ports(4)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The cloud tests' tiny export (`cloud_fixtures.shared_model_dir(0)`)."""
    from cloud_fixtures import shared_model_dir

    return shared_model_dir(0)[1]


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder of an unreadable file (a.png, judged first: an error record) and two small
    random images (b.png, c.png)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    rng = np.random.default_rng(3)
    for name in ("b.png", "c.png"):
        Image.fromarray((rng.random((200, 240, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def _serve(model: Path, port: int, tmp_path: Path):
    """A CloudServer in this process serving `model` on 127.0.0.1:`port`."""
    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    config = ServerConfig(
        model_dir=model, listen=f"127.0.0.1:{port}", threads=1, metrics_port=0,
        answers_db=tmp_path / f"answers-{port}.sqlite",
    )  # fmt: skip
    return CloudServer(config).start()


def _started_once_it_waits(argv: list[str], log: Path, model: Path, port: int, tmp_path: Path):
    """Run `argv` (stderr to `log`); once it says it waits for the cloud, start one serving
    `model` on `port`; (exit status, stdout) once it ends. Nothing is left running."""
    with open(log, "w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    server = None
    try:
        waiting = "the cloud did not answer"
        wait_for(lambda: waiting in log.read_text() or process.poll() is not None, 60, waiting)
        assert process.poll() is None, f"it gave up at once:\n{log.read_text()}"
        server = _serve(model, port, tmp_path)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        if server is not None:
            server.stop(0)
    return process.returncode, out


def test_predict_waits_within_timeout_for_a_cloud_that_comes_up(model_dir, inputs, tmp_path):
    """The reviewer's case: nothing listens as the first flagged image is reached (a cloud
    restarting); with --timeout 30 predict waits for it, and every image gets its boxes."""
    out = tmp_path / "out.json"
    argv = [sys.executable, "-m", "splitdet.shared.cli", "predict", str(inputs), "--model",
            str(model_dir), "--cloud", f"127.0.0.1:{PORT_LATE}", "--gate", "off", "--timeout",
            "30", "--no-progress", "--json", str(out)]  # fmt: skip
    log = tmp_path / "stderr.txt"
    code, _ = _started_once_it_waits(argv, log, model_dir, PORT_LATE, tmp_path)
    records = json.loads(out.read_text())
    assert code == 1, log.read_text()  # (a.png is unreadable)
    assert [r["verdict"] for r in records] == ["error", "defect", "defect"], log.read_text()
    assert "cloud_retry_wait" in records[1]["timings"]


def test_a_cloud_unreachable_past_timeout_is_that_images_error(model_dir, inputs, tmp_path,
                                                               capsys):  # fmt: skip
    """Still unreachable after --timeout: the flagged images are `error` records (detection
    failed, p_defect kept), the run goes on, --json is written, exit status 1."""
    out = tmp_path / "out.json"
    code = main(["predict", str(inputs), "--model", str(model_dir), "--cloud",
                 f"127.0.0.1:{PORT_DOWN}", "--gate", "off", "--timeout", "2", "--no-progress",
                 "--json", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1, err
    records = json.loads(out.read_text())
    assert [r["verdict"] for r in records] == ["error"] * 3
    for record in records[1:]:
        assert "detection failed: UNAVAILABLE" in record["error"]
        assert record["p_defect"] is not None and record["run_complete"] is True
    assert "Traceback" not in err and "error: cloud" not in err


def test_a_cloud_of_another_model_stops_the_run_keeping_what_was_judged(inputs, tmp_path,
                                                                        capsys):  # fmt: skip
    """A refusal for good (the cloud does not serve this export) still stops the run with exit
    status 2, but the records finished before it are written to --json first."""
    from cloud_fixtures import shared_model_dir

    server = _serve(shared_model_dir(1)[1], PORT_OTHER, tmp_path)
    out = tmp_path / "out.json"
    try:
        code = main(["predict", str(inputs), "--model", str(shared_model_dir(0)[1]), "--cloud",
                     f"127.0.0.1:{PORT_OTHER}", "--gate", "off", "--timeout", "10",
                     "--no-progress", "--json", str(out)])  # fmt: skip
    finally:
        server.stop(0)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"splitdet predict: error: cloud 127.0.0.1:{PORT_OTHER}: "), last
    assert "FAILED_PRECONDITION" in last and f"--json {out}" in last, last
    records = json.loads(out.read_text())
    assert [(Path(r["path"]).name, r["verdict"]) for r in records] == [("a.png", "error")]
    assert records[0]["run_complete"] is False
    assert "stopped after 1 of 3 images" in captured.out


def test_eval_waits_within_timeout_for_a_cloud_that_comes_up(model_dir, tiny_voc, tmp_path):
    """`eval --model --cloud` checked the cloud once before any image: a cloud restarting then
    ended it at once (exit status 2). Now it waits within --timeout."""
    out = tmp_path / "eval.json"
    argv = [sys.executable, "-m", "splitdet.shared.cli", "eval", "--data", str(tiny_voc),
            "--model", str(model_dir), "--cloud", f"127.0.0.1:{PORT_EVAL}", "--timeout", "30",
            "--no-progress", "--json", str(out)]  # fmt: skip
    log = tmp_path / "stderr.txt"
    code, _ = _started_once_it_waits(argv, log, model_dir, PORT_EVAL, tmp_path)
    assert code == 0, log.read_text()
    assert json.loads(out.read_text())["image_errors"] == []


def test_eval_with_a_cloud_down_past_timeout_fails_clearly(model_dir, tiny_voc, capsys):
    """Unreachable all through --timeout: one line naming the address and --timeout, exit
    status 2 (nothing evaluated yet, so nothing is lost)."""
    code = main(["eval", "--data", str(tiny_voc), "--model", str(model_dir), "--cloud",
                 f"127.0.0.1:{PORT_DOWN}", "--timeout", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert f"cloud 127.0.0.1:{PORT_DOWN}: did not answer within --timeout 2 s" in last, last
    assert "Traceback" not in err


def test_a_name_that_is_not_utf8_is_detected_by_the_cloud_and_written_readably(model_dir, tmp_path):
    """(A file-system review: a flagged image whose name's bytes are not UTF-8, a Latin-1
    `Müller.png` from an SMB share, failed its detection call: its name went into a protobuf
    string as lone surrogates; and --json wrote such names as lone surrogates, which JSON
    readers turn into U+FFFD. Now the name goes, and is written, as `edge results` writes it:
    each byte that is not UTF-8 as \\xNN.)"""
    folder, out = tmp_path / "in", tmp_path / "out.json"
    folder.mkdir()
    image = (np.random.default_rng(5).random((200, 240, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(os.fsdecode(os.fsencode(folder) + b"/M\xfcller.png"), "PNG")
    [port] = _free_ports(1)
    server = _serve(model_dir, port, tmp_path)
    try:
        code = main(["predict", str(folder), "--model", str(model_dir), "--cloud",
                     f"127.0.0.1:{port}", "--gate", "off", "--timeout", "30", "--no-progress",
                     "--json", str(out)])  # fmt: skip
    finally:
        server.stop(0)
    assert code == 0
    [record] = json.loads(out.read_bytes().decode("utf-8"))
    assert record["verdict"] == "defect" and record["error"] is None, record
    assert record["path"].endswith("/M\\xfcller.png"), record["path"]
