"""The split contract: cloud(edge(x)) is the monolithic detector, and the lazy FPN is the FPN."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from splitdet.shared.checkpoint import detector_state_dict, load_model, save_checkpoint
from splitdet.shared.config import ModelConfig
from splitdet.shared.model import CloudHalf, EdgeHalf, build_model


def _random_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**overrides)).eval()


def _split_detect(model, image: torch.Tensor) -> dict[str, torch.Tensor]:
    edge, cloud = EdgeHalf(model), CloudHalf(model)
    images, _ = model.transform([image])
    gate = edge.gate(images.tensors)
    features = {**gate.levels, **edge.complete(gate.laterals, gate.top_down)}
    original = [tuple(image.shape[-2:])]
    return cloud.detect(features, images.image_sizes, original)[0]


def _assert_same_detections(ours: dict, reference: dict) -> None:
    assert len(reference["boxes"]) > 0, "a comparison over zero detections proves nothing"
    assert ours["boxes"].shape == reference["boxes"].shape
    torch.testing.assert_close(ours["boxes"], reference["boxes"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["scores"], reference["scores"], rtol=0, atol=1e-5)
    assert torch.equal(ours["labels"], reference["labels"])


@pytest.mark.parametrize(
    ("depth", "image_hw", "sizes"),
    [
        (18, (2048, 2448), {}),
        (50, (2048, 2448), {}),
        (18, (613, 997), {"min_size": 480, "max_size": 800}),  # resized size not a multiple of 32
        (50, (613, 997), {"min_size": 480, "max_size": 800}),
    ],
)
@torch.inference_mode()
def test_split_equals_monolithic(depth, image_hw, sizes):
    model = _random_model(depth=depth, **sizes)
    torch.manual_seed(1)
    image = torch.rand(3, *image_hw)
    _assert_same_detections(_split_detect(model, image), model([image])[0])


@pytest.mark.parametrize(
    ("gate_level", "pooling"), [("3", "avg"), ("pool", "max"), ("1", "dense"), ("0", "dense")]
)
@torch.inference_mode()
def test_lazy_fpn_equals_torchvision_fpn(gate_level, pooling):
    model = _random_model(depth=18, fpn_channels=128, gate_level=gate_level, gate_pooling=pooling)
    edge = EdgeHalf(model)
    images = torch.randn(1, 3, 320, 416)
    expected = model.backbone(images)  # torchvision's BackboneWithFPN / FeaturePyramidNetwork
    gate = edge.gate(images)
    assert set(gate.levels) == set(model.config.split_spec.gate_levels)
    lazy = edge.complete(gate.laterals, gate.top_down)
    assert set(lazy) == set(model.config.split_spec.lazy_levels)
    assert set(lazy) | set(gate.levels) == set(expected)
    for name, level in {**gate.levels, **lazy}.items():
        assert torch.equal(level, expected[name]), name
    # the gate reads the level its configuration names, and only that
    reference = torch.sigmoid(model.defect_head(expected[gate_level])[0])
    assert torch.equal(gate.p_defect, reference)


@torch.inference_mode()
def test_checkpoint_loads_into_plain_torchvision(tmp_path):
    model = _random_model(depth=50, min_size=480, max_size=800)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, epoch=3, gate_threshold=0.25)
    restored, checkpoint = load_model(path)
    assert checkpoint["epoch"] == 3 and checkpoint["gate_threshold"] == 0.25

    state = checkpoint["model"]
    extra = set(state) - set(detector_state_dict(state))
    assert extra and all(key.startswith("defect_head.") for key in extra)
    plain = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=480, max_size=800
    ).eval()
    plain.load_state_dict(detector_state_dict(state))  # strict: every key matches

    torch.manual_seed(2)
    image = torch.rand(3, 600, 700)
    _assert_same_detections(restored([image])[0], plain([image])[0])
    _assert_same_detections(model([image])[0], plain([image])[0])


def test_config_round_trips_and_refuses_unknown_keys():
    config = ModelConfig(depth=18, class_names=("scratch", "dent"), gate_level="1")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.num_classes == 3
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "detph": 50})
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=101)


@pytest.mark.parametrize(
    ("gate_level", "before", "lazy"),
    [
        ("3", ("3", "pool"), ("0", "1", "2")),
        ("pool", ("3", "pool"), ("0", "1", "2")),
        ("1", ("1", "2", "3", "pool"), ("0",)),
    ],
)
def test_split_spec_levels(gate_level, before, lazy):
    from splitdet.shared.spec import SplitSpec

    spec = SplitSpec(gate_level=gate_level)
    assert spec.gate_levels == before
    assert spec.lazy_levels == lazy
    assert spec.level_shape("pool", (800, 960)) == (256, 13, 15)
    assert spec.level_shape("0", (800, 960)) == (256, 200, 240)
    with pytest.raises(ValueError, match="multiple of 32"):
        spec.level_shape("0", (801, 960))


@torch.inference_mode()
def test_paper_forward_gates_the_heads():
    model = _random_model(depth=18, fpn_channels=128, min_size=256, max_size=320)
    image = torch.rand(3, 300, 400)
    p_defect, detections = model.paper_forward(image, threshold=0.0)
    _assert_same_detections(detections, model([image])[0])
    assert p_defect == pytest.approx(float(model.defect_probability([image])[0]), abs=1e-6)
    skipped_p, skipped = model.paper_forward(image, threshold=1.01)
    assert skipped is None and skipped_p == pytest.approx(p_defect, abs=1e-6)
