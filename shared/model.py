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

Where each part lives (this module re-exports them all):

    model_heads      DefectHead, defect_loss, ContextRoIAlign, VotingRoIHeads, box_iou_min_side
    model_detector   MultiTaskRCNN, build_backbone, build_model
    model_halves     EdgeHalf, CloudHalf, GateOutput
"""

from splitdet.shared.model_detector import MultiTaskRCNN, build_backbone, build_model
from splitdet.shared.model_halves import CloudHalf, EdgeHalf, GateOutput
from splitdet.shared.model_heads import (
    ContextRoIAlign,
    DefectHead,
    VotingRoIHeads,
    box_iou_min_side,
    defect_loss,
)

__all__ = [
    "CloudHalf",
    "ContextRoIAlign",
    "DefectHead",
    "EdgeHalf",
    "GateOutput",
    "MultiTaskRCNN",
    "VotingRoIHeads",
    "box_iou_min_side",
    "build_backbone",
    "build_model",
    "defect_loss",
]
