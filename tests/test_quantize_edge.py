"""`splitdet export --quantize-edge`: an int8 gate graph calibrated on images, recorded in the
manifest, that the torch-free edge runs like the float one (issue 4's optional item)."""

from __future__ import annotations

import shutil

import onnx
import pytest

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.manifest import GATE_ONNX, read_manifest
from splitdet.training.voc import read_split

from support import predict_records


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "model.pt"
    save_checkpoint(path, tiny_model, gate_threshold=0.5)
    return path


def _export(checkpoint, out, *extra) -> int:
    return main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *extra])


def test_int8_gate_is_recorded_and_runs_like_the_float_gate(checkpoint, tiny_dataset, tmp_path):
    float_dir, int8_dir = tmp_path / "float", tmp_path / "int8"
    assert _export(checkpoint, float_dir) == 0
    assert _export(checkpoint, int8_dir, "--quantize-edge", str(tiny_dataset),
                   "--calibration-images", "3") == 0  # fmt: skip

    ops = {node.op_type for node in onnx.load(str(int8_dir / GATE_ONNX)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    float_ops = {node.op_type for node in onnx.load(str(float_dir / GATE_ONNX)).graph.node}
    assert "QuantizeLinear" not in float_ops

    manifest = read_manifest(int8_dir)
    quantization = manifest.extra["edge_quantization"]
    assert quantization["calibration_images"] == 3
    assert 0 < max(quantization["max_relative_error"].values()) < 0.5
    assert read_manifest(float_dir).extra["edge_quantization"] is None
    assert manifest.fingerprint != read_manifest(float_dir).fingerprint

    # the held-out test split (3 defective, 3 defect-free), none of them a calibration image:
    # every image through gate, completion and cloud heads costs as much again
    images = tmp_path / "images"
    images.mkdir()
    for sample in read_split(tiny_dataset, "test"):
        shutil.copy(sample.image_path, images)
    exact = predict_records(float_dir, images, tmp_path / "float.json", "--gate", "off")
    quantised = predict_records(int8_dir, images, tmp_path / "int8.json", "--gate", "off")
    assert [r["path"] for r in exact] == [r["path"] for r in quantised]
    assert len(exact) == 6
    for a, b in zip(exact, quantised, strict=True):
        assert b["error"] is None, b
        assert abs(a["p_defect"] - b["p_defect"]) < 0.1, (a["path"], a["p_defect"], b["p_defect"])


def test_calibration_without_images_is_a_clear_error(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "ImageSets" / "Main").mkdir(parents=True)
    (empty / "ImageSets" / "Main" / "train.txt").write_text("")
    assert _export(checkpoint, tmp_path / "out", "--quantize-edge", str(empty)) != 0
    err = capsys.readouterr().err
    assert "train" in err and str(empty) in err
    assert "Traceback" not in err


def test_export_can_set_box_refinement_without_touching_the_checkpoint(checkpoint, tmp_path):
    """`--box-refine-steps` reaches the cloud half through the manifest; the file stays as saved."""
    from splitdet.cloud.core import load_cloud
    from splitdet.shared.checkpoint import read_checkpoint

    saved = read_checkpoint(checkpoint)["config"]["box_refine_steps"]
    assert _export(checkpoint, tmp_path / "refined", "--box-refine-steps", "3") == 0
    cloud, manifest = load_cloud(tmp_path / "refined")
    assert manifest.model_config.box_refine_steps == 3
    assert cloud.roi_heads.refine_steps == 3
    assert read_checkpoint(checkpoint)["config"]["box_refine_steps"] == saved != 3


def _conv_instance_norm_gate(path) -> None:
    """An `edge_gate.onnx` stand-in: a convolution and the InstanceNormalization that a GroupNorm
    exports to, whose rank-1 scale onnxruntime's quantiser cannot quantise on axis 1."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "scale": np.ones(4, np.float32),
        "bias": np.zeros(4, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("InstanceNormalization", ["conv", "scale", "bias"], ["norm"]),
            helper.make_node("Relu", ["norm"], ["out"]),
        ],
        "gate",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def test_int8_quantisation_does_not_log_axis_warnings_of_group_norm(tmp_path, caplog):
    """onnxruntime logs "Axis 1 is out-of-range for weight ..." through the root logger for
    every GroupNorm scale (20 lines for a `cpu` preset model); they are dropped, only while it
    quantises, and no other record is."""
    import logging

    import numpy as np

    from splitdet.training.quantize_edge import _quiet_axis_warnings, quantize_gate

    gate = tmp_path / GATE_ONNX
    _conv_instance_norm_gate(gate)
    batches = [np.random.default_rng(k).normal(size=(1, 3, 8, 8)).astype(np.float32)
               for k in range(2)]  # fmt: skip
    caplog.set_level(logging.WARNING)
    quantize_gate(gate, batches)
    assert "out-of-range" not in caplog.text, caplog.text
    ops = {node.op_type for node in onnx.load(str(gate)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "InstanceNormalization"} <= ops

    with _quiet_axis_warnings():
        logging.warning("Axis 1 is out-of-range for weight 'x' with rank 1")  # onnxruntime's
        logging.warning("another root warning")
        logging.getLogger("splitdet.training").warning("Axis 1 is out-of-range for weight 'y'")
    logging.warning("Axis 1 is out-of-range for weight 'z' with rank 1")  # after: not dropped
    assert [r.getMessage() for r in caplog.records] == [
        "another root warning",
        "Axis 1 is out-of-range for weight 'y'",
        "Axis 1 is out-of-range for weight 'z' with rank 1",
    ]
