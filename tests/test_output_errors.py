"""Commands that write a folder name the one they cannot make, in one line: `synth --out`,
`export --out` (and `train --out`, `predict --json/--save`, in their own test modules)."""

from __future__ import annotations

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main

from conftest import make_tiny_model


def _blocked(tmp_path):
    """A path whose parent is a file: no folder can be made there, whoever runs the test."""
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should go\n")
    return blocker / "out"


def test_synth_names_an_out_it_cannot_write(tmp_path, capsys):
    out = _blocked(tmp_path)
    counts = ["--defective", "1", "--free", "0", "--test-defective", "0", "--test-free", "0"]
    argv = ["synth", "--out", str(out), "--size", "256x256", *counts, "--workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot make the folder" in err and "Traceback" not in err  # (as export)


def test_export_names_an_out_it_cannot_write(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, make_tiny_model())
    out = _blocked(tmp_path)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot make the folder" in err and "Traceback" not in err
