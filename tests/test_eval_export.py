"""`splitdet eval --model`: an export measured as deployed agrees with its checkpoint, in process
and through a server; refusals are one line; unreadable images are named, the rest evaluated.

A random model finds nothing real, so its mAP on real strokes is 0 and would agree trivially. The
module's dataset is labelled with the model's own detections instead (on each defective image one
of its top-ranked boxes, a different rank per image): the mAP is then far from 0 and 1, and any
difference in boxes, scores or their order between the two paths moves it.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.manifest import read_manifest
from splitdet.training import voc
from splitdet.training.evaluate import classifier_metrics, coco_metrics, predict
from splitdet.training.evaluate_export import edge_gate_kind

from conftest import make_tiny_model
from support import make_tiny_voc

N_DEFECTIVE, N_FREE = 6, 4
#: Keys whose values must agree between the checkpoint and the export evaluations.
DETECTOR_KEYS = ("map", "map50", "ar100")
GATE_KEYS = ("gate_threshold", "gate_recall", "gate_accuracy", "gate_precision", "gate_f1",
             "gate_auc", "gate_pass_rate", "map_gated", "map50_gated", "map_kept")  # fmt: skip


def _label_with_own_detections(data: Path, model) -> list[float]:
    """Rewrite the annotations of `data`: the first N_DEFECTIVE images get the model's box of
    rank (index % 3) as their one scratch, the others none. Returns p(defect) per image."""
    samples = voc.read_split(data, "test", ("scratch",))
    predictions = predict(model, samples)
    for index, (sample, prediction) in enumerate(zip(samples, predictions, strict=True)):
        objects = ()
        if index < N_DEFECTIVE:
            box = tuple(float(v) for v in prediction.boxes[index % 3])
            objects = (voc.VocObject("scratch", box),)
        voc.write_annotation(
            data / "Annotations" / f"{sample.image_id}.xml", replace(sample, objects=objects)
        )
    return [p.p_defect for p in predictions]


def _between(probabilities: list[float]) -> float:
    """A threshold in the widest gap among the middle p(defect)s: some images flagged, some
    not, none near enough to the threshold for float32 differences to flip it."""
    p = np.sort(probabilities)
    middle = range(2, len(p) - 2)
    widest = max(middle, key=lambda i: p[i + 1] - p[i])
    return float((p[widest] + p[widest + 1]) / 2)


def _eval(*args: str) -> tuple[int, dict | None]:
    """`splitdet eval ARGS --no-progress --json FILE`: (exit status, the JSON or None)."""
    out = Path(args[args.index("--data") + 1]).parent / f"eval-{time.monotonic_ns()}.json"
    code = main(["eval", *args, "--no-progress", "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The dataset, a checkpoint of a random tiny model (threshold mid-way through its
    p(defect)s), its fp32 export, and both evaluations in this process."""
    root = tmp_path_factory.mktemp("eval_export")
    model = make_tiny_model()
    data = make_tiny_voc(root / "voc", n_defective=N_DEFECTIVE, n_free=N_FREE)
    threshold = _between(_label_with_own_detections(data, model))
    checkpoint, model_dir = root / "model.pt", root / "model"
    save_checkpoint(checkpoint, model, gate_threshold=threshold)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(model_dir),
                 "--codec", "fp32"]) == 0  # fmt: skip
    code, by_checkpoint = _eval("--data", str(data), "--checkpoint", str(checkpoint),
                                "--calibrate-split", "none")  # fmt: skip
    assert code == 0
    code, by_model = _eval("--data", str(data), "--model", str(model_dir))
    assert code == 0
    return SimpleNamespace(data=data, checkpoint=checkpoint, model_dir=model_dir,
                           by_checkpoint=by_checkpoint, by_model=by_model)  # fmt: skip


def test_export_equals_its_checkpoint(setup):
    ours, reference = setup.by_model, setup.by_checkpoint
    assert 0.05 < reference["map"] < 0.95, reference  # the comparison below means something
    for key in DETECTOR_KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-3), key
    # the threshold splits the images: the gated system loses some detections
    assert 0 < reference["gate_pass_rate"] < 1 and reference["map_kept"] < 1
    for key in GATE_KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-3), key
    assert ours["flagged_fraction"] == pytest.approx(ours["gate_pass_rate"])
    assert ours["images"] == N_DEFECTIVE + N_FREE and ours["image_errors"] == []
    manifest = read_manifest(setup.model_dir)
    assert ours["fingerprint"] == manifest.fingerprint
    assert (ours["codec"], ours["edge_gate"], ours["model"]) == ("fp32", "float32",
                                                                 str(setup.model_dir))  # fmt: skip
    assert ours["bytes_per_flagged_image"] > 0
    assert {"read", "preprocess", "gate", "complete", "encode"} <= set(ours["stage_seconds"])


def test_gated_figures_are_what_the_deployed_edge_flags(setup, tmp_path):
    """`splitdet predict` with its gate on, at the manifest's threshold, detects only the images
    it flags; those detections give eval's gated mAP exactly: a flagged image's detections do
    not depend on the gate."""
    out = tmp_path / "deployed.json"
    assert main(["predict", str(setup.data / "JPEGImages"), "--model", str(setup.model_dir),
                 "--codec", "fp32", "--score-threshold", "0", "--json", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    records = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    samples = voc.read_split(setup.data, "test", ("scratch",))
    flagged = [records[s.image_path.name]["verdict"] == "defect" for s in samples]
    assert 0 < sum(flagged) < len(samples)
    assert np.mean(flagged) == pytest.approx(setup.by_model["flagged_fraction"])
    deployed = _records_metrics(samples, [records[s.image_path.name] for s in samples])
    assert setup.by_model["map_gated"] == pytest.approx(deployed["map"], abs=1e-9)
    assert setup.by_model["map50_gated"] == pytest.approx(deployed["map50"], abs=1e-9)


def _records_metrics(samples, records) -> dict:
    """coco_metrics of `splitdet predict` records (one per sample, in order)."""
    return coco_metrics(
        samples,
        [np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r in records],
        [np.asarray(r["scores"], np.float32) for r in records],
        [np.asarray(r["labels"], np.int64) for r in records],
        ("scratch",),
    )


def test_through_a_server_equals_in_process(setup, tmp_path):
    from cloud_fixtures import start_cloud_process

    server = start_cloud_process(setup.model_dir, tmp_path / "cloud", "eval")
    try:
        code, remote = _eval("--data", str(setup.data), "--model", str(setup.model_dir),
                             "--cloud", server.address)  # fmt: skip
    finally:
        server.stop()
    assert code == 0
    for key in (*DETECTOR_KEYS, *GATE_KEYS, "bytes_per_flagged_image", "fingerprint"):
        assert remote[key] == pytest.approx(setup.by_model[key], abs=1e-9), key
    assert "round_trip" in remote["stage_seconds"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "option",
    [["--calibrate-split", "val"], ["--calibrate-data", "x"], ["--target-recall", "0.995"],
     ["--no-store"], ["--batch-size", "1"], ["--box-refine-steps", "0"]],
)  # fmt: skip
def test_checkpoint_options_are_refused_with_model(setup, option, capsys):
    """Even at their defaults' values: given is given."""
    code = main(["eval", "--data", str(setup.data), "--model", str(setup.model_dir), *option])
    assert code == 2
    assert f"{option[0]} is for --checkpoint only" in _err(capsys)


@pytest.mark.parametrize(
    "option", [["--codec", "fp32"], ["--cloud", "127.0.0.1:9"], ["--timeout", "-5"]]
)  # --timeout was taken, unused and unchecked
def test_model_options_are_refused_with_checkpoint(setup, option, capsys):
    code = main(["eval", "--data", str(setup.data), "--checkpoint", str(setup.checkpoint),
                 *option])  # fmt: skip
    assert code == 2
    assert f"{option[0]} is for --model only" in _err(capsys)


def test_exactly_one_of_checkpoint_and_model(setup, capsys):
    both = ["--checkpoint", str(setup.checkpoint), "--model", str(setup.model_dir)]
    for args, says in ((both, "not allowed with argument"), ([], "one of the arguments")):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--data", str(setup.data), *args])
        assert exit_info.value.code == 2
        assert says in _err(capsys)


@pytest.mark.parametrize("mode", ["--model", "--checkpoint"])
def test_an_unwritable_json_is_refused_before_the_evaluation(setup, tmp_path, capsys, mode):
    """Found only at the end, it would cost the whole evaluation."""
    what = setup.model_dir if mode == "--model" else setup.checkpoint
    target = tmp_path / "no-such-folder" / "eval.json"
    started = time.monotonic()
    code = main(["eval", "--data", str(setup.data), mode, str(what), "--json", str(target)])
    assert code == 2 and time.monotonic() - started < 5
    assert f"--json {target}: folder {target.parent} does not exist" in _err(capsys)


def test_a_missing_model_dir_is_one_line(setup, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["eval", "--data", str(setup.data), "--model", str(missing)]) == 2
    assert f"{missing / 'manifest.json'}: missing" in _err(capsys)


def test_a_dead_cloud_fails_quickly_and_clearly(setup, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    code = main(["eval", "--data", str(setup.data), "--model", str(setup.model_dir),
                 "--cloud", f"127.0.0.1:{port}", "--timeout", "3", "--no-progress"])  # fmt: skip
    assert code == 2 and time.monotonic() - start < 30
    assert f"127.0.0.1:{port}" in _err(capsys)


def test_unknown_class_names_are_refused_as_for_a_checkpoint(setup, tmp_path, capsys):
    data = Path(shutil.copytree(setup.data, tmp_path / "voc"))
    sample = voc.read_split(data, "test", ("scratch",))[0]
    dent = replace(sample, objects=(replace(sample.objects[0], name="dent"),))
    voc.write_annotation(data / "Annotations" / f"{sample.image_id}.xml", dent)
    messages = []
    for what in (["--model", str(setup.model_dir)], ["--checkpoint", str(setup.checkpoint)]):
        assert main(["eval", "--data", str(data), *what, "--no-progress"]) == 2
        messages.append(_err(capsys).strip().split("error: ", 1)[1])
    assert messages[0] == messages[1]
    assert "unknown class 'dent'" in messages[0] and sample.image_id in messages[0]


def test_unreadable_images_are_named_and_the_rest_evaluated(setup, tmp_path, capsys, caplog):
    """A truncated image (its header reads) and an empty file (nothing reads): both named, in
    the JSON and on stderr, counted with no detections; the others give what predict gives."""
    data = Path(shutil.copytree(setup.data, tmp_path / "voc"))
    images = sorted((data / "JPEGImages").iterdir())
    truncated, empty = images[0], images[3]  # both defective
    truncated.write_bytes(truncated.read_bytes()[:200])
    empty.write_bytes(b"")
    capsys.readouterr()
    code, metrics = _eval("--data", str(data), "--model", str(setup.model_dir))
    assert code == 1
    err = _err(capsys)
    assert "2 of 10 images could not be evaluated" in err
    named = [e["path"] for e in metrics["image_errors"]]
    assert sorted(named) == [str(truncated), str(empty)]
    # each named as it happens (a log warning: stderr on the command line)
    assert all(str(path) in caplog.text for path in (truncated, empty))
    assert metrics["images"] == N_DEFECTIVE + N_FREE

    out = tmp_path / "predict.json"  # the same images through predict, gate off
    assert main(["predict", str(data / "JPEGImages"), "--model", str(setup.model_dir),
                 "--gate", "off", "--score-threshold", "0", "--json", str(out),
                 "--no-progress"]) == 1  # fmt: skip
    records = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    samples = voc.read_split(setup.data, "test", ("scratch",))  # the intact tree's ground truth
    ordered = [records[s.image_path.name] for s in samples]
    expected = _records_metrics(samples, ordered)
    assert metrics["map"] == pytest.approx(expected["map"], abs=1e-9)
    assert metrics["map"] < setup.by_model["map"]  # two defective images lost their boxes
    # the gate: an unread image has p(defect) 0, so the two defective ones are missed
    p_defect = [r["p_defect"] or 0.0 for r in ordered]
    gate = classifier_metrics(
        p_defect, [s.is_defective for s in samples], metrics["gate_threshold"]
    )
    assert metrics["gate_recall"] == pytest.approx(gate["recall"])
    assert metrics["gate_accuracy"] == pytest.approx(gate["accuracy"])
    assert metrics["gate_recall"] <= (N_DEFECTIVE - 2) / N_DEFECTIVE


def test_edge_gate_says_what_the_manifest_records(setup):
    manifest = read_manifest(setup.model_dir)
    assert edge_gate_kind(manifest) == "float32"
    quantised = {**manifest.extra, "edge_quantization": {"gate": "int8 static (QDQ)"}}
    assert edge_gate_kind(replace(manifest, extra=quantised)) == "int8"


def test_threshold_measures_the_override_an_edge_deploys(setup, capsys):
    """`predict --threshold` and `edge run --threshold` override the export's threshold, and
    eval --model had no way to measure it. 0 flags every image (the gated system is the
    ungated one), above 1 none (nothing kept); the export's own is reported beside it."""
    manifest_threshold = read_manifest(setup.model_dir).gate_threshold
    base = ("--data", str(setup.data), "--model", str(setup.model_dir))
    code, everything = _eval(*base, "--threshold", "0")
    assert code == 0
    assert everything["gate_threshold"] == 0 and everything["gate_calibrated_on"] == "--threshold"
    assert everything["manifest_gate_threshold"] == manifest_threshold
    assert everything["flagged_fraction"] == everything["gate_pass_rate"] == 1
    assert everything["gate_recall"] == 1 and everything["map_kept"] == pytest.approx(1)
    assert everything["map_gated"] == pytest.approx(everything["map"])
    code, nothing = _eval(*base, "--threshold", "1.01")
    assert code == 0
    assert nothing["flagged_fraction"] == nothing["gate_pass_rate"] == 0
    assert nothing["gate_recall"] == 0 and nothing["map_gated"] == 0
    assert nothing["bytes_per_flagged_image"] is None
    for key in DETECTOR_KEYS:  # the ungated detector does not depend on it
        assert everything[key] == nothing[key] == setup.by_model[key], key
    assert setup.by_model["gate_calibrated_on"] == "manifest"
    assert setup.by_model["manifest_gate_threshold"] == setup.by_model["gate_threshold"]
    # with --checkpoint the threshold is calibrated (--calibrate-split), not given
    code = main(["eval", "--data", str(setup.data), "--checkpoint", str(setup.checkpoint),
                 "--threshold", "0.5"])  # fmt: skip
    assert code == 2 and "--threshold is for --model only" in _err(capsys)
    assert main([*("eval", *base), "--threshold", "nan"]) == 2
    assert "--threshold nan: must be a number" in _err(capsys)


def test_storing_a_calibrated_threshold_is_logged(setup, tmp_path, caplog):
    """eval --checkpoint rewrote the checkpoint with its calibrated threshold without a word:
    one INFO line names the file and both thresholds; --no-store leaves the file as it was."""
    import logging

    from splitdet.shared.checkpoint import read_checkpoint
    from splitdet.shared.probability_format import format_probability

    checkpoint = tmp_path / "ck.pt"
    shutil.copy(setup.checkpoint, checkpoint)
    was = read_checkpoint(checkpoint)["gate_threshold"]
    caplog.set_level(logging.INFO, logger="splitdet.training.cli_eval")
    unchanged = checkpoint.read_bytes()
    code, _ = _eval("--data", str(setup.data), "--checkpoint", str(checkpoint), "--no-store")
    assert code == 0 and checkpoint.read_bytes() == unchanged
    assert not [r for r in caplog.records if "stored gate threshold" in r.getMessage()]
    code, metrics = _eval("--data", str(setup.data), "--checkpoint", str(checkpoint))
    assert code == 0
    now = read_checkpoint(checkpoint)["gate_threshold"]
    assert now == metrics["gate_threshold"] != was
    stored = [r for r in caplog.records if "stored gate threshold" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in stored] == [
        (logging.INFO, f"stored gate threshold {format_probability(now)} in {checkpoint} (was "
         f"{format_probability(was)}); --no-store leaves it as it was")
    ]  # fmt: skip
