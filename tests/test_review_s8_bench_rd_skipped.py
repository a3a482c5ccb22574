"""`splitdet bench --rd-images N` on a split without defective images says why the bytes-vs-mAP
pass is missing: report.md held no table, no figure and no word of it, as if lost."""

from __future__ import annotations

import json
import shutil

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.training.voc import read_split


def test_a_split_without_defects_says_the_bytes_vs_map_pass_was_not_run(
    tiny_model, tiny_model_dir, tiny_dataset, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    free = [s.image_id for s in read_split(tiny_dataset, "test") if not s.is_defective]
    (data / "ImageSets" / "Main" / "test.txt").write_text("\n".join(free) + "\n")
    save_checkpoint(tmp_path / "model.pt", tiny_model, gate_threshold=0.5)
    out = tmp_path / "report"
    code = main(["bench", "--model", str(tiny_model_dir), "--checkpoint",
                 str(tmp_path / "model.pt"), "--data", str(data), "--defect-rates", "0",
                 "--images", "1", "--codecs", "int8", "--rd-images", "5", "--threads", "1",
                 "--no-engine-baseline", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and report["rate_distortion"] is None
    assert "bytes_vs_map_kept.png" not in report["figures"]
    markdown = (out / "report.md").read_text()
    assert "Not measured: the 'test' split holds no defective image (--rd-images 5" in markdown
