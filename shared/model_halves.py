"""The edge and cloud halves of a `MultiTaskRCNN` (torch).

`EdgeHalf` runs the backbone, the FPN top-down only down to the gate level and the defect head
(`gate` -> `GateOutput`), then on demand the lazy FPN levels (`complete`); `CloudHalf` runs the
RPN, the ROI heads and the postprocess on the five FPN levels. Both share (not copy) the model's
modules, so the halves cannot drift from it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from splitdet.shared.model_detector import MultiTaskRCNN
from splitdet.shared.spec import LEVEL_NAMES, POOL_LEVEL, PYRAMID_LEVELS, STRIDES


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
