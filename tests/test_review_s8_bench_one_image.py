"""A stream of one image of each kind gives no confidence interval, not one of no width.

The bootstrap resamples each kind apart: with one image of each, every resample is the stream
itself, so report.md said "0.168 (95% CI 0.168 to 0.168)" and "+55.0% (95% CI +55.0% to
+55.0%)": a spread it could not measure, shown as none.
"""

from __future__ import annotations

import json

from splitdet.bench.report import add_confidence_intervals
from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main


def test_one_image_of_each_kind_has_no_interval():
    summaries = {"monolithic": {}, "gated": {}}
    times = {"monolithic": [2.5, 2.7], "gated": [0.8, 1.9]}
    add_confidence_intervals(summaries, times, [False, True])
    for summary in summaries.values():
        assert summary["mean_s_ci95"] is None
        assert summary["reduction_ci95"] is None


def test_two_images_of_one_kind_still_have_one():
    summaries = {"monolithic": {}, "gated": {}}
    times = {"monolithic": [2.5, 2.7, 2.6], "gated": [0.8, 1.9, 0.7]}
    add_confidence_intervals(summaries, times, [False, True, False])
    low, high = summaries["gated"]["mean_s_ci95"]
    assert low < high


def test_a_two_image_bench_reports_no_interval(tiny_model, tiny_model_dir, tiny_dataset, tmp_path):
    save_checkpoint(tmp_path / "model.pt", tiny_model, gate_threshold=0.5)
    out = tmp_path / "report"
    code = main(["bench", "--model", str(tiny_model_dir), "--checkpoint",
                 str(tmp_path / "model.pt"), "--data", str(tiny_dataset), "--defect-rates",
                 "0.5", "--images", "2", "--codecs", "int8", "--rd-images", "0", "--threads",
                 "1", "--no-engine-baseline", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for summary in report["rates"]["0.5"].values():
        assert summary["mean_s_ci95"] is None and summary["reduction_ci95"] is None
    table = (out / "report.md").read_text().split("## Defect rate 50%")[1]
    assert "CI" not in table
