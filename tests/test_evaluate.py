"""Evaluation: our mAP is pycocotools' on a hand-made set with a known answer (issue 3, 3)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from splitdet.shared.config import EXPORT_TOLERANCE, ModelConfig
from splitdet.training.evaluate import (
    Prediction,
    best_accuracy_at_recall,
    calibrated_threshold,
    calibration_shortfall,
    classifier_metrics,
    coco_metrics,
    evaluate,
    gate_operating_points,
    highest_threshold_at_recall,
    roc_auc,
)
from splitdet.training.voc import VocObject, VocSample

# Four images: two with one scratch each, one defect-free, one with only a "difficult" scratch.
SAMPLES = [
    VocSample("a", Path("a.jpg"), 200, 160, (VocObject("scratch", (10, 10, 50, 50)),)),
    VocSample("b", Path("b.jpg"), 200, 160, (VocObject("scratch", (100, 100, 140, 120)),)),
    VocSample("c", Path("c.jpg"), 200, 160, ()),
    VocSample("d", Path("d.jpg"), 200, 160, (VocObject("scratch", (0, 0, 20, 20), True),)),
]
# Exact hits on a (0.9) and b (0.7), a false positive on the defect-free image (0.8), and a hit
# on the difficult object (0.95), which VOC and COCO's crowd regions ignore.
DETECTIONS = {
    "a": ([[10, 10, 50, 50]], [0.9]),
    "b": ([[100, 100, 140, 120]], [0.7]),
    "c": ([[60, 60, 90, 70]], [0.8]),
    "d": ([[0, 0, 20, 20]], [0.95]),
}
# Ranked: TP (P 1, R .5), FP (P .5, R .5), TP (P 2/3, R 1). COCO's 101-point interpolation:
# precision 1 at the 51 recall points <= .5 and 2/3 at the 50 above, at every IoU threshold.
KNOWN_AP = (51 * 1.0 + 50 * 2 / 3) / 101


def _arrays():
    boxes = [np.array(DETECTIONS[s.image_id][0], np.float32) for s in SAMPLES]
    scores = [np.array(DETECTIONS[s.image_id][1], np.float32) for s in SAMPLES]
    labels = [np.ones(len(b), np.int64) for b in boxes]
    return boxes, scores, labels


def test_map_has_the_known_answer():
    metrics = coco_metrics(SAMPLES, *_arrays(), ["scratch"])
    assert metrics["map"] == pytest.approx(KNOWN_AP, abs=1e-6)
    assert metrics["map50"] == pytest.approx(KNOWN_AP, abs=1e-6)
    assert metrics["ar100"] == pytest.approx(1.0)


def test_map_equals_pycocotools_from_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, sample in enumerate(SAMPLES, start=1):
        images.append({"id": image_id, "width": sample.width, "height": sample.height})
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": int(obj.difficult),
            })  # fmt: skip
        for (x1, y1, x2, y2), score in zip(*DETECTIONS[sample.image_id], strict=True):
            results.append({"image_id": image_id, "category_id": 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})  # fmt: skip
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": 1, "name": "scratch"}]}))  # fmt: skip
    gt = COCO(str(gt_file))
    reference = COCOeval(gt, gt.loadRes(results), "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    ours = coco_metrics(SAMPLES, *_arrays(), ["scratch"])
    assert ours["map"] == pytest.approx(reference.stats[0], abs=1e-12)
    assert ours["map50"] == pytest.approx(reference.stats[1], abs=1e-12)
    assert ours["ar100"] == pytest.approx(reference.stats[8], abs=1e-12)


def test_per_class_ap_is_pycocotools_own_for_each_class():
    """Per-class AP@[.5:.95] and AP@.5 equal pycocotools' run on that class alone; a class
    without ground truth has none, and its count of objects says why."""
    from pycocotools.cocoeval import COCOeval

    from splitdet.training.evaluate import _coco_dt, _coco_gt

    dent = VocObject("dent", (20, 100, 60, 140))
    samples = [*SAMPLES[:3], VocSample("e", Path("e.jpg"), 200, 160, (dent,)), SAMPLES[3]]
    boxes, scores, labels = _arrays()
    boxes.insert(3, np.array([[22, 100, 60, 150], [150, 10, 190, 40]], np.float32))
    scores.insert(3, np.array([0.6, 0.9], np.float32))
    labels.insert(3, np.array([2, 2], np.int64))
    names = ["scratch", "dent", "rust"]
    ours = coco_metrics(samples, boxes, scores, labels, names)["per_class"]
    assert set(ours) == set(names)
    gt = _coco_gt(samples, names)
    dt = _coco_dt(gt, boxes, scores, labels)
    for k, name in enumerate(names[:2], start=1):
        alone = COCOeval(gt, dt, "bbox")
        alone.params.catIds = [k]
        alone.evaluate()
        alone.accumulate()
        alone.summarize()
        assert ours[name]["ap"] == pytest.approx(alone.stats[0], abs=1e-12), name
        assert ours[name]["ap50"] == pytest.approx(alone.stats[1], abs=1e-12), name
    assert ours["scratch"]["ap"] == pytest.approx(KNOWN_AP)  # the dent changed nothing of it
    assert 0 < ours["dent"]["ap"] < ours["dent"]["ap50"] == pytest.approx(0.5)
    assert ours["rust"] == {"ap": None, "ap50": None, "objects": 0}
    assert (ours["scratch"]["objects"], ours["dent"]["objects"]) == (2, 1)  # difficult not counted


def test_map_without_any_detection_is_zero_and_empty_gt_is_none():
    empty = [np.zeros((0, 4), np.float32)] * len(SAMPLES)
    none = [np.zeros(0)] * len(SAMPLES)
    assert coco_metrics(SAMPLES, empty, none, none, ["scratch"])["map"] == 0.0
    free = [SAMPLES[2]]
    assert coco_metrics(free, *[x[2:3] for x in _arrays()], ["scratch"])["map"] is None


def test_gate_calibration_and_classifier_metrics():
    probs = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1]
    labels = [True, True, True, True, False, False]
    assert highest_threshold_at_recall(probs, labels, 1.0) == 0.3
    assert highest_threshold_at_recall(probs, labels, 0.75) == 0.6  # one miss allowed out of four
    m = classifier_metrics(probs, labels, 0.3)
    assert (m["recall"], m["accuracy"], m["precision"]) == (1.0, 1.0, 1.0)
    assert m["auc"] == 1.0
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    with pytest.raises(ValueError, match="no defective image"):
        highest_threshold_at_recall([0.1], [False], 0.99)


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_calibrated_threshold_lies_in_the_gap_under_the_lowest_score_it_keeps():
    """A threshold on the lowest defective score of a small split misses new defective images
    scoring a hair under it: the calibrated one sits halfway (in logits) down to the next score,
    and no calibration image changes side."""
    # perfectly separated, as a gate trained on easy data: defective 0.99988..0.99997
    probs = [0.99997, 0.99999, 0.99988, 0.9999, 0.0158, 0.001]
    labels = [True, True, True, True, False, False]
    highest = highest_threshold_at_recall(probs, labels, 0.995)
    assert highest == 0.99988  # the lowest defective score: 4 images cannot miss 0.5% of them
    t = calibrated_threshold(probs, labels, 0.995)
    assert _logit(t) == pytest.approx((_logit(0.99988) + _logit(0.0158)) / 2)
    assert 0.0158 < t < 0.99988
    assert classifier_metrics(probs, labels, t) == classifier_metrics(probs, labels, highest)
    assert t <= 0.9998  # a new defective image at 0.9998 is still flagged
    # one miss allowed (0.75 of 4): the gap under 0.6 runs down to the missed positive 0.3
    probs, labels = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1], [True, True, True, True, False, False]
    t = calibrated_threshold(probs, labels, 0.75)
    assert _logit(t) == pytest.approx((_logit(0.6) + _logit(0.3)) / 2)
    assert classifier_metrics(probs, labels, t)["recall"] == 0.75
    # the ends of the sigmoid: the midpoint never lands on the score under it
    t = calibrated_threshold([0.99999999, 0.9], [True, False], 1.0)
    assert 0.9 < t <= 0.99999999 * (1 - EXPORT_TOLERANCE)


def test_calibrated_threshold_leaves_room_for_the_edges_onnx_scores():
    """A threshold placed on the lowest defective score, with no score under it (a gate
    flagging every calibration image), gave `ok` on the edge to that very image: ONNX Runtime
    scored it a float32 step under PyTorch. The threshold sits the export's tolerance lower;
    a score within that tolerance under it is flagged too (recall first)."""
    step_under = float(np.nextafter(np.float32(0.7768416), np.float32(0)))
    t = calibrated_threshold([0.7768416, 0.9, 0.8], [True, True, False], 1.0)
    assert t == pytest.approx(0.7768416 * (1 - EXPORT_TOLERANCE)) and step_under >= t
    # ties with the lowest defective score stay flagged
    assert calibrated_threshold([0.4, 0.7, 0.4], [True, True, False], 1.0) < 0.4
    # relative: a lowest defective score of 8e-5 keeps a threshold above the defect-free
    # ones under it (an absolute 1e-4 took it to 0, every image flagged)
    t = calibrated_threshold([8e-5, 0.7, 5e-5, 1e-7], [True, True, False, False], 1.0)
    assert 5e-5 < t < 8e-5 and classifier_metrics([8e-5, 5e-5], [True, False], t)["accuracy"] == 1
    # a defect-free score within the tolerance under the kept one is flagged with it
    t = calibrated_threshold([0.5, 0.499996, 0.1], [True, False, False], 1.0)
    assert t <= 0.499996 and classifier_metrics([0.5, 0.499996], [True, False], t)["recall"] == 1


def test_calibration_shortfall_says_when_the_split_is_too_small_for_the_recall():
    """A threshold keeping all n calibration images misses a new one 1 time in n + 1: warned
    of when that is over twice what the target recall allows."""
    message = calibration_shortfall(6, 0.995)
    assert message is not None and "6 defective" in message
    assert "expect about 86% recall, not 99.5%" in message and "1 time in 7" in message
    assert "99 or more" in message
    assert calibration_shortfall(98, 0.995) is not None
    assert calibration_shortfall(99, 0.995) is None  # 1 in 100: twice the 0.5% allowed
    assert calibration_shortfall(108, 0.995) is None  # the paper's validation split
    assert calibration_shortfall(8, 0.95) is not None and calibration_shortfall(9, 0.95) is None
    assert calibration_shortfall(1, 1.0) is None  # every one kept is what 100% asks


def test_best_accuracy_at_recall_searches_every_threshold_that_keeps_the_recall():
    # all four positives kept: 0.3 is the highest such threshold and the best (one FP, 0.5)
    probs = [0.9, 0.8, 0.3, 0.6, 0.5, 0.2, 0.1]
    labels = [True, True, True, True, False, False, False]
    assert best_accuracy_at_recall(probs, labels, 1.0) == (pytest.approx(6 / 7), 0.3)
    # one miss allowed: the highest threshold keeping 3 of 4 is 0.34 (4/6 right), but 0.33 takes
    # the fourth positive at no cost (5/6); 0.1 would flag the second negative as well (4/6)
    probs = [0.9, 0.35, 0.34, 0.33, 0.36, 0.1]
    labels = [True, True, True, True, False, False]
    assert highest_threshold_at_recall(probs, labels, 0.75) == 0.34
    assert best_accuracy_at_recall(probs, labels, 0.75) == (pytest.approx(5 / 6), 0.33)
    # ties: the highest threshold among the best; only positives: recall alone decides
    assert best_accuracy_at_recall([0.9, 0.7, 0.2], [True, True, False], 1.0) == (1.0, 0.7)
    assert best_accuracy_at_recall([0.4, 0.6], [True, True], 1.0) == (1.0, 0.4)
    with pytest.raises(ValueError, match="no defective image"):
        best_accuracy_at_recall([0.1], [False], 0.99)


def test_map_kept_drops_detections_of_gated_images():
    boxes, scores, labels = _arrays()
    p_defect = {"a": 0.9, "b": 0.2, "c": 0.1, "d": 0.5}  # b (a real scratch) is under 0.4
    predictions = [
        Prediction(
            torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(c), p_defect[x.image_id]
        )
        for b, s, c, x in zip(boxes, scores, labels, SAMPLES, strict=True)
    ]
    model = types.SimpleNamespace(config=ModelConfig(depth=18))
    metrics = evaluate(model, SAMPLES, gate_threshold=0.4, predictions=predictions)
    assert metrics["map"] == pytest.approx(KNOWN_AP, abs=1e-6)
    # gated: only a's TP survives -> P 1 at R .5, nothing above: 51 / 101
    assert metrics["map_gated"] == pytest.approx(51 / 101, abs=1e-6)
    assert metrics["map_kept"] == pytest.approx((51 / 101) / KNOWN_AP, abs=1e-6)
    assert metrics["gate_recall"] == pytest.approx(2 / 3)  # a, d flagged; b missed
    assert metrics["gate_accuracy"] == pytest.approx(3 / 4)
    # at the target recall (99.5%: all three defective kept) the best threshold is 0.2 (b),
    # flagging c (0.1) not: 4/4
    assert (metrics["gate_best_accuracy"], metrics["gate_best_threshold"]) == (1.0, 0.2)
    # the detector's top box per image: a 0.9, b 0.7, d 0.95 defective, c 0.8 not
    assert metrics["top_box_auc"] == pytest.approx(2 / 3)
    assert metrics["top_box_best_accuracy"] == pytest.approx(3 / 4)  # c above b: flagged
    required = {"map", "map50", "ar100", "gate_threshold", "gate_recall", "gate_accuracy",
                "map_gated", "map_kept"}  # fmt: skip
    assert required <= set(metrics)
    json.dumps(metrics)


def test_operating_points_calibrate_each_recall_and_measure_it_on_the_split():
    """Per target recall, the threshold calibrated for it on the calibration scores, and its
    recall, accuracy, share flagged and mAP@.5 kept on the evaluated split (hand-computed)."""
    boxes, scores, labels = _arrays()
    p_defect = {"a": 0.9, "b": 0.2, "c": 0.1, "d": 0.5}
    predictions = [
        Prediction(
            torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(c), p_defect[x.image_id]
        )
        for b, s, c, x in zip(boxes, scores, labels, SAMPLES, strict=True)
    ]
    calibration = ([0.8, 0.18, 0.05], [True, True, False])
    every, half = gate_operating_points(
        *calibration, SAMPLES, predictions, ["scratch"], KNOWN_AP, recalls=(1.0, 0.5)
    )
    # 100%: under 0.18, halfway in logits to 0.05 (0.097): a, b, c (0.1), d flagged
    assert every["threshold"] == pytest.approx(calibrated_threshold(*calibration, 1.0))
    assert 0.05 < every["threshold"] < 0.1
    assert (every["recall"], every["accuracy"], every["flagged"]) == (1.0, 0.75, 1.0)
    assert every["free_flagged"] == 1.0  # c, the one defect-free image
    assert every["map50_kept"] == pytest.approx(1.0)
    # 50%: one of the two calibration defects may be missed: halfway from 0.8 to 0.18 (0.48);
    # a and d flagged, b (a real scratch) is not: its detection is lost
    assert 0.2 < half["threshold"] < 0.5
    assert half["recall"] == pytest.approx(2 / 3)
    assert (half["accuracy"], half["flagged"], half["free_flagged"]) == (0.75, 0.5, 0.0)
    assert half["map50_kept"] == pytest.approx((51 / 101) / KNOWN_AP, abs=1e-6)
    model = types.SimpleNamespace(config=ModelConfig(depth=18))
    metrics = evaluate(model, SAMPLES, gate_threshold=0.4, predictions=predictions)
    assert metrics["gate_operating_points_calibrated_on"] == "evaluated split"
    assert [p["target_recall"] for p in metrics["gate_operating_points"]] == [
        1.0, 0.995, 0.99, 0.98, 0.95, 0.9
    ]  # fmt: skip
    assert metrics["gate_operating_points"][0]["recall"] == 1.0  # (on the split itself)


def test_eval_command_writes_json_and_stores_the_threshold(tmp_path, capsys, caplog):
    from dataclasses import replace

    from splitdet.shared.checkpoint import read_checkpoint
    from splitdet.shared.cli import main
    from splitdet.training.presets import TINY
    from splitdet.training.train import train

    from support import make_tiny_voc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_tiny_voc(tmp_path / "voc", n_defective=3, n_free=2)
        train(replace(TINY, epochs=1, eval_every=0), data, tmp_path / "run", progress=False)
        out = tmp_path / "eval.json"
        args = ["eval", "--data", str(data), "--checkpoint", str(tmp_path / "run" / "last.pt")]
        with caplog.at_level("INFO", logger="splitdet.training.cli_eval"):
            assert main([*args, "--json", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads(out.read_text())
    assert {"map", "map50", "ar100", "gate_threshold", "gate_recall", "gate_accuracy",
            "map_gated", "map_kept"} <= set(metrics)  # fmt: skip
    assert metrics["images"] == 5 and metrics["gate_recall"] == 1.0  # calibrated on val = test
    stored = read_checkpoint(tmp_path / "run" / "last.pt")["gate_threshold"]
    assert stored == pytest.approx(metrics["gate_threshold"])
    assert metrics["box_refine_steps"] == TINY.model.box_refine_steps == 2
    assert metrics["gate_operating_points_calibrated_on"] == "val"  # the split, named
    table = caplog.text  # the operating points for people, beside the JSON
    rows = [line for line in table.splitlines() if line.split()[:1] and line.split()[0][-1] == "%"]
    assert "gate operating points" in table and len(rows) == 6, table
    assert rows[1].split()[:2] == ["99.5%", f"{metrics['gate_threshold']:.3f}"], rows
    assert main(["eval", "--data", str(tmp_path), "--checkpoint", str(out)]) == 2  # not a ckpt

    # box refinement given at evaluation: reported, the checkpoint's own config unchanged
    refined = tmp_path / "refined.json"
    assert main([*args, "--json", str(refined), "--no-progress", "--no-store",
                 "--box-refine-steps", "0"]) == 0  # fmt: skip
    assert json.loads(refined.read_text())["box_refine_steps"] == 0
    assert read_checkpoint(tmp_path / "run" / "last.pt")["config"]["box_refine_steps"] == 2
    assert main([*args, "--box-refine-steps", "9"]) == 2

    # an unwritable --json: refused before the evaluation (not after it), naming the file
    capsys.readouterr()
    missing = tmp_path / "no" / "such" / "dir" / "eval.json"
    assert main([*args, "--json", str(missing), "--no-progress", "--no-store"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was evaluated
    assert str(missing) in captured.err and "Traceback" not in captured.err


def test_calibration_reads_the_gate_alone_and_agrees_with_full_prediction(tmp_path):
    """Calibrating the threshold needs only p(defect): the gate-only pass gives the same
    probabilities as a full prediction (to float precision), and `evaluate` calibrated on a
    split sets the threshold those probabilities imply."""
    from splitdet.shared.model import build_model
    from splitdet.training import voc
    from splitdet.training.evaluate import gate_probabilities, predict
    from splitdet.training.presets import TINY

    from support import make_tiny_voc

    torch.manual_seed(0)
    model = build_model(TINY.model).eval()
    samples = voc.read_split(make_tiny_voc(tmp_path, n_defective=4, n_free=3), "val", ("scratch",))
    gate_only = gate_probabilities(model, samples, batch_size=2)
    full = [p.p_defect for p in predict(model, samples)]
    assert len(gate_only) == len(samples) == 7
    assert gate_only == pytest.approx(full, abs=1e-6)
    assert len(set(np.round(gate_only, 6))) > 1  # the images differ, so must their scores
    metrics = evaluate(model, samples, calibration_samples=samples, target_recall=0.75)
    labels = [s.is_defective for s in samples]
    assert metrics["gate_threshold"] == pytest.approx(calibrated_threshold(full, labels, 0.75))
    assert metrics["gate_calibrated_on"] == "calibration split"
    assert metrics["gate_calibration_defective"] == 4
