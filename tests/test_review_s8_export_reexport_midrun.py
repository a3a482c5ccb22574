"""`splitdet predict` (and `eval --model`) without --cloud load the edge half at start and the
cloud half at the first flagged image, each from --model as it is then. An export into that
folder in between (re-exporting into one folder is a normal step) paired the edge half of one
model with the heads of another: its boxes were recorded under the first one's fingerprint,
exit status 0. Now the run stops as for a cloud that serves another export: exit status 2,
the images judged before written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import runtime
from splitdet.shared.manifest import read_manifest
from splitdet.training.export import export_model

from conftest import make_tiny_model
from support import run_main


@pytest.fixture
def reexported_after_edge_load(tmp_path, monkeypatch) -> Iterator[tuple[Path, str, list[str]]]:
    """(--model folder, the fingerprint of the export the edge half loads, [that of the export
    written into the folder right after the edge half loaded])."""
    model_dir = tmp_path / "model"
    first = export_model(make_tiny_model(seed=0), model_dir, default_codec="fp32").fingerprint
    later: list[str] = []
    loaded = runtime.EdgeRuntime.__init__

    def load_then_reexport(self, *args, **kwargs) -> None:
        loaded(self, *args, **kwargs)
        if not later:  # (once: the edge half of this run)
            model = make_tiny_model(seed=1)
            later.append(export_model(model, model_dir, default_codec="fp32").fingerprint)

    monkeypatch.setattr(runtime.EdgeRuntime, "__init__", load_then_reexport)
    image = tmp_path / "in" / "part.png"
    image.parent.mkdir()
    Image.fromarray(np.full((128, 160, 3), 90, np.uint8)).save(image)
    yield model_dir, first, later
    assert later and later[0] != first and read_manifest(model_dir).fingerprint == later[0]


def test_predict_refuses_heads_of_another_export(reexported_after_edge_load, tmp_path, capsys):
    model_dir, first, later = reexported_after_edge_load
    results = tmp_path / "results.json"
    code, out, err = run_main(
        capsys, "predict", tmp_path / "in", "--model", model_dir, "--gate", "off",
        "--json", results, "--no-progress",
    )  # fmt: skip
    assert code == 2, out + err
    assert f"now holds export {later[0][:16]}, not {first[:16]}" in err
    assert json.loads(results.read_text()) == []  # written: no image was judged with them


def test_eval_model_refuses_heads_of_another_export(
    reexported_after_edge_load, tiny_dataset, capsys
):
    model_dir, first, later = reexported_after_edge_load
    code, out, err = run_main(
        capsys, "eval", "--data", tiny_dataset, "--model", model_dir, "--json", "-",
        "--no-progress",
    )  # fmt: skip
    assert code == 2, out + err
    assert f"now holds export {later[0][:16]}, not {first[:16]}" in err
