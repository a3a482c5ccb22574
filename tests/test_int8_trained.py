"""The int8 feature codec on a trained model: same verdicts, boxes within 1 px (issue 4, 1).

A random model's box regressors are near zero (torchvision initialises them with std 0.001), so
int8 noise on the features hardly moves its boxes; only trained weights make the test mean
something. The module trains the tiny preset for about half a minute (30 epochs, 180 steps) on
bold synthetic strokes until it detects them (held-out mAP@.5 checked), exports it, and runs
`splitdet predict` with the lossless and the int8 codec on held-out images. Fewer steps were
unstable (with 100-120, held-out mAP@.5 swung between 0.02 and 0.99 with the seed or the lr, and
an under-trained model's many loose confident boxes are no test of the codec); this schedule
passed on three train/held-out/torch seeds (mAP@.5 0.58-0.87, 27-39 confident boxes, every one
within 0.94 px).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from splitdet.shared.checkpoint import load_model
from splitdet.training import voc
from splitdet.training.evaluate import evaluate
from splitdet.training.export import export_model
from splitdet.training.presets import TINY
from splitdet.training.train import train

from support import make_tiny_voc, predict_records

#: Detections at or above this score are the ones a user acts on; they must survive int8.
SCORE = 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(exported model dir, held-out image folder) of a tiny model trained to find strokes."""
    root = tmp_path_factory.mktemp("int8_trained")
    data = make_tiny_voc(root / "train", n_defective=8, n_free=4, seed=1)
    held_out = make_tiny_voc(root / "held_out", n_defective=6, n_free=3, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = replace(TINY, eval_every=0, epochs=30, lr=0.03, warmup_iters=10)
        train(config, data, root / "run", progress=False)
        model, _ = load_model(root / "run" / "last.pt")
        model.eval()
        metrics = evaluate(model, voc.read_split(held_out, "test", ("scratch",)), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert metrics["map50"] > 0.3, f"the tiny model did not learn the strokes: {metrics}"
    model_dir = root / "model"
    export_model(model, model_dir, gate_threshold=0.5, default_codec="int8")
    return model_dir, held_out / "JPEGImages"


def test_int8_keeps_verdicts_and_boxes_within_a_pixel(trained, tmp_path):
    """Every confident box is still found with int8 (IoU >= 0.8), and nearly all of them move
    by at most 1 px. The exception is real and expected of any lossy codec: when two RPN
    proposals score alike, int8 noise can let the other one through NMS, and its box differs
    (measured with an earlier, 60-epoch schedule: 29 of 30 boxes within 0.07 px, one 1.8 px off
    with IoU 0.89; with this one all 31 within 0.05 px)."""
    model_dir, images = trained
    lossless = predict_records(model_dir, images, tmp_path / "fp32.json", "--codec", "fp32")
    int8 = predict_records(model_dir, images, tmp_path / "int8.json", "--codec", "int8")
    assert len(lossless) == len(int8) == 9
    shifts = []
    for exact, quantised in zip(lossless, int8, strict=True):
        assert exact["path"] == quantised["path"]
        assert exact["verdict"] == quantised["verdict"], exact["path"]
        if exact["verdict"] != "defect":
            continue
        assert quantised["bytes_sent"] < exact["bytes_sent"] / 2
        boxes = np.asarray(quantised["boxes"], dtype=np.float32).reshape(-1, 4)
        for box, score in zip(exact["boxes"], exact["scores"], strict=True):
            if score < SCORE:
                continue
            # any int8 box counts: a box scoring 0.51 may drop to 0.49 and stay the same box
            assert len(boxes), exact["path"]
            iou = box_iou(torch.tensor([box]), torch.from_numpy(boxes))
            assert iou.max() >= 0.8, (exact["path"], box)
            shifts.append(float(np.abs(boxes - np.asarray(box)).max(axis=1).min()))
    assert len(shifts) >= 5, "too few confident detections for the test to mean anything"
    within = np.mean(np.asarray(shifts) <= 1.0)
    assert within >= 0.9, sorted(shifts)
