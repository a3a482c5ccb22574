"""The split spec: the one source of truth for what crosses the edge/cloud boundary.

Both halves of the model, the feature codec, the exported manifest and the wire read these
constants. Torch-free.

The FPN of torchvision's ResNet-FPN backbone yields five levels, named as torchvision names them:

    name    source            stride (input px per cell)
    "0"     P2 (from C2)       4
    "1"     P3 (from C3)       8
    "2"     P4 (from C4)      16
    "3"     P5 (from C5)      32
    "pool"  max_pool(P5,1,2)  64

Every level has the same channel count (the FPN width, 256 in torchvision's default).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bumped whenever what crosses the wire changes meaning (level set, layout, dtype rules).
SPEC_VERSION = "1"
#: Largest image side (original, before the model's resize) a request may carry, px: the edge
#: refuses larger images, which the cloud would refuse for good after the edge's work.
MAX_ORIGINAL_SIDE = 1 << 16

#: FPN level names in order from finest to coarsest, as torchvision names them.
LEVEL_NAMES: tuple[str, ...] = ("0", "1", "2", "3", "pool")
#: Levels produced by the top-down path (each has a lateral input C2..C5).
PYRAMID_LEVELS: tuple[str, ...] = ("0", "1", "2", "3")
#: The extra level torchvision appends (LastLevelMaxPool).
POOL_LEVEL = "pool"
#: Input pixels per feature cell, per level.
STRIDES: dict[str, int] = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
#: Padded input sides are multiples of this (torchvision's `size_divisible`).
SIZE_DIVISIBLE = 32
#: torchvision's default FPN width.
DEFAULT_FPN_CHANNELS = 256
#: Levels the ROI heads pool from (the RPN reads all five).
ROI_LEVELS: tuple[str, ...] = ("0", "1", "2", "3")


@dataclass(frozen=True)
class SplitSpec:
    """What one model's split looks like.

    Attributes:
        fpn_channels: channels C of every FPN level.
        gate_level: the level the defect classifier reads; the edge computes this level and
            every coarser one before the gate, and the finer ones only on demand.
        version: the spec version the model was exported under.
    """

    fpn_channels: int = DEFAULT_FPN_CHANNELS
    gate_level: str = "3"
    version: str = SPEC_VERSION

    def __post_init__(self) -> None:
        if self.gate_level not in LEVEL_NAMES:
            raise ValueError(f"gate_level must be one of {LEVEL_NAMES}, got {self.gate_level!r}")
        if self.fpn_channels <= 0:
            raise ValueError(f"fpn_channels must be positive, got {self.fpn_channels}")

    @property
    def gate_levels(self) -> tuple[str, ...]:
        """Levels the edge computes before the gate: the gate level and every coarser one."""
        if self.gate_level == POOL_LEVEL:
            return ("3", POOL_LEVEL)
        return (*PYRAMID_LEVELS[PYRAMID_LEVELS.index(self.gate_level) :], POOL_LEVEL)

    @property
    def lazy_levels(self) -> tuple[str, ...]:
        """Levels computed only for images the gate flags (finest first)."""
        return tuple(name for name in PYRAMID_LEVELS if name not in self.gate_levels)

    def level_shape(self, name: str, padded_hw: tuple[int, int]) -> tuple[int, int, int]:
        """Expected (C, h, w) of level `name` for a padded input of `padded_hw` pixels.

        `padded_hw` must be multiples of SIZE_DIVISIBLE; "pool" is max_pool2d(P5, 1, 2), whose side
        is ceil(side / 2) of P5's.
        """
        height, width = padded_hw
        if height % SIZE_DIVISIBLE or width % SIZE_DIVISIBLE or height <= 0 or width <= 0:
            raise ValueError(
                f"padded size {padded_hw} is not a positive multiple of {SIZE_DIVISIBLE}"
            )
        if name not in STRIDES:
            raise ValueError(f"unknown FPN level {name!r}; expected one of {LEVEL_NAMES}")
        if name == POOL_LEVEL:
            h5, w5 = height // STRIDES["3"], width // STRIDES["3"]
            return (self.fpn_channels, (h5 + 1) // 2, (w5 + 1) // 2)
        stride = STRIDES[name]
        return (self.fpn_channels, height // stride, width // stride)


def padded_size(height: int, width: int) -> tuple[int, int]:
    """Round an image size up to the next multiple of SIZE_DIVISIBLE, as torchvision pads."""
    d = SIZE_DIVISIBLE
    return (-(-height // d) * d, -(-width // d) * d)
