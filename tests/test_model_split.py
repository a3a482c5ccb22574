"""The split contract: cloud(edge(x)) is the monolithic detector, and the lazy FPN is the FPN."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.ops import MultiScaleRoIAlign

from splitdet.shared.checkpoint import detector_state_dict, load_model, save_checkpoint
from splitdet.shared.config import ModelConfig
from splitdet.shared.model import CloudHalf, ContextRoIAlign, EdgeHalf, build_model


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


#: The box head's options on a smaller input (240x390, not a multiple of 32 either): what they
#: change is the ROI heads, which see the same number of proposals at any image size.
SMALL = {"min_size": 240, "max_size": 400}


@pytest.mark.parametrize(
    ("depth", "image_hw", "sizes"),
    [
        # the camera's resolution at torchvision's default input size (800x956). ResNet50 on it
        # is left out: its bottleneck body and wider FPN inputs are the (50, (613, 997)) case's,
        # and the two paths share everything but the numbers
        (18, (2048, 2448), {}),
        (18, (613, 997), {"min_size": 480, "max_size": 800}),  # resized size not a multiple of 32
        (50, (613, 997), {"min_size": 480, "max_size": 800}),  # the paper's backbone
        (18, (307, 499), {**SMALL, "box_roi_context": 1.5}),
        (18, (307, 499), {**SMALL, "box_vote_iou": 0.6}),
        (18, (307, 499), {**SMALL, "box_roi_sampling_ratio": 1}),
        (18, (307, 499), {**SMALL, "box_refine_steps": 2}),
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
    model = _random_model(depth=50, min_size=256, max_size=320)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, epoch=3, gate_threshold=0.25)
    restored, checkpoint = load_model(path)
    assert checkpoint["epoch"] == 3 and checkpoint["gate_threshold"] == 0.25

    state = checkpoint["model"]
    extra = set(state) - set(detector_state_dict(state))
    assert extra and all(key.startswith("defect_head.") for key in extra)
    plain = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=256, max_size=320
    ).eval()
    plain.load_state_dict(detector_state_dict(state))  # strict: every key matches

    torch.manual_seed(2)
    image = torch.rand(3, 600, 700)
    reference = plain([image])[0]
    _assert_same_detections(restored([image])[0], reference)
    _assert_same_detections(model([image])[0], reference)


def test_config_round_trips_and_refuses_unknown_keys():
    config = ModelConfig(depth=18, class_names=("scratch", "dent"), gate_level="1")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.num_classes == 3
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "detph": 50})
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=101)


def test_config_of_an_older_model_keeps_torchvision_box_head():
    saved = ModelConfig(depth=18).to_dict()
    for key in (
        "box_roi_context",
        "box_vote_iou",
        "box_vote_ramp",
        "box_roi_sampling_ratio",
        "box_refine_steps",
        "box_vote_passes",
    ):
        del saved[key]  # written before the fields existed
    assert ModelConfig.from_dict(saved).box_refine_steps == 0  # one pass of the box head
    with pytest.raises(ValueError, match="box_refine_steps"):
        ModelConfig(box_refine_steps=-1)
    assert ModelConfig.from_dict(saved).box_roi_context == 1.0
    assert ModelConfig.from_dict(saved).box_roi_sampling_ratio == 2  # torchvision's
    with pytest.raises(ValueError, match="box_roi_sampling_ratio"):
        ModelConfig(box_roi_sampling_ratio=0)
    with pytest.raises(ValueError, match="box_roi_context"):
        ModelConfig(box_roi_context=0.5)
    assert ModelConfig.from_dict(saved).box_vote_iou is None
    assert ModelConfig.from_dict(saved).box_vote_ramp == 0.0  # votes with the cut, if at all
    with pytest.raises(ValueError, match="box_vote_iou"):
        ModelConfig(box_vote_iou=0.0)
    assert ModelConfig.from_dict(saved).box_vote_passes == 1  # one pass, as voting was
    with pytest.raises(ValueError, match="box_vote_passes"):
        ModelConfig(box_vote_passes=0)


@functools.lru_cache(maxsize=2)  # (calls come in runs of one setting; a head holds 50 MB)
def _voting_heads(vote_iou: float | None, vote_ramp: float, vote_passes: int) -> torch.nn.Module:
    """A random model's ROI heads with these voting settings, reused by the next calls with the
    same ones: its postprocessing reads only them (the logits and box deltas are given), and
    changes nothing."""
    return _random_model(
        depth=18, box_vote_iou=vote_iou, box_vote_ramp=vote_ramp, box_vote_passes=vote_passes
    ).roi_heads


def _postprocess(
    vote_iou: float | None,
    scores: list[float],
    proposals: torch.Tensor | None = None,
    vote_ramp: float = 0.0,
    vote_passes: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept boxes and scores of a model's ROI postprocessing for proposals (default: three) with
    zero box regression (each class's box is the proposal) and the given foreground scores."""
    heads = _voting_heads(vote_iou, vote_ramp, vote_passes)
    if proposals is None:
        proposals = torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [40.0, 40, 60, 50]])
    logits = torch.logit(torch.tensor(scores))[:, None] * torch.tensor([[0.0, 1.0]])
    boxes, kept_scores, _ = heads.postprocess_detections(
        logits, torch.zeros(len(proposals), 8), [proposals], [(100, 100)]
    )
    return boxes[0], kept_scores[0]


def test_box_voting_averages_the_boxes_nms_suppressed():
    plain_boxes, plain_scores = _postprocess(None, [0.6, 0.4, 0.9])
    voted_boxes, voted_scores = _postprocess(0.5, [0.6, 0.4, 0.9])
    torch.testing.assert_close(voted_scores, plain_scores)  # NMS decides what survives
    torch.testing.assert_close(plain_boxes, torch.tensor([[40.0, 40, 60, 50], [0, 0, 10, 10]]))
    # the two proposals overlap at IoU 9/11: the kept one moves 0.4 px towards the other
    torch.testing.assert_close(voted_boxes, torch.tensor([[40.0, 40, 60, 50], [0.4, 0, 10.4, 10]]))
    # below the voting IoU nothing is averaged
    torch.testing.assert_close(_postprocess(0.9, [0.6, 0.4, 0.9])[0], plain_boxes)


def test_box_voting_keeps_a_near_tie_in_place():
    """Two proposals scoring alike trade places in NMS under a small change of the features:
    a 1 px jump without voting, a 0.01 px step with it."""
    before, after = [0.505, 0.495, 0.9], [0.495, 0.505, 0.9]
    assert float((_postprocess(None, before)[0] - _postprocess(None, after)[0]).abs().max()) == 1
    jump = (_postprocess(0.5, before)[0] - _postprocess(0.5, after)[0]).abs().max()
    assert float(jump) == pytest.approx(0.01, abs=1e-4)


def test_box_voting_with_a_ramp_weighs_scores_above_the_threshold():
    """Above the ramp a candidate weighs its score minus box_score_thresh (0.05)."""
    boxes, scores = _postprocess(0.6, [0.6, 0.4, 0.9], vote_ramp=0.2)  # IoU 9/11 > 0.8
    torch.testing.assert_close(scores, _postprocess(None, [0.6, 0.4, 0.9])[1])
    shift = 0.35 / (0.55 + 0.35)
    torch.testing.assert_close(
        boxes, torch.tensor([[40.0, 40, 60, 50], [shift, 0, 10 + shift, 10]])
    )


@pytest.mark.parametrize("ramp", [0.0, 0.2])
def test_box_voting_with_a_ramp_moves_continuously(ramp):
    """A candidate whose IoU with the kept box crosses box_vote_iou (0.6) under a small change
    of the features: the cut lets it into the vote whole (the box jumps by 1 px), the ramp
    by a sliver (the box moves by less than the candidate itself moved)."""

    def voted(offset: float) -> torch.Tensor:
        proposals = torch.tensor([[0.0, 0, 10, 10], [offset, 0, 10 + offset, 10]])
        return _postprocess(0.6, [0.9, 0.6], proposals, vote_ramp=ramp)[0][0]

    # IoU (10 - x) / (10 + x): 0.6064 at x = 2.45, 0.5970 at x = 2.55
    step = float((voted(2.45) - voted(2.55)).abs().max())
    if ramp:
        assert step < 0.05
    else:
        assert step > 0.7


def test_box_voting_passes_settle_a_near_tie_on_one_box():
    """Three candidates 1.5 px apart, the first two near-tied: which of them NMS keeps decides
    where one voting pass centres the vote (0.37 px apart); each further pass re-centres on the
    box the last one voted, and both settle where the weights balance (0.02 px apart: the two
    scores differ by 0.01)."""
    proposals = torch.tensor([[0.0, 0, 10, 10], [1.5, 0, 11.5, 10], [3.0, 0, 13, 10]])

    def voted(scores: list[float], passes: int) -> torch.Tensor:
        boxes, kept = _postprocess(0.6, scores, proposals, vote_ramp=0.2, vote_passes=passes)
        torch.testing.assert_close(kept, torch.tensor([max(scores)]))  # NMS keeps one box
        assert 0.0 < float(boxes[0, 0]) < 3.0 and float(boxes[0, 1]) == 0.0  # in the cluster
        return boxes[0]

    jumps = [
        float((voted([0.50, 0.49, 0.30], n) - voted([0.49, 0.50, 0.30], n)).abs().max())
        for n in (1, 2, 3, 5)
    ]
    assert jumps[0] > 0.3
    assert all(a > b for a, b in itertools.pairwise(jumps))
    assert jumps[-1] < 0.1 * jumps[0]


def test_box_vote_ramp_needs_voting_and_room():
    ModelConfig(box_vote_iou=0.6, box_vote_ramp=0.2)
    for iou, ramp in [(None, 0.2), (0.6, 0.5), (0.6, -0.1), (0.3, 0.31)]:
        with pytest.raises(ValueError, match="box_vote_ramp"):
            ModelConfig(box_vote_iou=iou, box_vote_ramp=ramp)


@pytest.mark.parametrize("steps", [0, 1, 3])
@torch.inference_mode()
def test_box_refinement_regresses_each_box_again(steps):
    """A box head that always shifts a box right by a tenth of its width (dx 0.1, nothing else)
    and scores it 0.88: with n refine steps the box moves n + 1 times, the score stays."""
    heads = _random_model(depth=18, box_refine_steps=steps).roi_heads
    predictor = heads.box_predictor
    for layer in (predictor.cls_score, predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    predictor.cls_score.bias[1] = 2.0  # foreground probability sigmoid(2)
    predictor.bbox_pred.bias[4] = 1.0  # class 1's dx; the box coder's weight 10: 0.1 widths
    sizes = {"0": 32, "1": 16, "2": 8, "3": 4, "pool": 2}  # a 128 px input
    features = {name: torch.rand(1, 256, n, n) for name, n in sizes.items()}
    proposal = torch.tensor([[10.0, 40, 30, 50]])  # 20 px wide: each pass moves it 2 px
    detections, losses = heads(features, [proposal], [(128, 128)])
    shift = 2.0 * (steps + 1)
    expected = torch.tensor([[10.0 + shift, 40, 30 + shift, 50]])
    torch.testing.assert_close(detections[0]["boxes"], expected)
    torch.testing.assert_close(detections[0]["scores"], torch.sigmoid(torch.tensor([2.0])))
    assert losses == {}
    nothing, _ = heads(features, [torch.zeros(0, 4)], [(128, 128)])  # no proposals: no boxes
    assert nothing[0]["boxes"].shape == (0, 4)


@torch.inference_mode()
def test_roi_context_pools_the_widened_box():
    torch.manual_seed(3)
    features = {name: torch.randn(1, 8, 64 // 2**k, 64 // 2**k) for k, name in enumerate("0123")}
    shapes = [(256, 256)]
    boxes = torch.tensor([[100.0, 120.0, 140.0, 130.0], [10.0, 10.0, 200.0, 60.0]])
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    torch.testing.assert_close(
        ContextRoIAlign(1.0)(features, [boxes], shapes), plain(features, [boxes], shapes)
    )
    # context 1.5: the window grows about the centre (the second box reaches past the image)
    widened = torch.tensor([[90.0, 117.5, 150.0, 132.5], [-37.5, -2.5, 247.5, 72.5]])
    pooled = ContextRoIAlign(1.5)(features, [boxes], shapes)
    torch.testing.assert_close(pooled, plain(features, [widened], shapes))
    assert not torch.allclose(pooled, plain(features, [boxes], shapes))
    # one sample per bin: torchvision's pooler with sampling_ratio=1, not its default
    centre = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=1)
    pooled = ContextRoIAlign(1.0, sampling_ratio=1)(features, [boxes], shapes)
    torch.testing.assert_close(pooled, centre(features, [boxes], shapes))
    assert not torch.allclose(pooled, plain(features, [boxes], shapes))


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


def test_the_checkpoints_boxes_stay_on_the_image_as_the_clouds_do():
    """A box on the image's lower edge, mapped back from the resized image in float32, came out
    a float32 step past it (y2 200.0000153 on a 327x200 image: `eval` and `bench` on a
    checkpoint; the cloud and the edge clamp theirs). The monolithic detector, the paper's
    gated forward and the cloud half clamp them alike now."""
    from conftest import TINY_CONFIG

    model = _random_model(**{**TINY_CONFIG, "box_score_thresh": 0.0})
    torch.manual_seed(0)
    image = torch.rand(3, 200, 327)
    with torch.inference_mode():
        monolithic = model([image])[0]["boxes"]
        paper = model.paper_forward(image, threshold=0.0)[1]["boxes"]
        split = _split_detect(model, image)["boxes"]
    for boxes in (monolithic, paper, split):
        assert len(boxes) > 0 and float(boxes[:, 3].max()) == 200.0  # one on the edge, on it
        assert float(boxes[:, 2].max()) <= 327.0 and float(boxes[:, :2].min()) >= 0.0
