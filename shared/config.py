"""The model configuration: a frozen dataclass, torch-free, stored in checkpoints and manifests.

Defaults reproduce torchvision's `fasterrcnn_resnet50_fpn(num_classes=2)` plus the paper's
classification head (global average pooling + linear) on the deepest FPN map.
"""

from __future__ import annotations

import math
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


DEPTHS = (18, 34, 50)
#: Largest input side (`min_size`, `max_size`) and anchor size, px: the cloud refuses requests
#: resized beyond it (`cloud.core.MAX_RESIZED_SIDE`); the paper's input is 2448x2048.
MAX_INPUT_SIDE = 1 << 13
#: Foreground classes, and characters of one class name (the edge takes names up to 256).
MAX_CLASSES = 1000
MAX_CLASS_NAME_CHARS = 256
#: Aspect ratios per anchor location, and the range of one (height / width).
MAX_ANCHOR_RATIOS = 16
ANCHOR_RATIO_BOUNDS = (0.01, 100.0)
#: Largest relative error between an export's ONNX Runtime outputs and PyTorch's that `splitdet
#: export` accepts (max |ort - torch| / max |torch|, per output); on p(defect), at most 1, it is
#: also the largest absolute difference, which the calibrated gate threshold leaves room for.
EXPORT_TOLERANCE = 1e-4
#: Smallest per-channel standard deviation (on [0, 1] pixels); 0 would divide by zero.
MIN_IMAGE_STD = 1e-4
#: Proposals per image the RPN keeps before and after its NMS (torchvision's default 1000): the
#: ROI heads' memory grows with them (fpn_channels x 7 x 7 floats per proposal and pass).
MAX_TOP_N = 10_000
#: Boxes in one answer: the edge refuses an answer holding more (`ANSWER_BOXES_ALLOWED`).
MAX_DETECTIONS_PER_IMG = 1000

#: Integer fields -> inclusive (lowest, highest) value.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "fpn_channels": (1, 1024),  # torchvision's 256; ResNet50's deepest map has 2048
    "min_size": (1, MAX_INPUT_SIDE),
    "max_size": (1, MAX_INPUT_SIDE),
    "pixel_bits": (MIN_PIXEL_BITS, 16),
    "box_head_dim": (1, 4096),  # torchvision's 1024
    "box_roi_sampling_ratio": (1, 4),
    "box_vote_passes": (1, MAX_VOTE_PASSES),
    "box_refine_steps": (0, MAX_REFINE_STEPS),
    "rpn_pre_nms_top_n_test": (1, MAX_TOP_N),
    "rpn_post_nms_top_n_test": (1, MAX_TOP_N),
    "box_detections_per_img": (1, MAX_DETECTIONS_PER_IMG),
}
#: Number fields (int or float) -> inclusive (lowest, highest) value.
NUMBER_BOUNDS: dict[str, tuple[float, float]] = {
    "box_roi_context": (1.0, 4.0),
    "box_vote_ramp": (0.0, 0.5),
    "box_score_thresh": (0.0, 1.0),
    "box_nms_thresh": (0.0, 1.0),
}


def _shown(value: Any) -> str:
    """`value`'s repr for a message, cut to 80 characters (an int too long to print: its
    size in bits)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's limit on digits printed
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 80 else text[:80] + "..."


def _check_int(name: str, value: Any, low: int, high: int, what: str | None = None) -> None:
    """ValueError naming `name` unless `value` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what or name} must be an integer {low}-{high}, got {_shown(value)}")


def _check_number(name: str, value: Any, low: float, high: float, what: str | None = None) -> None:
    """ValueError naming `name` unless `value` is a finite int or float (not a bool) in
    [low, high]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or not low <= value <= high
    ):
        raise ValueError(f"{what or name} must be a number in [{low}, {high}], got {_shown(value)}")


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
        """Check every field's type and range (a configuration read from a manifest or a
        checkpoint is untrusted: a value torch cannot build, or one that makes every request
        cost gigabytes, is refused here, naming the field). Lists become tuples.

        Raises:
            ValueError: a field of the wrong type or outside its range; the message names the
                field, the value and what it may be.
        """
        for name in ("class_names", "image_mean", "image_std", "anchor_sizes", "anchor_ratios"):
            value = getattr(self, name)
            if isinstance(value, list):  # (a JSON array; tuples keep the config hashable)
                object.__setattr__(self, name, tuple(value))
        for name, (low, high) in INT_BOUNDS.items():
            _check_int(name, getattr(self, name), low, high)
        for name, (low, high) in NUMBER_BOUNDS.items():
            _check_number(name, getattr(self, name), low, high)
        depth = self.depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth not in DEPTHS:
            raise ValueError(f"depth must be 18, 34 or 50, got {_shown(depth)}")
        self._check_class_names()
        if not isinstance(self.zero_init_residual, bool):
            raise ValueError(
                f"zero_init_residual must be true or false, got {_shown(self.zero_init_residual)}"
            )
        for name in ("norm", "gate_pooling", "gate_level"):
            allowed = {"norm": NORMS, "gate_pooling": GATE_POOLINGS, "gate_level": LEVEL_NAMES}
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed[name]:
                raise ValueError(f"{name} must be one of {allowed[name]}, got {_shown(value)}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) != 3:
                raise ValueError(
                    f"{name} must be 3 numbers (one per channel), got {_shown(values)}"
                )
            for value in values:
                low = 0.0 if name == "image_mean" else MIN_IMAGE_STD
                _check_number(name, value, low, 1.0, f"each of {name} {_shown(values)}")
        sizes = self.anchor_sizes
        if not isinstance(sizes, tuple) or len(sizes) != len(LEVEL_NAMES):
            raise ValueError(
                f"anchor_sizes needs one size per level {LEVEL_NAMES}, got {_shown(sizes)}"
            )
        for size in sizes:
            what = f"each of anchor_sizes {_shown(sizes)}"
            _check_int("anchor_sizes", size, 1, MAX_INPUT_SIDE, what)
        ratios = self.anchor_ratios
        if not isinstance(ratios, tuple) or not 1 <= len(ratios) <= MAX_ANCHOR_RATIOS:
            raise ValueError(
                f"anchor_ratios must be 1-{MAX_ANCHOR_RATIOS} numbers, got {_shown(ratios)}"
            )
        for ratio in ratios:
            low, high = ANCHOR_RATIO_BOUNDS
            _check_number(
                "anchor_ratios", ratio, low, high, f"each of anchor_ratios {_shown(ratios)}"
            )
        if self.box_vote_iou is not None:
            _check_number("box_vote_iou", self.box_vote_iou, 0.0, 1.0)
            if self.box_vote_iou == 0:
                raise ValueError("box_vote_iou must be in (0, 1] or None, got 0")
        if self.box_vote_ramp and (
            self.box_vote_iou is None
            or not 0.0 < self.box_vote_ramp <= min(self.box_vote_iou, 1.0 - self.box_vote_iou)
        ):
            raise ValueError(
                "box_vote_ramp must be 0, or with box_vote_iou set keep box_vote_iou +- ramp "
                f"within [0, 1]; got ramp {self.box_vote_ramp}, box_vote_iou {self.box_vote_iou}"
            )
        if self.norm == "group" and self.fpn_channels % 32:
            raise ValueError(
                f"group norm needs fpn_channels divisible by 32, got {self.fpn_channels}"
            )

    def _check_class_names(self) -> None:
        """ValueError unless class_names is 1-MAX_CLASSES distinct printable names of
        1-MAX_CLASS_NAME_CHARS characters."""
        names = self.class_names
        if not isinstance(names, tuple):
            raise ValueError(f"class_names must be a list of names, got {_shown(names)}")
        if not names:
            raise ValueError("class_names must name at least one foreground class")
        if len(names) > MAX_CLASSES:
            raise ValueError(f"class_names must be 1-{MAX_CLASSES} names, got {len(names)}")
        for name in names:
            if (
                not isinstance(name, str)
                or not 1 <= len(name) <= MAX_CLASS_NAME_CHARS
                or not name.isprintable()
            ):
                raise ValueError(
                    f"class_names: each must be printable text of 1-{MAX_CLASS_NAME_CHARS} "
                    f"characters, got {_shown(name)}"
                )
            if names.count(name) > 1:
                raise ValueError(f"class_names: {name!r} is listed twice")

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
        """Inverse of `to_dict`; unknown keys are refused so a typo never passes silently.

        Raises:
            ValueError: not a dict, a key it does not know, or a value out of its field's type
                or range (`__post_init__`); the message names the key or the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
