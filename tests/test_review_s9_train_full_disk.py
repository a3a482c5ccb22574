"""A `train` run that cannot write its checkpoints (a full disk, a file size limit) names the
file it failed to write and what the run folder still holds.

A run stopped in its first epoch between best.pt and last.pt resumes from a copy of best.pt;
when that copy could not be written, the error named best.pt ("best.pt: cannot write"), the
file it only read and the one the user must keep, not last.pt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import FILE_SIZE_LIMITED, full_disk_open, make_tiny_voc, train_argv


def _train_limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED, str(limit), "train", *argv],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_a_resume_that_cannot_copy_best_pt_names_last_pt(tmp_path: Path):
    data = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=1)
    run = tmp_path / "run"
    run.mkdir()
    best = run / "best.pt"
    best.write_bytes(os.urandom(300_000))  # (copied before it is read: any content)
    result = _train_limited(
        100_000, "--data", str(data), "--out", str(run), "--resume", "--preset", "tiny",
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"splitdet train: error: {run / 'last.pt'}: cannot write it"), error
    assert "file too large" in error and f"{best} is kept" in error, error
    assert "Traceback" not in result.stderr
    assert len(best.read_bytes()) == 300_000
    assert not (run / "last.pt").exists()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def _last_pt_on_a_full_disk(file, mode="r", *args, **kwargs):
    """`open` for shared.checkpoint: last.pt's temporary file is on a full disk (best.pt, written
    first, fits)."""
    if "w" in mode and Path(file).name.startswith(".last.pt."):
        return full_disk_open(file, mode, *args, **kwargs)
    return open(file, mode, *args, **kwargs)


def test_a_first_epoch_whose_last_pt_fails_says_best_pt_holds_it(
    tiny_voc, tmp_path, monkeypatch, capsys
):
    """The first epoch's last.pt failed after its best.pt was written: the error said only "no
    last.pt was written", though best.pt held the epoch and --resume continues from it."""
    from splitdet.shared import checkpoint as checkpoint_module
    from splitdet.shared.cli import main

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "open", _last_pt_on_a_full_disk, raising=False)
    argv = [*train_argv(tiny_voc, run)[:-3], "--eval-every", "1", "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"splitdet train: error: epoch 0: {run / 'last.pt'}: cannot write"), (
        error
    )
    assert f"no last.pt was written; {run / 'best.pt'} holds the epoch: --resume continues" in (
        error
    ), error
    assert (run / "best.pt").is_file() and not (run / "last.pt").exists()
