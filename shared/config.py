"""The model configuration: a frozen dataclass, torch-free, stored in checkpoints and manifests.

Defaults reproduce torchvision's `fasterrcnn_resnet50_fpn(num_classes=2)` plus the paper's
classification head (global average pooling + linear) on the deepest FPN map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from splitdet.shared.spec import DEFAULT_FPN_CHANNELS, LEVEL_NAMES, SplitSpec

#: ImageNet statistics, torchvision's defaults for GeneralizedRCNNTransform.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMS = ("batch", "frozen", "group")
GATE_POOLINGS = ("avg", "max", "dense")
#: Most extra passes of the box head at inference (`ModelConfig.box_refine_steps`).
MAX_REFINE_STEPS = 4
#: Fewest bits `ModelConfig.pixel_bits` takes (a 16-bit file holding 8-bit values).
MIN_PIXEL_BITS = 8


def pixel_full_scale(pixel_bits: int) -> int:
    """The value a 16-bit grayscale pixel holding `pixel_bits`-bit values takes at full
    brightness: 2**pixel_bits - 1 (`ModelConfig.pixel_bits`)."""
    return (1 << pixel_bits) - 1


#: Fields added after checkpoints and exports were first written -> the value those implied.
#: `to_dict` leaves such a field out at that value, so that what is written at the default
#: reads (and hashes, in a manifest's fingerprint) as it did before the field existed, and
#: older splitdet versions, which refuse keys they do not know, still read it.
LATER_FIELDS: dict[str, Any] = {"pixel_bits": 16}
#: Most passes of box voting (`ModelConfig.box_vote_passes`).
MAX_VOTE_PASSES = 10


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the multi-task detector (weights aside).

    Attributes mirror torchvision's keyword names where one exists.
    """

    depth: int = 50  # ResNet depth: 18, 34 or 50 (the paper's)
    class_names: tuple[str, ...] = ("scratch",)  # foreground classes; background is implicit
    fpn_channels: int = DEFAULT_FPN_CHANNELS  # C of every FPN level
    min_size: int = 800  # shorter side after resize, px (torchvision's default)
    max_size: int = 1333  # cap on the longer side after resize, px
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel, on [0, 1] pixels
    image_std: tuple[float, float, float] = IMAGENET_STD
    # Bits a 16-bit grayscale image's values use: 16 takes them over 0..65535; 10, 12 or 14 is a
    # camera that saves its values unscaled in a 16-bit file (0..4095 for 12), so that they are
    # scaled by 2**pixel_bits - 1 instead, and a value past it is refused. 8-bit images are
    # always scaled by 255.
    pixel_bits: int = 16
    norm: str = "batch"  # backbone norm: batch | frozen (torchvision with weights) | group
    zero_init_residual: bool = False  # ResNet's zero-init of each block's last norm
    gate_level: str = "3"  # FPN level the defect head reads ("3" = P5, the paper's deepest)
    gate_pooling: str = "avg"  # avg (paper) | max | dense (per-cell logits, image = max)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level "0".."pool", px
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    box_head_dim: int = 1024  # TwoMLPHead representation size
    # Side of the window the box head pools, over the box's side: 1 pools the box itself
    # (torchvision); 1.5 also shows the head what lies around it (whether a stroke continues).
    box_roi_context: float = 1.0
    # Bilinear samples per ROI-align bin along each side: 2 is torchvision's; 1 samples each bin
    # at its centre (a quarter of the points; on a CPU ROI-align's forward and backward passes
    # took 61 ms against 136 ms per step of the cpu preset).
    box_roi_sampling_ratio: int = 2
    # Box voting: after NMS each kept box becomes the score-weighted mean of the candidate boxes
    # of its class that overlap it at IoU >= this. None: torchvision's plain NMS.
    box_vote_iou: float | None = None
    # Half-width of box voting's IoU ramp. 0: the cut above (a candidate weighs its score at IoU
    # >= box_vote_iou, nothing below). > 0: its weight rises linearly from 0 at box_vote_iou -
    # ramp to its score above box_score_thresh at box_vote_iou + ramp, so the voted box moves
    # continuously with the candidates (a small change of the features, int8, cannot drop one
    # in or out of the vote whole).
    box_vote_ramp: float = 0.0
    # Passes of box voting. 1: the candidates are weighed by their IoU with the box NMS kept.
    # n > 1: each further pass weighs them by their IoU with the box the pass before voted (a
    # mean shift), so the vote settles where its candidates' weights balance whichever of two
    # near-tied candidates NMS kept (int8 features can swap such a pair).
    # Measured on a `cpu` preset model: 3 passes cost validation mAP 0.011 and left int8's
    # boxes no closer to fp32's (training/RESULTS.md), so presets keep 1.
    box_vote_passes: int = 1
    # Inference only: extra passes of the box head over its own boxes (iterative box refinement).
    # 0: torchvision's single pass. n: each candidate's box, as its most probable foreground class
    # regresses it, is pooled and regressed again n times; its class probabilities are the mean
    # over the passes. Training is unchanged, so a trained model can take it or leave it.
    box_refine_steps: int = 0
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.depth not in (18, 34, 50):
            raise ValueError(f"depth must be 18, 34 or 50, got {self.depth}")
        if not self.class_names:
            raise ValueError("class_names must name at least one foreground class")
        if (
            isinstance(self.pixel_bits, bool)
            or not isinstance(self.pixel_bits, int)
            or not MIN_PIXEL_BITS <= self.pixel_bits <= 16
        ):
            raise ValueError(f"pixel_bits must be {MIN_PIXEL_BITS}-16, got {self.pixel_bits}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.gate_pooling not in GATE_POOLINGS:
            raise ValueError(
                f"gate_pooling must be one of {GATE_POOLINGS}, got {self.gate_pooling!r}"
            )
        if self.gate_level not in LEVEL_NAMES:
            raise ValueError(f"gate_level must be one of {LEVEL_NAMES}, got {self.gate_level!r}")
        if len(self.anchor_sizes) != len(LEVEL_NAMES):
            raise ValueError(f"anchor_sizes needs one size per level {LEVEL_NAMES}")
        if not 1.0 <= self.box_roi_context <= 4.0:
            raise ValueError(f"box_roi_context must be in [1, 4], got {self.box_roi_context}")
        if self.box_roi_sampling_ratio not in (1, 2, 3, 4):
            raise ValueError(
                f"box_roi_sampling_ratio must be 1-4, got {self.box_roi_sampling_ratio}"
            )
        if self.box_vote_iou is not None and not 0.0 < self.box_vote_iou <= 1.0:
            raise ValueError(f"box_vote_iou must be in (0, 1] or None, got {self.box_vote_iou}")
        if self.box_vote_ramp and (
            self.box_vote_iou is None
            or not 0.0 < self.box_vote_ramp <= min(self.box_vote_iou, 1.0 - self.box_vote_iou)
        ):
            raise ValueError(
                "box_vote_ramp must be 0, or with box_vote_iou set keep box_vote_iou +- ramp "
                f"within [0, 1]; got ramp {self.box_vote_ramp}, box_vote_iou {self.box_vote_iou}"
            )
        if not 1 <= self.box_vote_passes <= MAX_VOTE_PASSES:
            raise ValueError(
                f"box_vote_passes must be 1-{MAX_VOTE_PASSES}, got {self.box_vote_passes}"
            )
        if not 0 <= self.box_refine_steps <= MAX_REFINE_STEPS:
            raise ValueError(
                f"box_refine_steps must be 0-{MAX_REFINE_STEPS}, got {self.box_refine_steps}"
            )
        if self.norm == "group" and self.fpn_channels % 32:
            raise ValueError("group norm needs fpn_channels divisible by 32")

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision counts them."""
        return len(self.class_names) + 1

    @property
    def split_spec(self) -> SplitSpec:
        """The split this configuration implies."""
        return SplitSpec(fpn_channels=self.fpn_channels, gate_level=self.gate_level)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); a LATER_FIELDS field at its old implied
        value is left out."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k not in LATER_FIELDS or v != LATER_FIELDS[k]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are refused so a typo never passes silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
