"""`splitdet synth` stopped by a full disk (here a file size limit: the same failed write).

It said `--out DIR: cannot write ([Errno 27] File too large)`: no file named, nothing said of
the unfinished dataset it left, nor what to do; a Ctrl-C at the same point said both.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import FILE_SIZE_LIMITED

pytestmark = pytest.mark.timeout(120)

SMALL = ["--size", "256x256", "--defective", "3", "--free", "2", "--test-defective", "1",
         "--test-free", "1", "--workers", "1", "--no-progress"]  # fmt: skip


def test_a_full_disk_names_the_file_the_remnant_and_the_fix(tmp_path):
    out = tmp_path / "data"
    argv = [sys.executable, "-c", FILE_SIZE_LIMITED, "12000", "synth", "--out", str(out), *SMALL]

    full = subprocess.run(argv, capture_output=True, text=True, timeout=60)

    assert full.returncode == 2, full.stderr
    assert json.loads((out / "dataset.json").read_text())["complete"] is False
    err = full.stderr.strip()
    assert "Traceback" not in err
    assert f"cannot write {out / 'JPEGImages'}/gasket_" in err, err
    assert "File too large" in err, err
    assert f"{out} holds an unfinished dataset: rerun the same command with --overwrite" in err
    assert "free space" in err, err
