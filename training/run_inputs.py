"""What a training run trains and validates on: the `VocSample`s of the train split and the
validation subset of the val split (`_read_samples`, `_validation_subset`), read with the
checks and the input scale rank 0 logs, and this process's loaders of the train split
(`_epoch_loaders`).
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler

from splitdet.training.dataset import CropSettings, VocDetection, collate
from splitdet.training.presets import TrainConfig
from splitdet.training.run_checks import (
    also_in_train,
    crowded_images,
    no_validation,
    untrained_classes,
)
from splitdet.training.voc_check_splits import all_difficult_problem

# the lines of `splitdet train`, whichever module says them
log = logging.getLogger("splitdet.training.train")


def _read_samples(
    config: TrainConfig, data_dir: Path, out_dir: Path, rank: int
) -> tuple[list, list]:
    """(train, validation): the `VocSample`s of `data_dir`'s train split and those of its val
    split a validation pass evaluates (`_validation_subset`; none without val.txt or with
    --eval-every 0). Rank 0 logs the inputs and warns of what would mislead the run (`run_checks`).
    Raises VocError (no defective train image, validation images whose every object is
    difficult) and ValueError (an empty train split, validation images with no object)."""
    from splitdet.training import voc
    from splitdet.training.evaluate import DEFAULT_TARGET_RECALL, calibration_shortfall

    mc = config.model
    train_samples = voc.read_split(data_dir, "train", mc.class_names)
    val_samples, all_val = [], []
    if config.eval_every and (data_dir / "ImageSets" / "Main" / "val.txt").is_file():
        all_val = voc.read_split(data_dir, "val", mc.class_names)
        if rank == 0 and (shared := also_in_train(train_samples, all_val, data_dir)):
            log.warning("%s", shared)
        val_samples = _validation_subset(all_val, config.eval_images)
    if not train_samples:
        raise ValueError(f"{data_dir}: the train split is empty")
    _refuse_too_elongated(config, data_dir, train_samples, val_samples)
    if not any(s.is_defective for s in train_samples):
        # as `splitdet data check` reports it; --eval-every 0 trained on such a split to exit 0
        raise voc.VocError(
            f"{data_dir / 'ImageSets' / 'Main' / 'train.txt'}: no defective image, so the "
            "detector and the gate would train without a single defect; list annotated "
            "defective images in it"
        )
    if rank == 0:
        _log_inputs(config, data_dir, train_samples)
        if untrained := untrained_classes(mc.class_names, data_dir, train_samples):
            log.warning("%s", untrained)
        if crowded := crowded_images(mc.box_detections_per_img, train_samples, all_val):
            log.warning("%s", crowded)
        if not val_samples:
            log.warning("%s", no_validation(config, data_dir, out_dir))
        elif shortfall := calibration_shortfall(
            sum(s.is_defective for s in val_samples), DEFAULT_TARGET_RECALL
        ):
            # the cpu preset validates on 60 images: informed, not warned, on every run
            log.info(
                "each validation pass stores its gate threshold in the checkpoint; %s (e.g. "
                "`splitdet eval --data %s --checkpoint %s`, on the whole val split)",
                shortfall, shlex.quote(str(data_dir)), shlex.quote(str(out_dir / "best.pt")),
            )  # fmt: skip
    if val_samples and not any(s.is_defective for s in val_samples):
        # found now, not after the first epoch, whose validation calibrates the gate on them
        raise ValueError(
            f"{data_dir / 'ImageSets' / 'Main' / 'val.txt'}: the validation images hold no "
            "object, so the gate cannot be calibrated; add defective images to val, or "
            "--eval-every 0"
        )
    if val_samples and not any(not o.difficult for s in val_samples for o in s.objects):
        # mAP leaves difficult objects out: no pass would score an epoch, no best.pt be kept
        # (as `splitdet data check` reports it)
        raise voc.VocError(all_difficult_problem(data_dir / "ImageSets" / "Main" / "val.txt"))
    return train_samples, val_samples


def _refuse_too_elongated(config: TrainConfig, data_dir: Path, train: list, val: list) -> None:
    """Raise ValueError naming the train and validation images (`VocSample`s) that the model's
    input would shrink to under 1 px on a side (`voc_check_boxes.too_elongated`): found before
    any training, not as torch's traceback when the epoch meets one."""
    from splitdet.training.voc_check_boxes import refuse_too_elongated

    mc = config.model
    refuse_too_elongated(
        [*train, *val], mc.min_size, mc.max_size, data_dir / "ImageSets" / "Main",
        f"preset {config.name}'s input size (train and val splits)",
    )  # fmt: skip


def _validation_subset(samples: list, n: int | None) -> list:
    """``n`` of the validation split's `VocSample`s spread evenly over it; if that spread
    misses its few defective images, spread over each kind in proportion instead (at least
    one defective)."""
    from splitdet.training import voc

    subset = voc.evenly_spaced(samples, n)
    defective = [s for s in samples if s.is_defective]
    if any(s.is_defective for s in subset) or not defective:
        return subset
    free = [s for s in samples if not s.is_defective]
    n_defective = max(1, round(len(subset) * len(defective) / len(samples)))
    chosen = voc.evenly_spaced(defective, n_defective) + voc.evenly_spaced(
        free, len(subset) - n_defective
    )
    kept = {id(s) for s in chosen}
    return [s for s in samples if id(s) in kept]  # in the split's order


def _log_inputs(config: TrainConfig, data_dir: Path, samples: list) -> None:
    """Log the scale the train split's images (`VocSample`s) are read at by the preset's
    model input, and warn when that scale leaves many boxes too thin to see."""
    from splitdet.training.presets import PRESETS
    from splitdet.training.voc_check import input_scale_text, thin_box_warning

    mc = config.model
    log.info(
        "input size of preset %s (min_size %d, max_size %d): images %s",
        config.name, mc.min_size, mc.max_size,
        input_scale_text(((s.width, s.height) for s in samples), mc.min_size, mc.max_size),
    )  # fmt: skip
    preset = PRESETS.get(config.name)
    if preset is None or (preset.model.min_size, preset.model.max_size) != (
        mc.min_size,
        mc.max_size,
    ):
        return  # a custom recipe: thin_box_warning measures at a preset's input
    warning = thin_box_warning(samples, config.name, data_dir / "ImageSets" / "Main" / "train.txt")
    if warning is not None:
        log.warning("%s", warning)


def _epoch_loaders(
    config: TrainConfig, train_samples: list, world: int, rank: int
) -> dict[str, DataLoader]:
    """This process's loaders of the train split's `VocSample`s: "main", the run's own inputs
    (crops of `config.crop` pixels if it has them), and, with a `whole_image_fraction`, "whole"
    (whole images) for the run's last share."""
    mc = config.model
    crop = CropSettings(config.crop, config.crop_object_fraction) if config.crop else None
    loaders = {  # the run's own images (crops if it has them) and, for its last share, whole ones
        "main": _train_loader(
            VocDetection(
                train_samples, mc.class_names, train=True, crop=crop,
                input_size=(mc.min_size, mc.max_size) if crop else None,
                flips=config.flips, seed=config.seed, pixel_bits=mc.pixel_bits,
            ),
            config.batch_size, config, world, rank,
        ),
    }  # fmt: skip
    if config.whole_image_fraction:
        loaders["whole"] = _train_loader(
            VocDetection(
                train_samples, mc.class_names, train=True, flips=config.flips, seed=config.seed,
                pixel_bits=mc.pixel_bits,
            ),
            config.whole_image_batch_size, config, world, rank,
        )  # fmt: skip
    return loaders


def _train_loader(
    dataset: VocDetection, batch_size: int, config: TrainConfig, world: int, rank: int
) -> DataLoader:
    """This process's shuffled share of `dataset` (a DistributedSampler: one share at world 1).

    Its workers are made anew each epoch (not persistent): a worker holds a copy of the
    dataset taken when it starts, so persistent ones never saw `set_epoch` and gave every
    epoch epoch 0's crops and flips (a run's model then depended on `--workers`, and a
    resumed run differed from one never stopped)."""
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate,
    )
