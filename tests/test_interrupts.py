"""Ctrl-C (SIGINT to the terminal's whole process group) during `splitdet synth`'s rendering
and during `splitdet demo`'s data stage: each render worker printed its own KeyboardInterrupt
traceback, and the demo called its interrupted stage a failure ("failed with status 130", exit
2). Now one "interrupted" line and exit 130. Real commands in their own process groups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _interrupted(argv: list[str], started: str | Path, tmp_path: Path) -> tuple[int, str]:
    """(exit status, stderr) of `splitdet ARGV` sent SIGINT to its process group once `started`
    is on its stderr, or (a Path) a file matching it exists (as a terminal's Ctrl-C is sent to
    the whole foreground group)."""
    err_path = tmp_path / "stderr.txt"
    with err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "splitdet.shared.cli", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90

        def seen() -> bool:
            if isinstance(started, Path):
                return any(started.parent.glob(started.name))
            return started in err_path.read_text(errors="replace")

        while not seen():
            assert process.poll() is None, err_path.read_text(errors="replace")
            assert time.monotonic() < deadline, f"never saw {started!r}"
            time.sleep(0.05)
        time.sleep(1.0)  # (into the rendering: the workers are up)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return code, err_path.read_text(errors="replace")


def test_ctrl_c_while_synth_renders_on_two_workers_is_one_line(tmp_path):
    argv = ["synth", "--out", str(tmp_path / "data"), "--size", "1224x1024", "--defective",
            "300", "--free", "100", "--workers", "2"]  # fmt: skip
    # (its first image written: the workers are up; no bar is drawn into a file)
    code, err = _interrupted(argv, tmp_path / "data" / "JPEGImages" / "*.jpg", tmp_path)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "splitdet synth: interrupted" in err


def test_ctrl_c_during_the_demos_data_stage_is_an_interruption_not_a_failure(tmp_path):
    argv = ["demo", "--workdir", str(tmp_path / "demo"), "--preset", "tiny",
            "--train-minutes", "0.1", "--bench-images", "0", "--threads", "2"]  # fmt: skip
    code, err = _interrupted(argv, "== data", tmp_path)
    assert code == 130, err
    assert "Traceback" not in err and "failed with status" not in err, err
    assert "splitdet demo: interrupted" in err
