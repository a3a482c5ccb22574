"""The heads `MultiTaskRCNN` puts on torchvision's FasterRCNN (torch).

`DefectHead` is the binary defect classifier on one FPN level and `defect_loss` its training
loss; `ContextRoIAlign` (box ROI pooling with context around each box) and `VotingRoIHeads` (ROI
heads with box voting and iterative refinement) replace torchvision's box pooling and ROI heads;
`box_iou_min_side` is the IoU they match thin boxes by in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou, clip_boxes_to_image
from torchvision.ops.poolers import LevelMapper, initLevelMapper

from splitdet.shared.spec import ROI_LEVELS, STRIDES


class DefectHead(nn.Module):
    """Binary defect classifier on one FPN level.

    Poolings:
        avg    global average pooling + linear (the paper's head)
        max    global max pooling + linear
        dense  3x3 conv + GroupNorm + ReLU + 1x1 conv -> one logit per cell; the image logit is
               the max cell (trained with per-box dense supervision, see `defect_loss`). The
               GroupNorm keeps the hidden units alive: without it they died within minutes of
               training, every image's max cell became a dead one and p(defect) a constant.
    """

    def __init__(self, channels: int, pooling: str) -> None:
        """`channels`: C of the FPN level it reads; `pooling`: "avg", "max" or "dense"."""
        super().__init__()
        self.pooling = pooling
        if pooling == "dense":
            self.cells = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.GroupNorm(min(32, channels // 4), channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, 1, 1),
            )
        else:
            self.fc = nn.Linear(channels, 1)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor | None]:
        """feature (Tensor[N, C, h, w]) -> (image logits Tensor[N], cell logits Tensor[N, h, w]
        for the dense head, else None)."""
        if self.pooling == "dense":
            cell_logits = self.cells(feature)[:, 0]
            return cell_logits.flatten(1).amax(dim=1), cell_logits
        pooled = feature.mean(dim=(2, 3)) if self.pooling == "avg" else feature.amax(dim=(2, 3))
        return self.fc(pooled)[:, 0], None


def _is_defective(target: dict[str, Tensor]) -> bool:
    """The image-level gate label: the target's "defective" (BoolTensor[]) when it has one (an
    image whose only objects are VOC-difficult is defective, yet has no boxes), else whether it
    has boxes."""
    if "defective" in target:
        return bool(target["defective"])
    return len(target["boxes"]) > 0


def defect_loss(
    image_logits: Tensor,
    cell_logits: Tensor | None,
    targets: Sequence[dict[str, Tensor]],
    stride: int,
) -> Tensor:
    """Binary cross-entropy of the defect head.

    Args:
        image_logits: Tensor[N], one logit per image.
        cell_logits: Tensor[N, h, w] for the dense head (cell (i, j) covers input pixels
            [j*stride, (j+1)*stride) x [i*stride, (i+1)*stride)), else None.
        targets: per image "boxes" Tensor[K, 4] in resized input px, and optionally
            "defective" BoolTensor[] (the image label; without it K = 0 means defect-free).
        stride: input px per cell of the gate level.

    The image term always applies. For the dense head two terms are added: the highest cell logit
    inside each ground-truth box is pushed to 1, and every cell outside all boxes to 0 (none of
    a defective image without boxes).
    """
    labels = torch.tensor([float(_is_defective(t)) for t in targets], device=image_logits.device)
    loss = F.binary_cross_entropy_with_logits(image_logits, labels)
    if cell_logits is None:
        return loss
    positive_logits, negative_masks = [], []
    height, width = cell_logits.shape[-2:]
    for logits, target in zip(cell_logits, targets, strict=True):
        # defective without boxes (its objects are all difficult): where is unknown, so no cell
        # of it is a negative (the image term, through the max cell, still says defective)
        unknown = len(target["boxes"]) == 0 and _is_defective(target)
        outside = torch.full((height, width), not unknown, dtype=torch.bool, device=logits.device)
        for x1, y1, x2, y2 in (target["boxes"] / stride).tolist():
            # cells the box touches; at least one, clipped to the map
            i0, j0 = min(int(y1), height - 1), min(int(x1), width - 1)
            i1 = max(i0 + 1, min(math.ceil(y2), height))
            j1 = max(j0 + 1, min(math.ceil(x2), width))
            outside[i0:i1, j0:j1] = False
            positive_logits.append(logits[i0:i1, j0:j1].amax())
        negative_masks.append(outside)
    negatives = cell_logits[torch.stack(negative_masks)]
    if negatives.numel():
        loss = loss + F.binary_cross_entropy_with_logits(negatives, torch.zeros_like(negatives))
    if positive_logits:
        positives = torch.stack(positive_logits)
        loss = loss + F.binary_cross_entropy_with_logits(positives, torch.ones_like(positives))
    return loss


class ContextRoIAlign(MultiScaleRoIAlign):
    """torchvision's box ROI pooling over each box widened about its centre by `context`.

    A box on part of a thin stroke and a box on all of it hold the same picture inside; only
    the surroundings tell whether the stroke goes on. The pooled grid (7x7) and the level a box
    is pooled from follow the widened box; the boxes the head regresses are unchanged.
    """

    def __init__(self, context: float, sampling_ratio: int = 2) -> None:
        """`context`: the factor a box's width and height are widened by (1.0: none);
        `sampling_ratio`: RoIAlign's sampling points per side of each output bin."""
        super().__init__(
            featmap_names=list(ROI_LEVELS), output_size=7, sampling_ratio=sampling_ratio
        )
        self.context = context
        # torchvision infers each level's scale from the first call's feature and image sizes
        # and keeps it: a first image resized to 66x160 px (padded 96x160) made P2 read as
        # 1/2, not 1/4, and every later box on that server wrong. The strides are known.
        self.scales, self.map_levels = roi_level_scales()

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Each box's 7x7 features from one of the levels in ROI_LEVELS, chosen by its widened size.

        Args:
            x: name -> Float32[N, C, h, w], the FPN levels (levels not in ROI_LEVELS unread).
            boxes: per image Float32[K_i, 4] x1y1x2y2 in input px (the resized image's frame).
            image_shapes: per image (h, w) after resize, before padding, px.

        Returns:
            Float32[sum K_i, C, 7, 7], the boxes in order, image by image.
        """
        if self.context != 1.0:
            boxes = [_widen(b, self.context) for b in boxes]
        return super().forward(x, boxes, image_shapes)


def roi_level_scales() -> tuple[list[float], LevelMapper]:
    """The scale of each level in ROI_LEVELS (1 / its stride: [1/4, 1/8, 1/16, 1/32]) and the
    FPN paper's box-to-level mapping over them, as torchvision's MultiScaleRoIAlign infers
    them from an image whose sizes are multiples of the strides (canonical box 224 px, level
    4)."""
    strides = [STRIDES[name] for name in ROI_LEVELS]
    levels = [int(math.log2(stride)) for stride in strides]
    return [1.0 / stride for stride in strides], initLevelMapper(levels[0], levels[-1])


def _widen(boxes: Tensor, factor: float = 1.0, min_side: float = 0.0) -> Tensor:
    """Tensor[K, 4] x1y1x2y2 -> the same boxes about their centres, width and height times
    `factor`, then (with `min_side`) at least `min_side` px each way."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    if min_side:
        half = half.clamp(min=min_side / 2)
    return torch.cat([centre - half, centre + half], dim=1)


def box_iou_min_side(boxes1: Tensor, boxes2: Tensor, min_side: float) -> Tensor:
    """IoU of every pair, each box first widened about its centre to at least `min_side` px in
    width and height: Tensor[N, 4], Tensor[M, 4] x1y1x2y2 -> Tensor[N, M]. For matching only: a
    box 8 px thick around a 2 px thick scratch overlaps it at IoU 0.25, so plain IoU makes it
    background, and no proposal teaches the heads to shrink to thin boxes."""
    return box_iou(_widen(boxes1, min_side=min_side), _widen(boxes2, min_side=min_side))


class VotingRoIHeads(RoIHeads):
    """torchvision's ROI heads; with `vote_iou` set, each box kept by NMS is replaced by the
    weighted mean of the candidates (same class, score above `score_thresh`) around it (box
    voting). With `vote_ramp` 0 a candidate weighs its score where it overlaps the kept box at
    IoU >= `vote_iou`; with a ramp its weight rises linearly with the IoU from 0 at `vote_iou -
    vote_ramp` to its score above `score_thresh` at `vote_iou + vote_ramp`. Scores, labels and
    which boxes survive are torchvision's; only the coordinates move. Near-tied candidates that
    trade places in NMS under a small change of the features (int8) then give nearly the same box,
    and with a ramp no candidate enters or leaves the vote whole; with `vote_passes` > 1 the vote
    is repeated around the box the last pass voted (a mean shift). On the `cpu` preset's model
    voting raised COCO mAP on validation and test (see training/RESULTS.md).
    """

    vote_iou: float | None = None
    vote_ramp: float = 0.0
    vote_passes: int = 1
    refine_steps: int = 0
    #: Training only: proposals are matched to ground truth by `box_iou_min_side` with this
    #: floor (px; 0: torchvision's IoU). Set by the trainer, not saved with the model.
    match_min_side: float = 0.0

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision's forward; in eval mode with `refine_steps` n > 0, the box head runs n + 1
        times, each pass on the boxes the previous one regressed (iterative box refinement).

        Args:
            features: name -> Tensor[N, C, h, w], the FPN levels.
            proposals: per image Tensor[R_i, 4] x1y1x2y2 in input px.
            image_shapes: per image (h, w) after resize, before padding, px.

        Returns:
            per image {"boxes" Tensor[D, 4] in input px, "labels" Int64[D], "scores" [D]}, and
            no losses. Each candidate's scores are its class probabilities averaged over the
            passes; its box is the last pass's regression of the box the pass before gave it.
        """
        counts = [len(p) for p in proposals]
        if self.training or not self.refine_steps or not sum(counts):
            return super().forward(features, proposals, image_shapes, targets)
        class_logits, box_regression = self._box_pass(features, proposals, image_shapes)
        probabilities = [F.softmax(class_logits, -1)]
        for _ in range(self.refine_steps):
            regressed = self.box_coder.decode(box_regression, proposals)  # [R, K+1, 4]
            best = probabilities[-1][:, 1:].argmax(dim=1) + 1  # most probable foreground class
            chosen = regressed[torch.arange(len(regressed)), best].split(counts)
            proposals = [
                clip_boxes_to_image(b, shape) for b, shape in zip(chosen, image_shapes, strict=True)
            ]
            class_logits, box_regression = self._box_pass(features, proposals, image_shapes)
            probabilities.append(F.softmax(class_logits, -1))
        # postprocess_detections takes logits; the log of a distribution softmaxes back to it
        mean_logits = torch.stack(probabilities).mean(dim=0).log()
        boxes, scores, labels = self.postprocess_detections(
            mean_logits, box_regression, proposals, image_shapes
        )
        detections = [
            {"boxes": b, "labels": lab, "scores": sc}
            for b, sc, lab in zip(boxes, scores, labels, strict=True)
        ]
        return detections, {}

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's matching (per image matched ground-truth index Int64[R_i], label
        Int64[R_i]), on boxes widened to `match_min_side` when it is set. The regression
        targets are still the true boxes: only which proposal is foreground changes."""
        if self.match_min_side:
            side = self.match_min_side
            proposals = [_widen(p, min_side=side) for p in proposals]
            gt_boxes = [_widen(g, min_side=side) for g in gt_boxes]
        return super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)

    def _box_pass(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        """One pass of the box head: class logits Tensor[R, K+1], box deltas Tensor[R, 4(K+1)]
        for the R = sum R_i boxes in `proposals`."""
        pooled = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(pooled)

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """class_logits Tensor[R, K+1], box_regression Tensor[R, 4(K+1)], proposals per image
        Tensor[R_i, 4] in input px -> per image kept boxes Tensor[D, 4], scores [D], labels [D]."""
        kept = super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        if self.vote_iou is None:
            return kept
        kept_boxes, kept_scores, kept_labels = kept
        counts = [len(p) for p in proposals]
        candidates = self.box_coder.decode(box_regression, proposals).split(counts)
        probabilities = F.softmax(class_logits, -1).split(counts)
        voted = []
        for boxes, labels, cand, prob, shape in zip(
            kept_boxes, kept_labels, candidates, probabilities, image_shapes, strict=True
        ):
            cand = clip_boxes_to_image(cand, shape)[:, 1:].reshape(-1, 4)
            prob = prob[:, 1:]
            cand_labels = torch.arange(1, prob.shape[1] + 1, device=prob.device).expand_as(prob)
            prob, cand_labels = prob.reshape(-1), cand_labels.reshape(-1)
            live = prob > self.score_thresh
            cand, prob, cand_labels = cand[live], prob[live], cand_labels[live]
            if not len(boxes) or not len(cand):
                voted.append(boxes)
                continue
            same = labels[:, None] == cand_labels
            centres = boxes
            for _ in range(self.vote_passes):
                weights = self._vote_weights(box_iou(centres, cand), same, prob)
                total = weights.sum(dim=1, keepdim=True)
                # in the first pass every kept box is its own candidate (IoU 1, score above
                # score_thresh), so no row sums to 0; a later pass keeps a row that does
                centres = torch.where(total > 0, (weights @ cand) / total.clamp_min(1e-12), centres)
            voted.append(centres)
        return voted, kept_scores, kept_labels

    def _vote_weights(self, iou: Tensor, same: Tensor, prob: Tensor) -> Tensor:
        """Weights Tensor[D, M] of M candidates (scores prob Tensor[M]) in the vote of D boxes,
        from their IoU Tensor[D, M] and whether their class is the box's (same Bool[D, M])."""
        if self.vote_ramp:
            rise = (iou - (self.vote_iou - self.vote_ramp)) / (2 * self.vote_ramp)
            return rise.clamp(0.0, 1.0) * same * (prob - self.score_thresh)
        return ((iou >= self.vote_iou) & same) * prob
