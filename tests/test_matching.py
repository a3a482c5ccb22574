"""Training-time matching with a thickness floor (`TrainConfig.match_min_side`): a proposal or
anchor a few px thicker than a thin scratch is foreground, and its regression target is still
the scratch's true box."""

from __future__ import annotations

from dataclasses import replace

import torch
from torchvision.ops import box_iou

from splitdet.shared.config import ModelConfig
from splitdet.shared.model import box_iou_min_side, build_model
from splitdet.training.presets import CPU
from splitdet.training.train import configure_training_sampling

THIN = torch.tensor([[10.0, 20.0, 60.0, 22.0]])  # a horizontal scratch 50 x 2 px
AROUND = torch.tensor([[10.0, 17.0, 60.0, 25.0]])  # the same stroke boxed 8 px thick


def test_the_floor_widens_thin_boxes_only():
    assert box_iou(THIN, AROUND).item() == 0.25
    assert box_iou_min_side(THIN, AROUND, 8.0).item() == 1.0
    assert box_iou_min_side(THIN, AROUND, 4.0).item() == 0.5
    # boxes at least as large as the floor each way: plain IoU
    big = torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 5.0, 50.0, 45.0]])
    torch.testing.assert_close(box_iou_min_side(big, big, 8.0), box_iou(big, big))


def _training_model(match_min_side: float):
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=18, min_size=128, max_size=160)).train()
    configure_training_sampling(model, replace(CPU, match_min_side=match_min_side))
    return model


def test_roi_heads_take_a_thick_box_around_a_thin_scratch_as_foreground():
    targets = [{"boxes": THIN, "labels": torch.tensor([1])}]
    for floor, foreground in ((0.0, False), (8.0, True)):
        heads = _training_model(floor).roi_heads
        proposals, _, labels, regression = heads.select_training_samples([AROUND], targets)
        # torchvision adds the ground truth to the proposals: find the thick one among them
        row = (proposals[0] == AROUND).all(dim=1).nonzero()
        if not foreground:
            assert len(row) == 0 or labels[0][row[0, 0]] == 0, floor
            continue
        index = row[0, 0]
        assert labels[0][index] == 1
        # its regression target decodes to the scratch's true box, not the widened one
        decoded = heads.box_coder.decode_single(regression[0][index : index + 1], AROUND)
        torch.testing.assert_close(decoded, THIN, rtol=0, atol=1e-4)


def test_rpn_takes_thick_anchors_around_a_thin_scratch_as_positive():
    targets = [{"boxes": THIN, "labels": torch.tensor([1])}]
    close = torch.tensor([[10.0, 19.0, 60.0, 23.0]])  # 4 px thick: plain IoU 0.5, the best
    far = AROUND + torch.tensor([0.0, 30.0, 0.0, 30.0])
    anchors = [torch.cat([AROUND, close, far])]
    positive = {}
    for floor in (0.0, 8.0):
        rpn = _training_model(floor).rpn
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        positive[floor] = labels[0].tolist()
        torch.testing.assert_close(matched[0][:2], THIN.expand(2, 4))  # targets: the true box
    # plain IoU: the thick anchor (0.25) is background, the closest one positive only as the
    # best there is (0.5 < 0.7); with the floor both are positives on their own merit
    assert positive[0.0] == [0.0, 1.0, 0.0]
    assert positive[8.0] == [1.0, 1.0, 0.0]
