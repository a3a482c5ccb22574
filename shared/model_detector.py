"""The multi-task detector `MultiTaskRCNN` and its builders (torch).

torchvision's `FasterRCNN` on a ResNet-FPN backbone (`build_backbone`) with the heads of
`model_heads`: the defect classifier on one FPN level, context ROI pooling and box-voting ROI
heads. `build_model` makes one with random weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from splitdet.shared.config import ModelConfig
from splitdet.shared.model_heads import ContextRoIAlign, DefectHead, VotingRoIHeads, defect_loss
from splitdet.shared.spec import PYRAMID_LEVELS, STRIDES


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


def _outputs_to_fp32(module: nn.Module, args: object, output: object) -> object:
    """Forward hook: every floating tensor in a module's output (nested tuples, lists) as fp32."""
    if isinstance(output, Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, (tuple, list)):
        return type(output)(_outputs_to_fp32(module, args, item) for item in output)
    return output


class ClippedTransform(GeneralizedRCNNTransform):
    """torchvision's transform whose `postprocess` clamps each box onto its original image:
    mapped back from the resized image in float32, a corner on the image's edge can land a
    float32 step past it (x2 300.00003 on a 300 px wide image), as the cloud and the edge
    already clamp what they return."""

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Per image {"boxes" Float32[K, 4] x1y1x2y2 in original px, within [0, W] x [0, H],
        ...} (training mode: `result` as it is)."""
        result = super().postprocess(result, image_shapes, original_image_sizes)
        if not self.training:
            for detections, size in zip(result, original_image_sizes, strict=True):
                detections["boxes"] = clip_boxes_to_image(detections["boxes"], size)
        return result


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
        self.transform.__class__ = ClippedTransform
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


def build_model(config: ModelConfig | None = None) -> MultiTaskRCNN:
    """A freshly initialised multi-task detector (random weights)."""
    return MultiTaskRCNN(config or ModelConfig())
