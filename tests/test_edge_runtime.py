"""The exported edge half (ONNX Runtime, numpy preprocessing) against the PyTorch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.preprocess import ImageError, load_image, prepare
from splitdet.edge.runtime import EdgeRuntime
from splitdet.shared.codec import decode
from splitdet.shared.manifest import GATE_ONNX, ManifestError, read_manifest
from splitdet.shared.model import CloudHalf, EdgeHalf

from support import bomb_png


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-6))


def _image(seed: int, height: int = 300, width: int = 410) -> np.ndarray:
    return np.random.default_rng(seed).random((3, height, width), dtype=np.float32)


@pytest.mark.parametrize("hw", [(300, 410), (480, 333), (224, 224)])
def test_preprocess_matches_torchvision_transform(tiny_model, hw):
    image = _image(1, *hw)
    config = tiny_model.config
    ours = prepare(image, config.min_size, config.max_size, config.image_mean, config.image_std)
    with torch.inference_mode():
        reference, _ = tiny_model.transform([torch.from_numpy(image)])
    assert ours.batch.shape == tuple(reference.tensors.shape)
    assert ours.resized_hw == tuple(reference.image_sizes[0])
    np.testing.assert_allclose(ours.batch, reference.tensors.numpy(), rtol=0, atol=2e-6)


def test_onnx_gate_and_levels_match_pytorch(tiny_model, tiny_model_dir):
    runtime = EdgeRuntime(tiny_model_dir, threads=2)
    image = _image(2)
    config = tiny_model.config
    prepared = prepare(image, config.min_size, config.max_size, config.image_mean, config.image_std)
    gate = runtime.gate(prepared.batch)
    levels = runtime.complete(gate)
    with torch.inference_mode():
        p_ref, levels_ref = EdgeHalf(tiny_model)(torch.from_numpy(prepared.batch))
    assert abs(gate.p_defect - float(p_ref[0])) <= 1e-4 * max(abs(float(p_ref[0])), 1e-6)
    assert set(levels) == set(levels_ref)
    for name, level in levels.items():
        assert _relative_error(level, levels_ref[name][0].numpy()) <= 1e-4, name


@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_edge_then_cloud_equals_monolithic(tiny_model, tiny_model_dir, codec):
    """Lossless (fp32) split detections equal the monolithic detector's to 1e-3 px."""
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=2), codec=codec, gate=False)
    cloud = CloudHalf(tiny_model)
    compared = 0
    for seed in range(3):
        image = _image(10 + seed)
        result = pipeline.process_array(image)
        assert result.flagged and result.bytes_sent > 0
        features = {k: torch.from_numpy(v)[None] for k, v in decode(result.encoded).items()}
        with torch.inference_mode():
            ours = cloud.detect(features, [result.meta.resized_hw], [result.meta.original_hw])[0]
            reference = tiny_model([torch.from_numpy(image)])[0]
        if codec == "fp16":  # lossy: same number of boxes is not guaranteed; it must still work
            assert ours["boxes"].shape[1] == 4
            continue
        assert len(reference["boxes"]) > 0
        assert ours["boxes"].shape == reference["boxes"].shape
        np.testing.assert_allclose(ours["boxes"], reference["boxes"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(ours["scores"], reference["scores"], rtol=0, atol=1e-4)
        assert torch.equal(ours["labels"], reference["labels"])
        compared += 1
    assert compared == (3 if codec == "fp32" else 0)


@pytest.mark.parametrize("gate_level", ["0", "1", "pool"])
def test_every_gate_level_exports_and_splits_losslessly(gate_level, tmp_path):
    """A gate on any level exports (on P2 with no completion graph: nothing is lazy) and its
    fp32 split gives the monolithic detector's boxes."""
    from splitdet.shared.manifest import COMPLETE_ONNX
    from splitdet.training.export import export_model

    from conftest import make_tiny_model

    model = make_tiny_model(seed=4, gate_level=gate_level, gate_pooling="dense")
    (tmp_path / COMPLETE_ONNX).write_bytes(b"stale")  # a leftover of an earlier export
    manifest = export_model(model, tmp_path, gate_threshold=0.5, default_codec="fp32")
    lazy = model.config.split_spec.lazy_levels
    assert (COMPLETE_ONNX in manifest.artifacts) == bool(lazy)
    assert (tmp_path / COMPLETE_ONNX).exists() == bool(lazy)
    runtime = EdgeRuntime(tmp_path, threads=2)
    image = _image(20)
    result = EdgePipeline(runtime, gate=False).process_array(image)
    assert {t.name for t in result.encoded} == {"0", "1", "2", "3", "pool"}
    features = {k: torch.from_numpy(v)[None] for k, v in decode(result.encoded).items()}
    with torch.inference_mode():
        meta = result.meta
        ours = CloudHalf(model).detect(features, [meta.resized_hw], [meta.original_hw])
        reference = model([torch.from_numpy(image)])[0]
    assert len(reference["boxes"]) > 0
    assert ours[0]["boxes"].shape == reference["boxes"].shape
    np.testing.assert_allclose(ours[0]["boxes"], reference["boxes"], rtol=0, atol=1e-3)


def test_gate_decides_what_is_sent(tiny_model_dir):
    runtime = EdgeRuntime(tiny_model_dir, threads=2)
    image = _image(3)
    p = EdgePipeline(runtime).process_array(image).p_defect
    below = EdgePipeline(runtime, threshold=min(p + 0.01, 1.0)).process_array(image)
    above = EdgePipeline(runtime, threshold=max(p - 0.01, 0.0)).process_array(image)
    assert not below.flagged and below.encoded is None and below.bytes_sent == 0
    assert "complete" not in below.timings  # the lazy levels were never computed
    assert above.flagged and {t.name for t in above.encoded} == {"0", "1", "2", "3", "pool"}


def test_image_formats_accepted(tmp_path):
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    loaded_rgb = load_image(tmp_path / "rgb.png")
    np.testing.assert_allclose(loaded_rgb, rgb.transpose(2, 0, 1) / 255.0, atol=1e-7)
    gray = load_image(tmp_path / "gray.png")
    gray16 = load_image(tmp_path / "gray16.png")
    assert gray.shape == gray16.shape == (3, 40, 50)
    np.testing.assert_allclose(gray, gray16, atol=1e-6)  # 16-bit scaled by 65535, 8-bit by 255


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"this is a text file, not a JPEG\n" * 10, "not an image"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x13" * 300, "corrupt"),
        ("bomb.png", None, r"1600000000 pixels exceeds the 64000000 pixel limit \(decompression"),
        ("float.tif", "float", "unsupported image mode"),
        ("missing.png", "missing", "cannot read"),
    ],
)
def test_bad_images_refused_with_named_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.write_bytes(bomb_png())
    elif content == "float":
        Image.new("F", (10, 10)).save(path)
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as error:
        load_image(path)
    assert name in str(error.value)


def test_edited_model_dir_is_refused(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    read_manifest(copy)  # intact copy passes
    with open(copy / GATE_ONNX, "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ManifestError, match="differ from the manifest"):
        read_manifest(copy)


def test_a_manifest_missing_the_completion_graph_is_refused(tiny_model_dir, tmp_path):
    """A gate on P5 needs the completion graph: a manifest that drops it names the problem."""
    import json
    import shutil

    from splitdet.shared.manifest import COMPLETE_ONNX, MANIFEST_NAME

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    del data["artifacts"][COMPLETE_ONNX]
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"lists artifacts .* expected .*edge_complete\.onnx"):
        read_manifest(copy)


def test_a_decision_overrides_the_gate_but_the_gate_still_runs(tiny_model_dir):
    """The benchmark's oracle-gate mode: the verdict is given, the gate's cost is still paid."""
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=2), threshold=0.0)
    image = _image(4)
    passed = pipeline.process_array(image, decision=False)
    assert not passed.flagged and passed.encoded is None and "gate" in passed.timings
    assert 0.0 < passed.p_defect < 1.0
    forced = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=2), threshold=1.01)
    assert forced.process_array(image, decision=True).flagged
