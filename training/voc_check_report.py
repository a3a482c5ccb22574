"""What `voc_check.check_dataset` reports of a PASCAL VOC dataset: `DatasetReport`, the whole
dataset's problems, warnings and counts, and `SplitStats`, what one split file lists.

Only the standard library.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DatasetReport", "SplitStats"]


@dataclass
class SplitStats:
    """What one split file lists (over the annotations that could be read)."""

    images: int = 0
    defective: int = 0
    defect_free: int = 0
    objects: Counter = field(default_factory=Counter)  # class name -> boxes
    difficult: int = 0
    unreadable: int = 0  # listed ids whose annotation or image has a problem

    def to_json(self) -> dict:
        """Plain JSON types."""
        return {
            "images": self.images,
            "unreadable": self.unreadable,
            "defective": self.defective,
            "defect_free": self.defect_free,
            "objects": dict(sorted(self.objects.items())),
            "difficult": self.difficult,
        }


@dataclass
class DatasetReport:
    """Everything `check_dataset` found.

    ``problems``: lines that make training or evaluation fail, each starting with a path.
    ``warnings``: what would not fail but is likely a mistake.
    ``box_px``: width and height percentiles (min, median, max) of every box, in pixels.
    ``split_record``: the record `splitdet data split` left (`voc_split_record`), None without.
    """

    root: Path
    annotations: int = 0
    images: int = 0
    classes: Counter = field(default_factory=Counter)
    splits: dict[str, SplitStats] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)  # read fine, in no split
    image_sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    box_px: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    split_record: dict | None = None  # ImageSets/Main/split.json, as `data split` wrote it

    @property
    def ok(self) -> bool:
        """True when nothing would stop `splitdet train` or `eval` on this dataset."""
        return not self.problems

    def to_json(self) -> dict:
        """Plain JSON types (for ``splitdet data check --json``)."""
        return {
            "root": str(self.root),
            "ok": self.ok,
            "annotations": self.annotations,
            "images": self.images,
            "classes": dict(sorted(self.classes.items())),
            "splits": {name: stats.to_json() for name, stats in self.splits.items()},
            "unlisted": self.unlisted,
            "image_sizes": {f"{w}x{h}": n for (w, h), n in self.image_sizes.most_common()},
            "box_px": self.box_px,
            "problems": self.problems,
            "warnings": self.warnings,
            "split_record": self.split_record,
        }
