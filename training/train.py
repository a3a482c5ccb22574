"""Joint multi-task training: detection losses (RPN + ROI) on every image plus the defect loss.

    from splitdet.training.presets import PRESETS
    from splitdet.training.train import train
    train(PRESETS["cpu"], "data/gaskets", "runs/cpu")  # = splitdet train --data ... --out ...

Multi-process (the paper trained on two GPUs): `torchrun --nproc_per_node 2 -m
splitdet.training.cli_train --data D --out R` (gloo on CPU, nccl on GPU). Each process takes
`batch_size` images per step; only rank 0 evaluates and writes checkpoints and metrics.

Outputs in the run folder: `last.pt` (every epoch, resumable), `best.pt` (best validation
`best_metric`, ties broken by mAP@[.5:.95]: `epoch_records.BestEpoch`), `metrics.csv` /
`metrics.json` (one row per epoch), `learning_curve.png`, `train_config.json`.

This module holds the training loop and `train`; how a run starts (resumed, or afresh) is in
`run_start`, the starting weights in `initial_weights`, the optimiser and schedule in
`schedule`, the per-epoch records in `epoch_records` and the checks of the data and the run
before training in `run_checks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.ops import box_iou

from splitdet.shared.atomic_file import WriteError, atomic_write, replacing, stale_temporaries
from splitdet.shared.checkpoint import (
    calibration_source,
    save_checkpoint,
)
from splitdet.shared.folder_lock import folder_lock
from splitdet.shared.model import MultiTaskRCNN, box_iou_min_side
from splitdet.training.dataset import CropSettings, VocDetection, collate
from splitdet.training.epoch_records import (
    BestEpoch,
    describe_best,
    plot_learning_curve,
    write_metrics,
)
from splitdet.training.presets import TrainConfig
from splitdet.training.run_checks import (
    also_in_train,
    crowded_images,
    no_validation,
    untrained_classes,
)
from splitdet.training.run_start import resume_run, resumed_checkpoint, start_afresh
from splitdet.training.schedule import WarmupCosine, build_optimizer, build_scheduler

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

DETECTION_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


# ------------------------------------------------------------------------------- the loop


@dataclass
class TrainClock:
    """Training seconds (evaluation excluded) against an optional budget."""

    seconds: float = 0.0
    budget_seconds: float | None = None

    def exhausted(self, epoch_seconds: float = 0.0) -> bool:
        """True when the budget is spent, or when less than half of an epoch lasting
        `epoch_seconds` is left of it: a run ends on the epoch nearest its budget instead of
        starting one it could run only a few iterations of (which would be validated and
        logged as an epoch of its own)."""
        if self.budget_seconds is None:
            return False
        return self.seconds + epoch_seconds / 2.0 >= self.budget_seconds


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (ranks must stop on the same iteration)."""
    _, world = _world()
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype `train_one_epoch` autocasts to for a `TrainConfig.precision`; None: fp32.

    "auto" picks bfloat16 where the hardware computes it natively (CPUs with AVX512-BF16 or
    AMX, CUDA GPUs from Ampere on): on this project's 2-core AVX512-BF16 machine a cpu-preset
    step takes 0.64 s in bf16 against 1.05 s in fp32. Elsewhere bf16 is emulated and slower.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else None


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device | str = "cpu",
    epoch: int = 0,
    *,
    lr_scheduler: WarmupCosine | None = None,
    clock: TrainClock | None = None,
    defect_loss_weight: float = 1.0,
    clip_grad_norm: float | None = None,
    max_iters: int | None = None,
    progress: bool = True,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """One pass over `loader` (or until the clock's budget or `max_iters`).

    `model` in training mode returns a dict of losses; the step minimises the detection losses
    plus `defect_loss_weight` x loss_defect. `lr_scheduler`, if given, steps every iteration.
    `autocast` (e.g. torch.bfloat16) runs the forward pass under `torch.autocast`; the
    gradients, the optimiser step and the weights stay fp32.
    Returns the mean of every loss over the iterations run, "loss" (the total) and "iters".
    """
    from tqdm import tqdm

    device = torch.device(device)
    clock = clock or TrainClock()
    model.train()
    rank, _ = _world()
    sums: dict[str, float] = {}
    iters = 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}",
        unit="it",
        disable=not progress or rank != 0,
        leave=False,
        dynamic_ncols=True,
        position=1,
    )
    for images, targets in bar:
        if _agree(clock.exhausted() or (max_iters is not None and iters >= max_iters), device):
            break
        start = time.perf_counter()
        images = [img.to(device) for img in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            losses = model(images, targets)
        losses = {key: value.float() for key, value in losses.items()}
        total = sum(v for k, v in losses.items() if k != "loss_defect")
        total = total + defect_loss_weight * losses["loss_defect"]
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"epoch {epoch}, iteration {iters}: loss is {total.item()} "
                f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); lower the lr?"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        clock.seconds += time.perf_counter() - start
        if lr_scheduler is not None:
            lr_scheduler.step(clock.seconds)
        iters += 1
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.item()
        sums["loss"] = sums.get("loss", 0.0) + total.item()
        bar.set_postfix(loss=f"{total.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
        if not progress and rank == 0 and iters % 25 == 0:
            log.info("epoch %d iteration %d: loss %.3f, %.2f s/it, %.1f training min",
                     epoch, iters, total.item(), clock.seconds / max(1, iters) if epoch == 0
                     else time.perf_counter() - start, clock.seconds / 60)  # fmt: skip
    bar.close()
    out = {key: value / max(iters, 1) for key, value in sums.items()}
    out["iters"] = iters
    return out


def configure_training_sampling(model: MultiTaskRCNN, config: TrainConfig) -> None:
    """Training-only sampling sizes of torchvision's RPN and ROI heads (not in the weights)."""
    model.rpn._pre_nms_top_n["training"] = config.rpn_pre_nms_top_n_train
    model.rpn._post_nms_top_n["training"] = config.rpn_post_nms_top_n_train
    model.roi_heads.fg_bg_sampler.batch_size_per_image = config.box_batch_size_per_image
    model.roi_heads.match_min_side = config.match_min_side
    model.rpn.box_similarity = (
        partial(box_iou_min_side, min_side=config.match_min_side)
        if config.match_min_side
        else box_iou
    )
    model.detach_gate = config.detach_gate


def _train_loader(
    dataset: VocDetection, batch_size: int, config: TrainConfig, world: int, rank: int
) -> DataLoader:
    """This process's shuffled share of `dataset` (a DistributedSampler: one share at world 1)."""
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate,
        persistent_workers=config.workers > 0,
    )


def _whole_image_phase(config: TrainConfig, clock: TrainClock, epoch: int) -> bool:
    """Whether the epoch about to start trains on whole images: it starts within the last
    `whole_image_fraction` of the time budget (or, without one, of the epochs)."""
    if not config.whole_image_fraction:
        return False
    rest = 1.0 - config.whole_image_fraction
    if config.budget_seconds:
        return clock.seconds >= rest * config.budget_seconds
    return epoch >= rest * config.epochs


def _set_input_size(model: MultiTaskRCNN, min_size: int, max_size: int) -> None:
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size


# ------------------------------------------------------------------------------- train()


def _setup_distributed() -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


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


def train(
    config: TrainConfig,
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    resume: bool = False,
    init: str = "none",
    progress: bool = True,
    stop_after: int | None = None,
    max_iters: int | None = None,
) -> dict[str, Any]:
    """Train `config` on the VOC tree at `data_dir` (splits train, val), writing to `out_dir`.

    Args:
        resume: continue from `out_dir/last.pt` (model, optimiser, schedule, epoch, RNG, clock).
        init: starting weights when not resuming: none | imagenet | coco | PATH.
        stop_after: end this invocation after so many epochs (a later resume continues).
        max_iters: iterations per epoch at most (tests).

    Returns the last metrics row (plus "out_dir", "train_seconds" and "epochs_run": the epochs
    this call trained). Raises InitError, VocError, CheckpointError, ValueError (among others:
    another run holds `out_dir`), WriteError (a checkpoint or record that cannot be written).
    """
    device = _setup_distributed()
    rank, world = _world()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    with contextlib.ExitStack() as held:
        if rank == 0:  # the only rank that writes there
            # one run per folder for the whole run: two would mix their checkpoints and records
            held.enter_context(folder_lock(out_dir, TRAIN_LOCK, "splitdet train", "--out"))
            _remove_stale_temporaries(out_dir)
        return _train(
            config, data_dir, out_dir, device, rank, world, resume=resume, init=init,
            progress=progress, stop_after=stop_after, max_iters=max_iters,
        )  # fmt: skip


#: The lock file a run holds in its --out while it trains (`folder_lock`).
TRAIN_LOCK = ".splitdet-train.lock"
#: The files a run writes through `atomic_file.replacing`, whose temporary files a killed run
#: leaves behind (".last.pt.k2x9_q0a.tmp", as large as the checkpoint).
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "metrics.csv", "train_config.json")
#: A temporary file younger than this may be another process's write in progress (`splitdet
#: eval --checkpoint OUT/best.pt` storing its threshold): kept, for the next start to remove.
STALE_AFTER_SECONDS = 300.0


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Remove the temporary files of `RUN_FILES` a killed run left in `out_dir` (only that
    naming pattern; none younger than `STALE_AFTER_SECONDS`), logging each."""
    now = time.time()
    for path in stale_temporaries(out_dir, RUN_FILES):
        try:
            info = path.stat()
            if now - info.st_mtime < STALE_AFTER_SECONDS:
                log.info("kept %s: written %.0f s ago, perhaps by a process still writing it",
                         path, now - info.st_mtime)  # fmt: skip
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove the stale temporary file %s (%s)", path, exc.strerror)
            continue
        log.info("removed %s (%d bytes), a temporary file left by a run that was stopped "
                 "while it wrote", path, info.st_size)  # fmt: skip


@dataclass
class _Run:
    """One call of `train`: what it was given, what it trains with, and how far it has come
    (from a resumed run's last.pt, then epoch by epoch)."""

    config: TrainConfig
    data_dir: Path
    out_dir: Path
    device: torch.device
    rank: int
    world: int
    progress: bool
    model: MultiTaskRCNN
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.StepLR | WarmupCosine | None
    per_iteration: bool  # whether lr_scheduler steps every iteration (else every epoch)
    clock: TrainClock
    autocast: torch.dtype | None
    best: BestEpoch  # the epoch best.pt holds
    history: list[dict[str, Any]] = field(default_factory=list)  # a metrics row per epoch
    start_epoch: int = 0
    gate_threshold: float = 0.5
    gate_calibrated: bool = False  # whether gate_threshold came from a validation pass
    # where this call's validation calibrated it (`checkpoint.calibration_source`), else None
    gate_source: dict[str, str] | None = None
    epoch_seconds: float = 0.0  # training seconds of the last epoch (the budget's half-epoch rule)
    epochs_run: int = 0  # epochs this call trained
    # wall-clock seconds of the run's earlier calls (a resumed last.pt's), and the
    # `time.perf_counter()` its wall clock counts from in this call (that many seconds back)
    wall_seconds: float = 0.0
    wall_start: float = 0.0

    @property
    def last_path(self) -> Path:
        """The run's last.pt (every epoch; what --resume reads)."""
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """The run's best.pt (the epoch `best` names)."""
        return self.out_dir / "best.pt"


def _train(
    config: TrainConfig,
    data_dir: Path,
    out_dir: Path,
    device: torch.device,
    rank: int,
    world: int,
    *,
    resume: bool,
    init: str,
    progress: bool,
    stop_after: int | None,
    max_iters: int | None,
) -> dict[str, Any]:
    """`train`'s work, with --out made and locked (rank 0)."""
    _prepare_run_folder(out_dir, resume)
    checkpoint = resumed_checkpoint(config, out_dir, init) if resume else None
    torch.manual_seed(config.seed)
    train_samples, val_samples = _read_samples(config, data_dir, out_dir, rank)
    loaders = _epoch_loaders(config, train_samples, world, rank)
    model = MultiTaskRCNN(config.model).to(device)
    configure_training_sampling(model, config)
    optimizer = build_optimizer(model, config)
    lr_scheduler, per_iteration = build_scheduler(optimizer, config, len(loaders["main"]))
    clock = TrainClock(budget_seconds=config.budget_seconds)
    autocast = autocast_dtype(config.precision, device)
    log.info(
        "training precision: %s (%s); %d torch thread(s) (set by OMP_NUM_THREADS; with other "
        "jobs on the machine, fewer can be faster)", "bf16" if autocast else "fp32",
        config.precision, torch.get_num_threads(),
    )  # fmt: skip
    run = _Run(
        config, data_dir, out_dir, device, rank, world, progress, model, optimizer,
        lr_scheduler, per_iteration, clock, autocast, best=BestEpoch(config.best_metric),
    )  # fmt: skip
    if checkpoint is not None:
        resume_run(run, checkpoint)
    else:
        start_afresh(run, init, resume)
    if rank == 0:  # after the resume check: a refused resume leaves the run as it was
        recipe = json.dumps(config.to_dict(), indent=2) + "\n"
        atomic_write(out_dir / "train_config.json", recipe, fsync=True)  # --resume reads it
    row, ended_by_epochs = _train_epochs(
        run, loaders, val_samples, stop_after=stop_after, max_iters=max_iters
    )
    return _finish(run, row, ended_by_epochs)


def _prepare_run_folder(out_dir: Path, resume: bool) -> None:
    """Ready `out_dir` for a resume or a fresh start: a resume with only best.pt there (a run
    stopped while writing its first checkpoints) goes on from a copy of it as last.pt; a fresh
    start over a run's checkpoints is refused (ValueError), as it would replace them."""
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume and not last_path.is_file() and best_path.is_file():
        # best.pt is written before last.pt: a run stopped between them in its first epoch
        # left only best.pt, which holds that epoch whole (optimizer and all)
        log.warning(
            "no %s to resume from, but %s holds the run's first epoch (the run was stopped "
            "while writing its checkpoints): resuming from a copy of it", last_path, best_path,
        )  # fmt: skip
        with replacing(last_path) as copy:
            shutil.copyfile(best_path, copy)
    if not (resume and last_path.is_file()):
        held = [p.name for p in (last_path, best_path) if p.is_file()]
        if held:  # a fresh start would replace them after its first epoch
            advice = "continue it with --resume, or" if last_path.is_file() else "move it or"
            raise ValueError(
                f"{out_dir} already holds a training run ({', '.join(held)}); {advice} give "
                "another --out"
            )


def _read_samples(
    config: TrainConfig, data_dir: Path, out_dir: Path, rank: int
) -> tuple[list, list]:
    """(train, validation): the `VocSample`s of `data_dir`'s train split and those of its val
    split a validation pass evaluates (`_validation_subset`; none without val.txt or with
    --eval-every 0). Rank 0 logs the inputs and warns of what would mislead the run (`run_checks`).
    Raises VocError (no defective train image) and ValueError (an empty train split, validation
    images with no object)."""
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
    return train_samples, val_samples


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


def _train_epochs(
    run: _Run,
    loaders: dict[str, DataLoader],
    val_samples: list,
    *,
    stop_after: int | None,
    max_iters: int | None,
) -> tuple[dict[str, Any], bool]:
    """Train epoch after epoch from `run.start_epoch` until --epochs, the time budget or
    `stop_after` epochs of this call end it, each validated on `val_samples` when due and
    checkpointed (rank 0). Returns (the last metrics row, whether --epochs ended the run); the
    row is the resumed history's last (or empty) when no epoch was trained."""
    config, clock, device = run.config, run.clock, run.device
    ddp_model: nn.Module = run.model
    if run.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # the run's wall clock goes on from its earlier calls' (last.pt's wall_seconds)
    wall_start = run.wall_start = time.perf_counter() - run.wall_seconds
    row: dict[str, Any] = dict(run.history[-1]) if run.history else {}
    overall = _overall_bar(config, clock, run.start_epoch, enabled=run.progress and run.rank == 0)
    ended_by_epochs = True  # False when the budget or stop_after ended the loop
    for epoch in range(run.start_epoch, config.epochs):
        stop = clock.exhausted(run.epoch_seconds) or (
            stop_after is not None and run.epochs_run >= stop_after
        )
        if _agree(stop, device):
            ended_by_epochs = False
            break
        row = _train_epoch(run, ddp_model, loaders, epoch, wall_start, max_iters)
        final = epoch + 1 >= config.epochs or clock.exhausted(run.epoch_seconds)
        if run.rank == 0 and val_samples and ((epoch + 1) % config.eval_every == 0 or final):
            _validate(run, val_samples, epoch, row)
        run.history.append(row)
        run.epochs_run += 1
        _advance(overall, clock)
        if run.rank == 0:
            _save_epoch_records(run, row, epoch)
    overall.close()
    return row, ended_by_epochs


def _train_epoch(
    run: _Run,
    ddp_model: nn.Module,
    loaders: dict[str, DataLoader],
    epoch: int,
    wall_start: float,
    max_iters: int | None,
) -> dict[str, Any]:
    """Train `epoch` on crops or on whole images, as `_whole_image_phase` has it (rank 0 decides
    for all). Returns its metrics row: mean losses over its iterations, the run's training
    minutes and its wall-clock minutes (since `wall_start`, `time.perf_counter` s: the run's
    start, its earlier calls' wall time included)."""
    config, clock, mc = run.config, run.clock, run.config.model
    # rank 0 decides for all, as for stopping: ranks' clocks differ, and ranks on different
    # loaders would run different step counts and input sizes (a DDP hang)
    whole = _agree(_whole_image_phase(config, clock, epoch), run.device)
    cropped = bool(config.crop) and not whole
    loader = loaders["whole" if whole else "main"]
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    if config.crop:  # crops arrive at the model's input scale; whole images are resized
        _set_input_size(run.model, *((config.crop,) * 2 if cropped else (mc.min_size, mc.max_size)))
    epoch_start = clock.seconds
    stats = train_one_epoch(
        ddp_model,
        run.optimizer,
        loader,
        run.device,
        epoch,
        lr_scheduler=run.lr_scheduler if run.per_iteration else None,
        clock=clock,
        defect_loss_weight=config.defect_loss_weight,
        clip_grad_norm=config.clip_grad_norm,
        max_iters=max_iters,
        progress=run.progress,
        autocast=run.autocast,
    )
    if run.lr_scheduler is not None and not run.per_iteration:
        run.lr_scheduler.step()
    run.epoch_seconds = clock.seconds - epoch_start
    return {
        "epoch": epoch,
        "iters": stats["iters"],
        "train_minutes": round(clock.seconds / 60.0, 3),
        "wall_minutes": round((time.perf_counter() - wall_start) / 60.0, 3),
        "lr": run.optimizer.param_groups[0]["lr"],
        "inputs": "crops" if cropped else "whole images",
        # the first epoch a --resume trained (the learning curve marks it)
        "resumed": run.epochs_run == 0 and run.start_epoch > 0,
        "loss": stats.get("loss"),
        "loss_detection": sum(stats.get(k, 0.0) for k in DETECTION_LOSSES),
        **{k: stats.get(k) for k in (*DETECTION_LOSSES, "loss_defect")},
    }


def _validate(run: _Run, val_samples: list, epoch: int, row: dict[str, Any]) -> None:
    """Evaluate `run.model` on `val_samples` at its whole-image input size (rank 0): the gate
    threshold the pass calibrates becomes the run's, its metrics join `row` as val_*, and the
    epoch's line is logged."""
    from splitdet.training.evaluate import evaluate

    mc = run.config.model
    _set_input_size(run.model, mc.min_size, mc.max_size)
    metrics = evaluate(run.model, val_samples, device=run.device, progress=run.progress)
    run.gate_threshold, run.gate_calibrated = metrics["gate_threshold"], True
    run.gate_source = calibration_source(run.data_dir, "val")  # (`eval` compares it)
    row.update({f"val_{k}": metrics[k] for k in (
        "map", "map50", "ar100", "gate_auc", "gate_threshold", "gate_accuracy",
    )})  # fmt: skip
    log.info(
        "epoch %d: loss %.3f, val mAP %.3f, mAP@.5 %.3f, gate AUC %s (%.1f train min)",
        epoch, row["loss"], metrics["map"] or 0.0, metrics["map50"] or 0.0,
        "n/a" if metrics["gate_auc"] is None else f"{metrics['gate_auc']:.3f}",
        run.clock.seconds / 60,
    )  # fmt: skip


def _save_epoch_records(run: _Run, row: dict[str, Any], epoch: int) -> None:
    """Write what `epoch` (metrics `row`, in the history already) leaves in the run folder
    (rank 0): best.pt if it is the best yet, metrics.json/.csv, learning_curve.png, last.pt."""
    lr_scheduler, best = run.lr_scheduler, run.best
    extra = {
        "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "epoch": epoch,
        "gate_threshold": run.gate_threshold,
        # False: 0.5, no validation pass set it (readers: .get, older ones lack it)
        "gate_calibrated": run.gate_calibrated,
        # where (none: no validation pass in this call, e.g. resumed; `eval` then keeps it)
        **(run.gate_source or {}),
        "train_config": run.config.to_dict(),
        "data": str(run.data_dir.resolve()),
        "train_seconds": run.clock.seconds,
        "wall_seconds": time.perf_counter() - run.wall_start,  # (with this epoch's validation)
        "epoch_seconds": run.epoch_seconds,
        "history": run.history,
        "rng_state": torch.get_rng_state(),
    }
    improved = best.offer(row)
    extra.update(best.to_checkpoint())
    # best.pt, the records, then last.pt: last.pt (what --resume reads) says an epoch is
    # done only once all else holds it. Stopped in between, the epoch is trained again;
    # in the other order a run stopped after last.pt kept a best.pt older than the
    # best_value last.pt records, which no later epoch at that level then replaced.
    if improved:
        _save_epoch(run.best_path, run.model, extra, epoch)
        log.info("%s", describe_best(best.summary()))
    write_metrics(run.out_dir, run.history)
    plot_learning_curve(run.history, run.out_dir / "learning_curve.png")
    _save_epoch(run.last_path, run.model, extra, epoch)


def _finish(run: _Run, row: dict[str, Any], ended_by_epochs: bool) -> dict[str, Any]:
    """`train`'s result: the last metrics `row` and the run's totals. Says when --epochs ended
    a run before its time budget (rank 0), and waits for every rank."""
    config, clock = run.config, run.clock
    if (
        run.rank == 0
        and ended_by_epochs
        and config.budget_seconds
        and not clock.exhausted(run.epoch_seconds)
    ):
        log.info(
            "stopped at --epochs %d after %.1f of its --minutes %g training minutes: a run "
            "ends at whichever comes first; give a larger --epochs to use the whole budget",
            config.epochs, clock.seconds / 60.0, config.minutes,
        )  # fmt: skip
    if run.world > 1:
        dist.barrier()
    return {
        **row, "out_dir": str(run.out_dir), "train_seconds": clock.seconds,
        "epochs_run": run.epochs_run, "best": run.best.summary(),
    }  # fmt: skip


def _save_epoch(path: Path, model: nn.Module, extra: dict, epoch: int) -> None:
    """Save the checkpoint of `epoch` at `path`; a WriteError that says which earlier file is
    kept (a full disk: the earlier checkpoint stays whole)."""
    try:
        save_checkpoint(path, model, **extra)
    except WriteError as exc:
        kept = (
            f"the earlier {path.name} is kept as it was (--resume continues from last.pt once "
            "the cause is fixed)"
            if path.is_file()
            else f"no {path.name} was written"
        )
        message = f"epoch {epoch}: {exc}; {kept}"
        raise WriteError(path, exc.reason, exc.errno, message) from exc


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


def _advance(overall: tqdm, clock: TrainClock) -> None:
    """Move the run's bar to the end of an epoch: by one epoch, or to the training minutes done.
    The last step may end past the budget; the bar's total then grows to it, so the bar ends
    full instead of overshooting (which tqdm warns of, showing a negative time left)."""
    if not clock.budget_seconds:
        overall.update(1)
        return
    done = clock.seconds / 60.0
    overall.total = max(overall.total, done)
    overall.update(done - overall.n)


def _overall_bar(config: TrainConfig, clock: TrainClock, start_epoch: int, enabled: bool) -> tqdm:
    """The whole run's progress bar, with the time left: in training minutes when the run has a
    time budget, else in epochs. Each epoch's own bar runs below it."""
    from tqdm import tqdm

    if clock.budget_seconds:
        total, done, unit = clock.budget_seconds / 60.0, clock.seconds / 60.0, "min"
    else:
        total, done, unit = config.epochs, start_epoch, "epoch"
    fmt = "{l_bar}{bar}| {n:.1f}/{total:.1f} {unit} [{elapsed}<{remaining}]"
    return tqdm(
        total=total, initial=done, unit=unit, desc="training", disable=not enabled,
        bar_format=fmt, dynamic_ncols=True, position=0,
    )  # fmt: skip
