"""The checks `train` makes of its data and its run before it trains, each returning the text
of a warning or a refusal (None: nothing to say): validation images the train split lists too
(`shared_images` and `in_two_splits`, which `eval` words its own overlaps with),
classes with no box to train on, images holding more objects than the model returns, why a run
validates nothing, and how a resumed run's model configuration and training settings differ
from this run's.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from splitdet.shared.config import ModelConfig
from splitdet.training.presets import TrainConfig

#: What to do about images listed in two splits of one dataset (`in_two_splits`' `fix`).
DISJOINT_SPLITS = (
    "`splitdet data check` lists them, `splitdet data split --overwrite` writes disjoint splits"
)


def also_in_train(train: list, val: list, data_dir: Path) -> str | None:
    """The warning for validation images (`VocSample`s) that the train split lists too, by id
    or image file (`shared_images`); None when there are none."""
    shared = shared_images(val, train)
    if not shared:
        return None
    return in_two_splits(
        data_dir / "ImageSets" / "Main", shared, len(val), "validation images", "train.txt",
        "validation, best.pt and the gate threshold it calibrates then judge on images the "
        "model trains on, and read better than the model is",
    )  # fmt: skip


def shared_images(held_out: Sequence, listed: Sequence, *, by_id: bool = True) -> list[str]:
    """The ids of the `held_out` `VocSample`s that `listed` holds too, in order: by image file
    (`_file_identity`: a symbolic or hard link to it is the same file) and, with `by_id`, by id. An
    id names the same annotation only within one dataset: compare two datasets' splits with
    `by_id` False."""
    seen: set[object] = {_file_identity(s.image_path) for s in listed}
    if by_id:
        seen |= {s.image_id for s in listed}
    return [
        s.image_id for s in held_out
        if _file_identity(s.image_path) in seen or (by_id and s.image_id in seen)
    ]  # fmt: skip


def _file_identity(path: Path) -> object:
    """What tells two paths of one image file apart from two files: its device and inode (a
    symbolic or hard link to it, as `data merge` makes, is the same file), else, when it
    cannot be stat'ed, its resolved path."""
    try:
        info = path.stat()
    except OSError:
        return path.resolve()
    return (info.st_dev, info.st_ino)


def in_two_splits(
    where: Path,
    shared: Sequence[str],
    total: int,
    held_out: str,
    listing: str,
    why: str,
    fix: str = DISJOINT_SPLITS,
) -> str:
    """The warning that `shared` (ids, one at least) of the `total` `held_out` images
    ("validation images") are in `listing` ("train.txt") too: `why` that misleads and the
    `fix`, after `where` (the folder or file the problem is in)."""
    return (
        f"{where}: {len(shared)} of the {total} {held_out} are in {listing} too (e.g. "
        f"{shared[0]!r}): {why}; {fix}"
    )


def untrained_classes(class_names: Sequence[str], data_dir: Path, samples: list) -> str | None:
    """The warning naming the classes of ``class_names`` that the train split's `VocSample`s
    hold no box to train on of (`voc_check.untrained_class_warning`); only then are all the
    dataset's annotations read, to tell those it holds nowhere. None when every class has one."""
    from splitdet.training.voc_check import class_boxes, trained_boxes, untrained_class_warning

    trained = trained_boxes(samples)
    if all(trained.get(name) for name in class_names):
        return None
    in_dataset, partly_read = class_boxes(data_dir)
    train_file = data_dir / "ImageSets" / "Main" / "train.txt"
    return untrained_class_warning(
        class_names, trained, in_dataset, train_file, partly_read=partly_read
    )


def crowded_images(cap: int, train: list, val: list) -> str | None:
    """The warning for train and val images (`VocSample`s) holding more objects than the model
    returns per image (`ModelConfig.box_detections_per_img`): their recall is capped, in
    validation as in deployment, without a word. Names the images with the most. None when
    there are none."""
    from splitdet.shared.config import MAX_DETECTIONS_PER_IMG

    splits: dict[str, list[str]] = {}  # image id -> the splits listing it (train = val, often)
    counts: dict[str, int] = {}
    for split, samples in (("train", train), ("val", val)):
        for sample in samples:
            if len(sample.objects) > cap:
                counts[sample.image_id] = len(sample.objects)
                splits.setdefault(sample.image_id, []).append(split)
    if not counts:
        return None
    most = max(counts.values())
    top = [image_id for image_id, n in counts.items() if n == most]
    named = ", ".join(f"{image_id!r} ({' and '.join(splits[image_id])})" for image_id in top[:3])
    more = f" and {len(top) - 3} more" if len(top) > 3 else ""
    wanted = min(most, MAX_DETECTIONS_PER_IMG)
    return (
        f"{len(counts)} image(s) hold more objects than the model returns per image "
        f"(box_detections_per_img {cap}); the most, {most}, in {named}{more}: "
        f"validation, eval and deployment find at most {cap} of them, so their recall is "
        f"capped; train with --detections-per-image {wanted}"
        + ("" if wanted == most else f" (the most allowed; {most} objects are still more)")
    )


def no_validation(config: TrainConfig, data_dir: Path, out_dir: Path) -> str:
    """Why this run validates nothing, what it lacks for it, and how to get it."""
    val = data_dir / "ImageSets" / "Main" / "val.txt"
    data, last = shlex.quote(str(data_dir)), shlex.quote(str(out_dir / "last.pt"))
    split = (
        f"give the dataset a val split with defective images (`splitdet data split {data} "
        "--val 0.2`, --overwrite to redo existing splits) and train again"
    )
    if not config.eval_every:
        why, fix = "--eval-every 0", "train with --eval-every 1 or more"
    elif not val.is_file():
        why, fix = f"no {val}; `splitdet data split --val 0` writes none", split
    else:
        why, fix = f"{val} lists no image", split
    return (
        f"no validation split ({why}): this run keeps no best.pt (only last.pt) and its gate "
        f"threshold stays the uncalibrated 0.5; {fix}, or calibrate the gate afterwards: "
        f"`splitdet eval --data {data} --checkpoint {last} "
        "--calibrate-split SPLIT` (a split with defective images that the run never saw; "
        "--calibrate-data DIR for one in another dataset)"
    )


def model_difference(saved: ModelConfig, wanted: ModelConfig) -> str:
    """The settings in which two model configurations differ, "NAME A there, B here" each,
    separated by "; ". A setting an option of `splitdet train` sets is named as that option,
    with its value as typed ("--gate-on P3 there, P5 here", not the FPN keys "1" and "3"), and
    comes first; the others (set by the preset alone) by their `ModelConfig` field."""
    from splitdet.training.cli_train import GATE_LEVELS  # torch-free, no cycle: stdlib + presets

    gate_names = {level: name for name, level in GATE_LEVELS.items()}
    options: dict[str, tuple[str, Callable[[Any], str]]] = {  # field -> (option, as typed)
        "class_names": ("--classes", lambda names: shlex.quote(",".join(names))),
        "gate_level": ("--gate-on", lambda level: gate_names.get(level, level)),
        "pixel_bits": ("--pixel-bits", str),
        "box_detections_per_img": ("--detections-per-image", str),
    }
    there, here = asdict(saved), asdict(wanted)  # every field, LATER_FIELDS too
    keys = sorted(
        (k for k in there.keys() | here.keys() if there.get(k) != here.get(k)),
        key=lambda k: (k not in options, k),
    )
    parts = []
    for key in keys:
        if key in options:
            option, typed = options[key]
            parts.append(f"{option} {typed(there[key])} there, {typed(here[key])} here")
        else:
            parts.append(f"{key} {there.get(key)!r} there, {here.get(key)!r} here")
    return "; ".join(parts)


def recipe_changes(saved: dict[str, Any], config: TrainConfig, leave: Sequence[str] = ()) -> str:
    """The training settings (not the model's, nor the recipe's name) in which a resumed run's
    `config` differs from the recipe its last.pt records (`saved`, `TrainConfig.to_dict`),
    "NAME OLD -> NEW" each, separated by "; " ("" when none); `leave`: fields not to name. A
    setting `saved` lacks (a checkpoint older than it) is not named."""
    here = config.to_dict()
    keys = sorted(
        k for k in saved.keys() & here.keys()
        if k not in ("name", "model", *leave) and saved[k] != here[k]
    )  # fmt: skip
    return "; ".join(f"{k} {saved[k]!r} -> {here[k]!r}" for k in keys)
