"""`splitdet export` of the same checkpoint again with another --codec said "--out DIR:
unchanged, it held this export already" while it rewrote the manifest's default codec (which
the fingerprint leaves out): every edge started on the folder without --codec then sent
features in the other codec. Now a WARNING names both codecs."""

from __future__ import annotations

import logging

from splitdet.shared.manifest import read_manifest
from splitdet.training.export import export_model

from conftest import make_tiny_model


def _out_messages(caplog) -> list[tuple[int, str]]:
    """(level, message) of the export's lines about --out."""
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "splitdet.training.export" and r.getMessage().startswith("--out ")
    ]


def test_a_reexport_with_another_codec_is_not_called_unchanged(tmp_path, caplog):
    model, out = make_tiny_model(), tmp_path / "model"
    first = export_model(model, out, default_codec="int8").fingerprint
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="splitdet.training.export"):
        again = export_model(model, out, default_codec="fp16")
    assert again.fingerprint == first  # (the default codec is not in the fingerprint)
    assert read_manifest(out).default_codec == "fp16"
    ((level, message),) = _out_messages(caplog)
    assert level == logging.WARNING
    assert "unchanged" not in message
    assert "default codec is now fp16 (it was int8)" in message
    assert "--codec int8" in message
