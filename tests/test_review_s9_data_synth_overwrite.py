"""`splitdet synth --overwrite` on a synthetic dataset one's own images were added to.

It emptied JPEGImages/ and Annotations/ whole: the user's images and annotations copied into
the synthetic tree were deleted without a word. It now refuses, naming them, before it
writes anything; a killed run's temporary files and a file browser's `.DS_Store` do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

SMALL = ["--size", "256x256", "--defective", "2", "--free", "1", "--test-defective", "0",
         "--test-free", "0", "--workers", "1", "--no-progress"]  # fmt: skip


def _synth(out, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "splitdet.shared.cli", "synth", "--out", str(out), *SMALL]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=60)


def test_overwrite_keeps_ones_own_images_added_to_a_synthetic_dataset(tmp_path):
    out = tmp_path / "gaskets"
    assert _synth(out).returncode == 0
    mine = out / "JPEGImages" / "line_0001.png"
    mine.write_bytes(b"my only copy")
    (out / "Annotations" / "line_0001.xml").write_text("<annotation/>")
    before = (out / "dataset.json").read_text()

    again = _synth(out, "--seed", "1", "--overwrite")

    assert again.returncode == 2, again.stderr
    assert "Traceback" not in again.stderr
    assert str(mine) in again.stderr and "move them out" in again.stderr, again.stderr
    assert mine.read_bytes() == b"my only copy"
    assert (out / "Annotations" / "line_0001.xml").is_file()
    assert (out / "dataset.json").read_text() == before  # untouched: still complete, seed 0

    # moved out, it replaces the dataset; a killed run's temporary file and a file browser's
    # litter are no reason to refuse
    mine.unlink()
    (out / "Annotations" / "line_0001.xml").unlink()
    (out / "JPEGImages" / ".gasket_00001.jpg.k2x9_q0a.tmp").write_bytes(b"half")
    (out / "JPEGImages" / ".DS_Store").write_bytes(b"finder")

    redone = _synth(out, "--seed", "1", "--overwrite")

    assert redone.returncode == 0, redone.stderr
    assert json.loads((out / "dataset.json").read_text())["seed"] == 1
