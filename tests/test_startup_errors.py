"""Start-up problems of the long-running commands end in one line that names the problem (exit
status 2), not a traceback, and are found at start-up, not when the first flagged image fails."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import main

pytestmark = pytest.mark.timeout(120)  # a check that regressed would serve forever


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_predict_reads_tls_files_at_start_up(tiny_model_dir, tmp_path, capsys):
    Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(tmp_path / "a.png")
    missing = tmp_path / "ca.pem"
    code = main(
        ["predict", str(tmp_path / "a.png"), "--model", str(tiny_model_dir), "--threshold", "0",
         "--cloud", "127.0.0.1:9", "--tls", "--root-certs", str(missing), "--no-progress"]
    )  # fmt: skip
    assert code == 2
    _one_line_error(capsys, "--root-certs", "ca.pem", "cannot read")


def test_edge_daemon_names_a_metrics_port_in_use(tiny_model_dir, tmp_path, capsys):
    watch = tmp_path / "hot"
    watch.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["edge", "run", "--watch", str(watch), "--model", str(tiny_model_dir),
             "--cloud", "127.0.0.1:9", "--db", str(tmp_path / "edge.sqlite"), "--once",
             "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
        )  # fmt: skip
    assert code == 2
    _one_line_error(capsys, f"metrics endpoint 127.0.0.1:{port}")


def test_cloud_names_an_answers_db_that_is_not_sqlite(tiny_model_dir, tmp_path, capsys):
    bogus = tmp_path / "answers.sqlite"
    bogus.write_text("camera log, not a database\n" * 100)
    code = main(
        ["cloud", "--model", str(tiny_model_dir), "--listen", "127.0.0.1:0",
         "--answers-db", str(bogus)]
    )  # fmt: skip
    assert code == 2
    _one_line_error(capsys, "--answers-db", "answers.sqlite", "not a database")
    assert bogus.read_text().startswith("camera log")  # the file is left as it was


def test_cloud_names_an_answers_db_of_another_program(tiny_model_dir, tmp_path, capsys):
    """A SQLite file whose `answers` table is not ours: refused at start, not INTERNAL on
    every Detect call."""
    import sqlite3

    other = tmp_path / "answers.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY, x TEXT)")
        db.execute("INSERT INTO answers (x) VALUES ('kept')")
    db.close()
    code = main(
        ["cloud", "--model", str(tiny_model_dir), "--listen", "127.0.0.1:0",
         "--answers-db", str(other)]
    )  # fmt: skip
    assert code == 2
    _one_line_error(capsys, "--answers-db", "answers.sqlite", "digest", "not a splitdet")
    with sqlite3.connect(other) as db:
        assert db.execute("SELECT x FROM answers").fetchall() == [("kept",)]
    db.close()


def test_edge_run_works_with_stderr_closed(tiny_model_dir, tmp_path):
    """A supervisor may start the daemon with no stderr (`2>&-`): it ran before the SIGUSR1
    stack dump was added, which first needed a stderr file and exited 1 without one."""
    import os
    import subprocess
    import sys

    from support import image_rows, with_fd_closed

    watch = tmp_path / "hot"
    watch.mkdir()
    Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(watch / "a.png")
    done = subprocess.run(
        with_fd_closed(2, [
            sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model",
            tiny_model_dir, "--watch", watch, "--db", tmp_path / "edge.sqlite",
            "--cloud", "127.0.0.1:9", "--once", "--threshold", "2", "--after", "keep",
            "--threads", "1"]),
        stdout=subprocess.DEVNULL, timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0
    assert [row["verdict"] for row in image_rows(tmp_path / "edge.sqlite")] == ["ok"]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_exit_line_of_edge_run_is_json_when_its_log_is(tiny_model_dir, tmp_path, log_format):
    """With JSON logs (edge run's default) its last line, the only sign of why it exited, was
    plain text: a log pipeline reading JSON lost it."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model",
         str(tiny_model_dir), "--watch", str(tmp_path / "absent"), "--db",
         str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--log-format", log_format],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    if log_format == "text":
        assert last.startswith("splitdet edge: error: --watch ") and "no such folder" in last
        return
    entry = json.loads(last)
    assert (entry["level"], entry["event"], entry["command"]) == ("ERROR", "fatal", "edge")
    assert entry["msg"].startswith("splitdet edge: error: --watch ") and "absent" in entry["msg"]
