"""What `splitdet eval` says of the images its evaluated split shares with a split whose images
make its figures read better: the train split of --data (a model trained on the dataset has
seen them), and the split the gate threshold is calibrated on (the gate figures then measure
the images that set it). `split_overlap` gives the JSON's "split_overlap" and a warning per
split; `train_split` and `calibration_split` say what to compare with. Images are compared as
`run_checks.also_in_train` compares train's (`run_checks.shared_images`): by id or image
file within one dataset, by image file only with another one's (--calibrate-data).

Part of `splitdet.training.cli_eval`, for the checkpoint and the export paths alike. Top-level
imports are stdlib (and `cli_eval_report`) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.training.cli_eval_report import _split_path

if TYPE_CHECKING:
    from splitdet.training.voc import VocSample

#: Why images of the evaluated split that train.txt lists too mislead.
TRAINED_ON = (
    "a model trained on this dataset has seen them, so eval's figures of it read better than "
    "they would on new images"
)
#: Why images of the evaluated split that the calibration split lists too mislead.
CALIBRATED_ON = (
    "the split the gate threshold is calibrated on, so the gate figures (recall, accuracy, mAP "
    "kept) measure images that set the threshold, and read better than on new images"
)


@dataclass(frozen=True)
class SplitListing:
    """A split the evaluated one should share no image with."""

    name: str  # as the JSON names it: "train", "val", "val of DIR"
    file: Path  # its split file
    samples: Sequence[VocSample]
    same_dataset: bool  # the evaluated split's dataset: its ids name the same images
    why: str  # what sharing images with it does to eval's figures


def train_split(data: Path | str, split: str) -> SplitListing | None:
    """The train split of the VOC tree `data`, to compare the evaluated `split` with; None
    when there is no train.txt, or `split` is train itself (evaluated by choice)."""
    file = _split_path(data, "train")
    if split == "train" or not file.is_file():
        return None
    return SplitListing("train", file, listed_samples(Path(data), "train"), True, TRAINED_ON)


def calibration_split(
    data: Path | str,
    split: str,
    calibrate_data: Path | str,
    calibrate_split: str,
    samples: Sequence[VocSample],
    name: str,
) -> SplitListing | None:
    """The calibration split (`calibrate_split` of `calibrate_data`, read as `samples`, named
    `name` in the JSON), to compare the evaluated `split` of `data` with; None when it is the
    evaluated split itself: then every image is shared, by the user's choice
    (`calibrated_on_itself` says so)."""
    same_dataset = Path(calibrate_data).resolve() == Path(data).resolve()
    if same_dataset and calibrate_split == split:
        return None
    file = _split_path(calibrate_data, calibrate_split)
    return SplitListing(name, file, samples, same_dataset, CALIBRATED_ON)


def calibrated_on_itself(data: Path | str, split: str) -> str:
    """What eval says when the gate threshold is calibrated on the evaluated split `split` of
    `data` itself: not a warning (both splits were chosen), but the gate figures read better."""
    return (
        f"{_split_path(data, split)}: the gate threshold is calibrated on the evaluated split "
        "itself, so the gate figures (recall, accuracy, mAP kept) measure the images that set "
        "it and read better than on new images; --calibrate-split another split (val for test) "
        "for held-out ones"
    )


def split_overlap(
    data: Path | str,
    split: str,
    samples: Sequence[VocSample],
    listings: Sequence[SplitListing | None],
) -> tuple[dict[str, dict], list[str]]:
    """(The JSON's "split_overlap": per split of `listings` sharing images with the evaluated
    `samples`, its "file", how many "images" and an "example" id; the warnings saying so).
    A split listed twice (calibrating on train) is one entry, its reasons joined."""
    from splitdet.training.run_checks import in_two_splits, shared_images

    figures: dict[str, dict] = {}
    warnings: list[str] = []
    for listing in _merged(listings):
        shared = shared_images(samples, listing.samples, by_id=listing.same_dataset)
        if not shared:
            continue
        figures[listing.name] = {
            "file": str(listing.file), "images": len(shared), "example": shared[0],
        }  # fmt: skip
        held_out = f"evaluated images ({split}.txt)"
        if listing.same_dataset:
            text = in_two_splits(
                _split_path(data, split).parent, shared, len(samples), held_out,
                listing.file.name, listing.why,
            )  # fmt: skip
        else:  # another dataset: `data check` of one tree cannot see it
            text = in_two_splits(
                _split_path(data, split).parent, shared, len(samples), held_out,
                f"{listing.file} (the same image files)", listing.why,
                "calibrate on a split that holds none of them (--calibrate-split, "
                "--calibrate-data), or take them out of one of the two",
            )  # fmt: skip
        warnings.append(text)
    return figures, warnings


def listed_samples(root: Path, split: str) -> list[VocSample]:
    """The `VocSample`s of `split` of the VOC tree `root`, read only to be compared with:
    whatever their classes, image headers unchecked, an id whose annotation cannot be read left
    out (an evaluated split listing it could not be read either), none when the split file
    cannot be read. `data check` and `train` report what is wrong with them."""
    from splitdet.training import voc

    try:
        ids = voc.read_split_lines(root, split)[0]
    except voc.VocError:
        return []
    samples = []
    for image_id in ids:
        try:
            samples.append(voc.read_annotation(root, image_id, check_image=False))
        except voc.VocError:
            continue
    return samples


def _merged(listings: Sequence[SplitListing | None]) -> list[SplitListing]:
    """`listings` without the Nones, those of the same name (train, calibrated on) as one whose
    `why` says both."""
    from dataclasses import replace

    by_name: dict[str, SplitListing] = {}
    for listing in listings:
        if listing is None:
            continue
        first = by_name.get(listing.name)
        by_name[listing.name] = (
            listing
            if first is None
            else replace(first, why=f"{first.why}; it is also {listing.why}")
        )
    return list(by_name.values())
