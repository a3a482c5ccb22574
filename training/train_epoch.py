"""One epoch of a training run: its steps (`train_one_epoch`: the losses, the optimiser step,
against a `TrainClock` and in the precision `autocast_dtype` picks, ranks stopping together by
`_agree`), the training-only sampling sizes the model steps with (`configure_training_sampling`),
the run's epoch on crops or whole images (`_train_epoch`, `_whole_image_phase`) and its
validation pass (`_validate`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from splitdet.shared.checkpoint import calibration_source
from splitdet.shared.model import MultiTaskRCNN, box_iou_min_side
from splitdet.shared.sigterm import raise_if_stopped
from splitdet.training.presets import TrainConfig
from splitdet.training.schedule import WarmupCosine

if TYPE_CHECKING:
    from splitdet.training.run_state import _Run

# the lines of `splitdet train`, whichever module says them
log = logging.getLogger("splitdet.training.train")

DETECTION_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


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
    Returns the mean of every loss over the iterations run, "loss" (the total), "iters" and
    "budget_cut": whether the clock's budget ended the pass before `loader` did (rank 0's
    clock: the epoch then ran fewer iterations than a full one).
    """
    from tqdm import tqdm

    device = torch.device(device)
    clock = clock or TrainClock()
    model.train()
    rank, _ = _world()
    sums: dict[str, float] = {}
    iters = 0
    budget_cut = False
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
        raise_if_stopped()  # (a SIGTERM something caught on the way: see its docstring)
        spent = clock.exhausted()
        if _agree(spent or (max_iters is not None and iters >= max_iters), device):
            budget_cut = spent
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
    out["budget_cut"] = budget_cut
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
        # metrics.json only (`epoch_records.JSON_ONLY`: metrics.csv keeps its columns): the
        # time budget ended the epoch early; and the run folder, preset and dataset folder the
        # curve names
        "budget_cut": bool(stats.get("budget_cut", False)),
        "run": run.out_dir.resolve().name,
        "preset": config.name,
        "data": run.data_dir.resolve().name,
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
    if not run.progress:  # (no bar: a log file's reader learns why the next line is late)
        log.info("epoch %d: validating on %d image(s)", epoch, len(val_samples))
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
