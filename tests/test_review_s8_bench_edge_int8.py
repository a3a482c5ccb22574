"""`splitdet bench` on an `export --quantize-edge` model says its edge graphs are int8.

The splitdet systems and monolithic-split-engines then run a lossy int8 body while the torch
baselines run the float weights: a report that does not say so passes the int8 engine's gain
off as the split's, and cannot be told from a float export's report.
"""

from __future__ import annotations

import json

import pytest

from splitdet.bench.report import _identity
from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def int8_report(tiny_dataset, tmp_path_factory):
    """report.json and report.md of a one-image bench run on an int8-edge export."""
    root = tmp_path_factory.mktemp("bench_int8")
    save_checkpoint(root / "model.pt", make_tiny_model(seed=2), gate_threshold=0.5)
    exported = main(["export", "--checkpoint", str(root / "model.pt"), "--out",
                     str(root / "model"), "--quantize-edge", str(tiny_dataset),
                     "--calibration-images", "2"])  # fmt: skip
    assert exported == 0
    out = root / "report"
    code = main(["bench", "--model", str(root / "model"), "--checkpoint",
                 str(root / "model.pt"), "--data", str(tiny_dataset), "--defect-rates", "1",
                 "--images", "1", "--codecs", "int8", "--rd-images", "0", "--threads", "1",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_the_report_says_the_edge_graphs_are_int8(int8_report):
    report, markdown = int8_report
    assert report["model"]["edge_gate"] == "int8"
    assert "**Edge graphs: int8** (`splitdet export --quantize-edge`, lossy)" in markdown
    assert "monolithic-split-engines" in markdown.split("**Edge graphs: int8**")[1].split("\n")[0]


def test_the_figures_name_the_int8_edge(int8_report):
    report, _ = int8_report
    assert "int8 edge graphs" in _identity(report)
