"""Review 3 of `splitdet eval`: it read 16-bit images rounded to 8 bits, as training does,
while the edge keeps every level (fault 7); its "mAP kept" had no floor, so an untrained model
printed "145.1% kept" (fault 8); `compare` skipped a figure only when neither model held it,
while its docstring said "that both hold" (fault 9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitdet.edge.preprocess import load_image
from splitdet.training.compare import FIGURES, compare
from splitdet.training.evaluate import Prediction, metrics_at_threshold
from splitdet.training.evaluate_predict import _image_batches
from splitdet.training.voc import VocObject, VocSample

# ------------------------------------------------------------------ 7: images read as the edge


def _eval_reads(path: Path, size: tuple[int, int], pixel_bits: int) -> torch.Tensor:
    """The image at `path` as `splitdet eval` reads it for the model (its one batch)."""
    sample = VocSample("a", path, size[0], size[1], ())
    ((indices, images),) = list(_image_batches([sample], 1, "cpu", False, "eval", pixel_bits))
    assert indices == [0]
    return images[0]


def test_a_12_bit_image_is_read_by_eval_as_the_edge_reads_it(tmp_path):
    """A Mono12 camera's 4096 levels: eval rounded them to 256, so `eval --checkpoint`
    calibrated the gate on inputs the edge never sees."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (48, 64), dtype=np.uint16)
    path = tmp_path / "mono12.png"
    Image.fromarray(pixels).save(path)  # a 16-bit grayscale PNG holding 12-bit values
    read = _eval_reads(path, (64, 48), 12)
    edge = torch.from_numpy(load_image(path, 12))
    assert read.dtype == torch.float32 and read.shape == (3, 48, 64)
    assert torch.equal(read, edge)
    assert len(torch.unique(read)) > 256  # every level kept, not 8 bits' worth


def test_an_8_bit_image_reads_as_before(tmp_path):
    """For 8-bit images the edge's reader gives what eval gave (PIL's bytes / 255), exactly."""
    from torchvision.transforms.functional import pil_to_tensor

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(pixels).save(path)
    before = pil_to_tensor(Image.open(path).convert("RGB")).float().div_(255.0)
    assert torch.equal(_eval_reads(path, (56, 40), 16), before)


def test_a_corrupt_image_is_a_voc_error_with_data_checks_advice(tmp_path):
    from splitdet.training.voc import VocError, check_hint

    path = tmp_path / "cut.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path, compress_level=0)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(VocError, match=r"cut\.png") as caught:
        _eval_reads(path, (64, 64), 16)
    assert "--decode" in check_hint(caught.value, tmp_path)


# ------------------------------------------------------------------ 8: the floor of mAP kept


def test_map_kept_is_not_given_under_the_floor_and_says_why():
    """An untrained model's mAP of noise: 7.0e-06 / 4.8e-06 printed "145.1% kept". Here the
    detector finds the one scratch at the lowest score, below 200 false positives on
    defect-free images the gate drops: mAP 0.005 alone, 1.0 gated."""
    from splitdet.training.cli_eval_report import summary

    scratch = VocSample("d", Path("d.png"), 200, 160, (VocObject("scratch", (10, 10, 50, 50)),))
    free = [VocSample(f"f{k}", Path(f"f{k}.png"), 200, 160, ()) for k in range(10)]

    def prediction(boxes: list, scores: list, p_defect: float) -> Prediction:
        return Prediction(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                          torch.tensor(scores), torch.ones(len(scores), dtype=torch.int64),
                          p_defect)  # fmt: skip

    false_positives = [[5.0 * k, 100.0, 5.0 * k + 4, 104.0] for k in range(20)]
    predictions = [prediction([[10.0, 10.0, 50.0, 50.0]], [0.1], 0.9)] + [
        prediction(false_positives, [0.9] * 20, 0.1) for _ in free
    ]
    metrics = metrics_at_threshold([scratch, *free], predictions, ["scratch"], 0.5,
                                   calibrated_on="given")  # fmt: skip
    assert 0 < metrics["map"] < 0.01 and metrics["map_gated"] == pytest.approx(1.0)
    assert metrics["map_kept"] is None and metrics["map50_kept"] is None
    assert "under 0.01" in metrics["map_kept_absent"], metrics["map_kept_absent"]
    metrics.update(split="test", data="D")
    text = summary(metrics, "eval.json")
    assert "mAP kept n/a (mAP under 0.01: a ratio of noise)" in text, text
    assert "%" not in text.split("gated system:")[1].splitlines()[0], text


def test_map_kept_above_the_floor_is_the_share():
    from splitdet.training.evaluate_coco import _kept, kept_absence

    assert _kept(0.5, 0.8) == pytest.approx(0.625)
    assert _kept(7.0e-06, 4.8e-06) is None
    assert kept_absence(0.8) is None and kept_absence(None) is None


# ------------------------------------------------------------------ 9: compare's figures


def test_compare_lists_every_figure_each_model_null_where_it_has_none():
    """`.comparison.figures.KEY` is always there for a JSON reader: a figure one model lacks
    (its mAP kept under the floor: None) or neither holds has nulls, not a missing key."""
    samples = [VocSample("a", Path("a.png"), 100, 80, (VocObject("scratch", (1, 1, 20, 20)),))]
    hit = [Prediction(torch.tensor([[1.0, 1.0, 20.0, 20.0]]), torch.tensor([0.9]),
                      torch.tensor([1]), 0.9)]  # fmt: skip
    ours = {"map": 1.0, "map50": 1.0, "map_kept": None}
    theirs = {"map": 0.5, "map50": 0.5, "map_kept": 0.9}  # no gate figures in either
    comparison = compare(ours, theirs, samples, hit, hit, ["scratch"], resamples=0, seed=0)
    assert list(comparison["figures"]) == [key for key, _, _ in FIGURES]
    assert comparison["figures"]["map_kept"] == {
        "candidate": None, "baseline": 0.9, "difference": None
    }  # fmt: skip
    assert comparison["figures"]["gate_auc"] == {
        "candidate": None, "baseline": None, "difference": None
    }  # fmt: skip
    assert comparison["figures"]["map"]["difference"] == pytest.approx(0.5)
