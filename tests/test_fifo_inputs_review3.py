"""A FIFO where a command expects a small file (a file-system review: `edge run --db` naming a
FIFO, a `--token-file` or a `--ready-file` that is one, hung the command at its start with no
word: opening a FIFO for reading waits for a writer). Each is refused, or passed over, at once.

Real FIFOs (os.mkfifo), the real `splitdet edge run` as a process; each step bounded, so a
hang fails the test instead of holding the run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from splitdet.shared.cli import CommandError, remove_ready_file, token_lines
from splitdet.shared.regular_file import read_regular

pytestmark = pytest.mark.timeout(120)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _within(seconds: float, call):
    """`call()`'s result, or AssertionError when it has not returned in `seconds` (it waits)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as exc:  # (handed to the test)
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:  # (a writer lets the blocked open go, so the thread ends)
        raise AssertionError(f"still waiting after {seconds} s")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def test_edge_run_with_a_fifo_as_its_db_is_refused_at_once(tiny_model_dir, tmp_path):
    watch, db = tmp_path / "hot", _fifo(tmp_path / "edge.sqlite")
    watch.mkdir()
    argv = [sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model",
            str(tiny_model_dir), "--watch", str(watch), "--db", str(db), "--cloud",
            "127.0.0.1:9", "--once", "--log-format", "text"]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("edge run waited on the FIFO given as --db")
    assert done.returncode == 2, done.stderr
    assert "not a regular file (a FIFO)" in done.stderr and str(db) in done.stderr, done.stderr


def test_a_fifo_as_token_file_is_refused_naming_it(tmp_path):
    fifo = _fifo(tmp_path / "token")
    with pytest.raises(CommandError, match=r"cannot read --token-file .*not a regular file"):
        _within(10, lambda: token_lines(fifo))


def test_a_fifo_as_ready_file_is_passed_over_at_start(tmp_path):
    fifo = _fifo(tmp_path / "ready.json")
    _within(10, lambda: remove_ready_file(fifo, unless_running=True))
    assert not fifo.exists()  # (not a ready file: removed, as an unreadable one is at a start)


def test_read_regular_follows_a_link_to_a_file_and_names_a_folder(tmp_path):
    (tmp_path / "secret").write_bytes(b"token\n")
    (tmp_path / "link").symlink_to(tmp_path / "secret")  # (a Kubernetes secret's layout)
    assert read_regular(tmp_path / "link") == b"token\n"
    with pytest.raises(OSError, match=r"not a regular file \(a folder\)"):
        read_regular(tmp_path)
