"""`splitdet export --out DIR` over an earlier export of another model replaced it with only
"export self-check passed", and a cloud serving DIR dropped the earlier fingerprint at its next
SIGHUP. Now a WARNING names the replaced fingerprint (with the checkpoint and classes its
manifest records) and the new one; the same checkpoint exported again says it is unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.manifest import read_manifest
from splitdet.training.export import export_model

from conftest import make_tiny_model

LOGGERS = ("splitdet.training.export", "splitdet.training.cli_export")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """v1 (one class) and v2 (other weights, a class more) as checkpoint files."""
    root = tmp_path_factory.mktemp("replace_review")
    v1, v2 = root / "v1.pt", root / "v2.pt"
    save_checkpoint(v1, make_tiny_model(seed=0), epoch=3)
    save_checkpoint(v2, make_tiny_model(seed=1, class_names=("scratch", "dent")), epoch=7)
    return v1, v2


def _export(checkpoint: Path, out: Path, caplog) -> list[logging.LogRecord]:
    """`splitdet export` (exit status 0; a threshold given: no warning of an uncalibrated one):
    the records the export modules logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="splitdet.training"):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--codec", "fp32", "--gate-threshold", "0.5"]) == 0  # fmt: skip
    return [r for r in caplog.records if r.name in LOGGERS]


def _about_out(records: list[logging.LogRecord], out: Path) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in records
            if r.getMessage().startswith(f"--out {out}:")]  # fmt: skip


def test_replacing_an_export_of_another_model_is_warned(checkpoints, tmp_path, caplog, capsys):
    v1, v2 = checkpoints
    out = tmp_path / "gasket2"
    assert _about_out(_export(v1, out, caplog), out) == []  # a new folder: nothing replaced
    old = read_manifest(out).fingerprint
    assert read_manifest(out).extra["checkpoint"] == str(v1.resolve())

    records = _export(v2, out, caplog)
    new = read_manifest(out).fingerprint
    assert new != old
    assert _about_out(records, out) == [(
        logging.WARNING,
        f"--out {out}: replaced the export of fingerprint {old[:16]} (checkpoint "
        f"{v1.resolve()} epoch 3, classes scratch) with fingerprint {new[:16]} (checkpoint "
        f"{v2.resolve()} epoch 7, classes scratch,dent); a cloud serving {out} drops "
        f"{old[:16]} at its next reload (SIGHUP) or restart and refuses the edges still running "
        "it: to serve both while edges move, export into another folder and serve both",
    )]  # fmt: skip

    # the same checkpoint again: the same fingerprint, said to be unchanged, nothing warned
    records = _export(v2, out, caplog)
    assert read_manifest(out).fingerprint == new
    assert _about_out(records, out) == [
        (logging.INFO, f"--out {out}: unchanged, it held this export already (fingerprint "
                       f"{new[:16]})")
    ]  # fmt: skip
    assert not [r for r in records if r.levelno >= logging.WARNING]
    capsys.readouterr()


def test_an_earlier_export_naming_no_checkpoint_is_named_by_what_it_records(
    checkpoints, tmp_path, caplog
):
    """An export of an older splitdet (or `export_model` itself) records no checkpoint: the
    warning names its fingerprint and classes."""
    _, v2 = checkpoints
    out = tmp_path / "model"
    old = export_model(make_tiny_model(seed=4), out, default_codec="fp32").fingerprint
    ((level, message),) = _about_out(_export(v2, out, caplog), out)
    assert level == logging.WARNING
    assert message.startswith(
        f"--out {out}: replaced the export of fingerprint {old[:16]} (classes scratch) with "
        f"fingerprint {read_manifest(out).fingerprint[:16]} (checkpoint {v2.resolve()} "
    )
