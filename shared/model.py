"""The multi-task detector and its two halves (torch).

`MultiTaskRCNN` is torchvision's `FasterRCNN` on a ResNet-FPN backbone plus a defect classifier
(`DefectHead`) on one FPN level. Its state dict is torchvision's plus `defect_head.*` keys, so the
detector weights load into `torchvision.models.detection.fasterrcnn_resnet50_fpn` unchanged.

The split, defined from the one model so the halves cannot drift:

    edge.gate(images)      backbone body C2..C5, FPN top-down only down to the gate level,
                           the classifier -> p(defect) and what completion needs
    edge.complete(state)   the rest of the FPN (the lazy levels) from the kept C_i and the
                           top-down state
    cloud.detect(...)      RPN + ROI heads + postprocess to original image coordinates

`MultiTaskRCNN.forward` in eval mode is the monolithic baseline: plain FasterRCNN.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou, clip_boxes_to_image
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from splitdet.shared.config import ModelConfig
from splitdet.shared.spec import LEVEL_NAMES, POOL_LEVEL, PYRAMID_LEVELS, ROI_LEVELS, STRIDES


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "frozen":
        return misc_nn_ops.FrozenBatchNorm2d
    return lambda channels: nn.GroupNorm(32, channels)


def build_backbone(config: ModelConfig) -> BackboneWithFPN:
    """ResNet body (C2..C5) + FPN with LastLevelMaxPool, keyed as torchvision keys it."""
    body = getattr(resnet, f"resnet{config.depth}")(
        weights=None,
        norm_layer=_norm_layer(config.norm),
        zero_init_residual=config.zero_init_residual,
    )
    stage_channels = [body.inplanes // 8, body.inplanes // 4, body.inplanes // 2, body.inplanes]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": name for i, name in enumerate(PYRAMID_LEVELS)},
        in_channels_list=stage_channels,
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


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


def _outputs_to_fp32(module: nn.Module, args: object, output: object) -> object:
    """Forward hook: every floating tensor in a module's output (nested tuples, lists) as fp32."""
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        return type(output)(_outputs_to_fp32(module, args, item) for item in output)
    return output


class MultiTaskRCNN(FasterRCNN):
    """FasterRCNN + DefectHead. In eval mode `forward` is the plain (monolithic) detector.

    In training mode `forward(images, targets)` returns torchvision's four detection losses plus
    `loss_defect`; an image is defective when its target says so ("defective"), else when it has
    at least one box.
    """

    def __init__(self, config: ModelConfig) -> None:
        """A model with random weights, built as `config` (sizes, heads, thresholds) says."""
        anchor_generator = AnchorGenerator(
            sizes=tuple((size,) for size in config.anchor_sizes),
            aspect_ratios=(tuple(config.anchor_ratios),) * len(config.anchor_sizes),
        )
        box_head = box_predictor = None
        if config.box_head_dim != 1024:
            box_head = TwoMLPHead(config.fpn_channels * 7 * 7, config.box_head_dim)
            box_predictor = FastRCNNPredictor(config.box_head_dim, config.num_classes)
        super().__init__(
            build_backbone(config),
            num_classes=None if box_predictor is not None else config.num_classes,
            min_size=config.min_size,
            max_size=config.max_size,
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
            rpn_anchor_generator=anchor_generator,
            rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
            box_roi_pool=ContextRoIAlign(config.box_roi_context, config.box_roi_sampling_ratio),
            box_head=box_head,
            box_predictor=box_predictor,
            box_score_thresh=config.box_score_thresh,
            box_nms_thresh=config.box_nms_thresh,
            box_detections_per_img=config.box_detections_per_img,
        )
        self.config = config
        # torchvision builds its RoIHeads inside FasterRCNN; only postprocessing differs
        self.roi_heads.__class__ = VotingRoIHeads
        self.roi_heads.vote_iou = config.box_vote_iou
        self.roi_heads.vote_ramp = config.box_vote_ramp
        self.roi_heads.vote_passes = config.box_vote_passes
        self.roi_heads.refine_steps = config.box_refine_steps
        self.defect_head = DefectHead(config.fpn_channels, config.gate_pooling)
        #: Training only: the defect loss does not reach the backbone and FPN (the head learns
        #: on the detector's features), set from TrainConfig.detach_gate.
        self.detach_gate = False
        # Under bf16 autocast (training) the box arithmetic stays fp32: left in bfloat16,
        # torchvision decodes the proposals in bfloat16 and casts the ground-truth boxes to their
        # dtype; bfloat16 keeps 8 significant bits, so between 128 and 256 px coordinates fall on
        # a 1 px grid and a box thinner than that collapses to zero width: log(0) in the
        # regression targets, a NaN loss (seen on ResNet50 at half of 2448x2048, scratches 0.5 px
        # thin). The convolutions and linear layers still run in bf16; in fp32 this is a no-op.
        self.rpn.head.register_forward_hook(_outputs_to_fp32)
        self.roi_heads.box_predictor.register_forward_hook(_outputs_to_fp32)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        """The detector (eval mode) or its training losses (training mode).

        Args:
            images: per image Float32[3, H_i, W_i] in [0, 1], any size (`transform` normalises,
                resizes and pads them).
            targets: training only: as `training_losses` takes them.

        Returns:
            Eval: per image {"boxes" Float32[K, 4] x1y1x2y2 in original image px, "labels"
            Int64[K] (1-based), "scores" Float32[K] in [0, 1]}. Train: `training_losses`.
        """
        if not self.training:
            return super().forward(images, targets)
        return self.training_losses(images, targets)

    def training_losses(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None
    ) -> dict[str, Tensor]:
        """Joint multi-task losses for a batch of images.

        Args:
            images: per image Float32[3, H_i, W_i] in [0, 1], any size.
            targets: per image "boxes" Float32[K, 4] x1y1x2y2 in that image's px (`transform`
                resizes them with it), "labels" Int64[K] (1-based), and optionally "defective"
                Bool[] (see `defect_loss`).

        Returns:
            name -> scalar loss Tensor: torchvision's "loss_classifier", "loss_box_reg",
            "loss_objectness", "loss_rpn_box_reg", and "loss_defect".
        """
        if targets is None:
            raise ValueError("training needs targets")
        images_t, targets_t = self.transform(images, targets)
        features = self.backbone(images_t.tensors)
        proposals, proposal_losses = self.rpn(images_t, features, targets_t)
        _, detector_losses = self.roi_heads(features, proposals, images_t.image_sizes, targets_t)
        gate_feature = features[self.config.gate_level]
        if self.detach_gate:
            gate_feature = gate_feature.detach()
        image_logits, cell_logits = self.defect_head(gate_feature)
        losses = {**detector_losses, **proposal_losses}
        losses["loss_defect"] = defect_loss(
            image_logits, cell_logits, targets_t, STRIDES[self.config.gate_level]
        )
        return losses

    @torch.inference_mode()
    def paper_forward(
        self, image: Tensor, threshold: float
    ) -> tuple[float, dict[str, Tensor] | None]:
        """The paper's multi-task inference for one image ([3, H, W] in [0, 1]): the full FPN,
        the gate on its level, and the RPN + ROI heads only when p(defect) >= threshold.

        Returns (p_defect, detections in original px or None when the gate passed the image).
        """
        images, _ = self.transform([image])
        features = self.backbone(images.tensors)
        p_defect = float(torch.sigmoid(self.defect_head(features[self.config.gate_level])[0])[0])
        if p_defect < threshold:
            return p_defect, None
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, images.image_sizes)
        original = [(int(image.shape[-2]), int(image.shape[-1]))]
        return p_defect, self.transform.postprocess(detections, images.image_sizes, original)[0]

    @torch.inference_mode()
    def defect_probability(self, images: list[Tensor]) -> Tensor:
        """p(defect) Float32[N] in [0, 1] of images (per image Float32[3, H_i, W_i] in [0, 1],
        any size), through the full backbone and FPN (used in evaluation)."""
        images_t, _ = self.transform(images)
        feature = self.backbone(images_t.tensors)[self.config.gate_level]
        return torch.sigmoid(self.defect_head(feature)[0])


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


def build_model(config: ModelConfig | None = None) -> MultiTaskRCNN:
    """A freshly initialised multi-task detector (random weights)."""
    return MultiTaskRCNN(config or ModelConfig())


@dataclass
class GateOutput:
    """What the edge holds after the gate.

    Attributes:
        p_defect: Tensor[N], probability that each image is defective.
        levels: FPN levels computed so far (the gate level and every coarser one, "pool"
            included), name -> Tensor[N, C, h, w].
        laterals: backbone outputs C_i of the lazy levels, finest first, Tensor[N, C_i, h, w].
        top_down: the FPN's top-down state at the gate level (Tensor[N, C, h, w]); with
            `laterals` it is all completion needs.
    """

    p_defect: Tensor
    levels: dict[str, Tensor]
    laterals: list[Tensor]
    top_down: Tensor


class EdgeHalf(nn.Module):
    """The edge's half of a `MultiTaskRCNN`: backbone, lazy FPN, defect head.

    Inputs are normalised, padded image batches Tensor[N, 3, H, W] (H, W multiples of 32), as
    `model.transform` makes them.
    """

    def __init__(self, model: MultiTaskRCNN) -> None:
        """The edge half of `model`, sharing (not copying) its backbone and defect head."""
        super().__init__()
        self.body = model.backbone.body
        self.fpn = model.backbone.fpn
        self.defect_head = model.defect_head
        self.spec = model.config.split_spec
        gate = self.spec.gate_level
        # index of the finest pyramid level computed before the gate
        self.gate_index = PYRAMID_LEVELS.index("3" if gate == POOL_LEVEL else gate)

    def _top_down_step(self, top_down: Tensor, lateral_input: Tensor, index: int) -> Tensor:
        lateral = self.fpn.get_result_from_inner_blocks(lateral_input, index)
        upsampled = F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
        return lateral + upsampled

    def gate(self, images: Tensor) -> GateOutput:
        """Backbone + FPN down to the gate level + classifier.

        Args:
            images: Float32[N, 3, H, W], normalised, padded to multiples of 32.

        Returns:
            p(defect) Float32[N] in [0, 1], the levels `spec.gate_levels` (Float32[N, C, H / s,
            W / s] for a level of stride s, "pool" Float32[N, C, ceil(H / 64), ceil(W / 64)]),
            and the laterals and top-down state `complete` takes.
        """
        stages = list(self.body(images).values())  # C2..C5
        top = len(PYRAMID_LEVELS) - 1
        top_down = self.fpn.get_result_from_inner_blocks(stages[top], top)
        levels = {PYRAMID_LEVELS[top]: self.fpn.get_result_from_layer_blocks(top_down, top)}
        for index in range(top - 1, self.gate_index - 1, -1):
            top_down = self._top_down_step(top_down, stages[index], index)
            levels[PYRAMID_LEVELS[index]] = self.fpn.get_result_from_layer_blocks(top_down, index)
        pyramid, names = self.fpn.extra_blocks([levels["3"]], [stages[top]], ["3"])
        levels[POOL_LEVEL] = pyramid[names.index(POOL_LEVEL)]
        image_logits, _ = self.defect_head(levels[self.spec.gate_level])
        return GateOutput(
            p_defect=torch.sigmoid(image_logits),
            levels={name: levels[name] for name in self.spec.gate_levels},
            laterals=stages[: self.gate_index],
            top_down=top_down,
        )

    def complete(self, laterals: Sequence[Tensor], top_down: Tensor) -> dict[str, Tensor]:
        """The lazy FPN levels (finer than the gate's) from `gate`'s output.

        Args:
            laterals: `GateOutput.laterals`, Float32[N, C_i, H / s, W / s] per stage, finest
                first (C_i: the backbone stage's channels).
            top_down: `GateOutput.top_down`, Float32[N, C, h, w] at the gate level ("3" for
                a "pool" gate).

        Returns:
            name -> Float32[N, C, H / s, W / s] for each level in `spec.lazy_levels` (stride s).
        """
        levels: dict[str, Tensor] = {}
        for index in range(self.gate_index - 1, -1, -1):
            top_down = self._top_down_step(top_down, laterals[index], index)
            levels[PYRAMID_LEVELS[index]] = self.fpn.get_result_from_layer_blocks(top_down, index)
        return {name: levels[name] for name in self.spec.lazy_levels}

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Gate and complete at once.

        Args:
            images: Float32[N, 3, H, W], normalised, padded to multiples of 32.

        Returns:
            (p(defect) Float32[N] in [0, 1], name -> Float32[N, C, h, w] for all five levels
            in LEVEL_NAMES, as `gate` and `complete` give them).
        """
        out = self.gate(images)
        return out.p_defect, {**self.complete(out.laterals, out.top_down), **out.levels}


class CloudHalf(nn.Module):
    """The cloud's half of a `MultiTaskRCNN`: RPN + ROI heads + postprocess."""

    def __init__(self, model: MultiTaskRCNN) -> None:
        """The cloud half of `model`, sharing (not copying) its RPN, ROI heads and transform."""
        super().__init__()
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads
        self.transform = model.transform

    def detect(
        self,
        features: dict[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
        timings: dict[str, float] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections from the five FPN levels.

        Args:
            features: name -> Tensor[N, C, h, w] for every level in LEVEL_NAMES; the padded input
                size is 4x the size of level "0".
            image_sizes: per image (h, w) after resize, before padding, px.
            original_sizes: per image (h, w) of the image as read, px.
            timings: if given, receives "rpn_s" and "roi_s" (seconds, wall clock; "roi_s"
                includes the postprocess).

        Returns:
            per image {"boxes" Tensor[K, 4] x1y1x2y2 in original px, "labels" Int64[K],
            "scores" Tensor[K]}.
        """
        ordered = OrderedDict((name, features[name]) for name in LEVEL_NAMES)
        batch, _, height, width = ordered["0"].shape
        stride = STRIDES["0"]
        # The anchor generator reads only the padded input's shape; no pixels are needed.
        placeholder = ordered["0"].new_empty((batch, 0, height * stride, width * stride))
        images = ImageList(placeholder, [tuple(s) for s in image_sizes])
        start = time.perf_counter()
        proposals, _ = self.rpn(images, ordered)
        after_rpn = time.perf_counter()
        detections, _ = self.roi_heads(ordered, proposals, images.image_sizes)
        detections = self.transform.postprocess(
            detections, images.image_sizes, list(original_sizes)
        )
        if timings is not None:
            timings["rpn_s"] = after_rpn - start
            timings["roi_s"] = time.perf_counter() - after_rpn
        return detections
