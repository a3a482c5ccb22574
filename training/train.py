"""Joint multi-task training: detection losses (RPN + ROI) on every image plus the defect loss.

    from splitdet.training.presets import PRESETS
    from splitdet.training.train import train
    train(PRESETS["cpu"], "data/gaskets", "runs/cpu")  # = splitdet train --data ... --out ...

Multi-process (the paper trained on two GPUs): `torchrun --nproc_per_node 2 -m
splitdet.training.cli_train --data D --out R` (gloo on CPU, nccl on GPU). Each process takes
`batch_size` images per step; only rank 0 evaluates and writes checkpoints and metrics.

Outputs in the run folder: `last.pt` (every epoch, resumable), `best.pt` (best validation
`best_metric`, ties broken by mAP@[.5:.95]: `BestEpoch`), `metrics.csv` / `metrics.json` (one
row per epoch), `learning_curve.png`, `train_config.json`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
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
    CheckpointError,
    read_checkpoint,
    save_checkpoint,
    threshold_calibration,
    why_unreadable,
)
from splitdet.shared.config import ModelConfig
from splitdet.shared.folder_lock import folder_lock
from splitdet.shared.model import MultiTaskRCNN, box_iou_min_side
from splitdet.training.dataset import CropSettings, VocDetection, collate
from splitdet.training.presets import TrainConfig

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum
    from tqdm import tqdm

log = logging.getLogger(__name__)

DETECTION_LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class InitError(RuntimeError):
    """Starting weights that cannot be had; the message says what to do instead."""


# ------------------------------------------------------------------------------ starting weights


def _hub_hint(weights: WeightsEnum) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"could not fetch {weights} from {weights.url}. Offline? Download that file elsewhere and "
        f"place it, named {Path(weights.url).name}, in {hub}/ (the torch hub cache, $TORCH_HOME), "
        "or pass --init PATH with a torchvision state dict or a splitdet checkpoint."
    )


def _fetch(weights: WeightsEnum, progress: bool) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=progress)
    except Exception as exc:  # URLError, HTTPError, socket errors, hash mismatch...
        raise InitError(f"{_hub_hint(weights)} ({type(exc).__name__}: {exc})") from exc


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """Copy every tensor of `state` whose key (after `prefix`) and shape fit; report the rest."""
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        name = prefix + key
        if name in own and own[name].shape == value.shape:
            loaded[name] = value
        else:
            skipped.append(key)
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped": skipped, "missing": len(own) - len(loaded)}


#: Box-predictor tensors with one row (cls_score) or four (bbox_pred) per class, background
#: (index 0) first: a checkpoint's rows belong to its own class_names, in its own order.
CLASS_ROWS = {
    "roi_heads.box_predictor.cls_score.weight": 1,
    "roi_heads.box_predictor.cls_score.bias": 1,
    "roi_heads.box_predictor.bbox_pred.weight": 4,
    "roi_heads.box_predictor.bbox_pred.bias": 4,
}


def _checkpoint_class_names(checkpoint: object) -> tuple[str, ...] | None:
    """The class_names a splitdet checkpoint was trained with (None for a plain state dict)."""
    if not isinstance(checkpoint, dict):
        return None
    names = checkpoint.get("class_names")
    if names is None and isinstance(checkpoint.get("config"), dict):
        names = checkpoint["config"].get("class_names")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _remap_class_rows(
    state: dict[str, torch.Tensor], saved_names: tuple[str, ...], model: MultiTaskRCNN
) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """`state` with its class-specific box-predictor rows moved to `model`'s class order.

    Rows are matched by class name: a class of the model the checkpoint also has gets that
    class's rows (cls_score [C+1, D]: one row; bbox_pred [4(C+1), D]: four), background
    keeps row 0, and a class new to the model keeps the model's fresh rows. Without this, a
    checkpoint of the same class count in another order would load with its labels swapped.
    Tensors whose shape is not the checkpoint's C+1 classes are left as they are (then skipped
    as not fitting). Returns (state, {model class: checkpoint class or None (fresh)}).
    """
    own = model.state_dict()
    names = tuple(model.config.class_names)
    source = [0] + [saved_names.index(n) + 1 if n in saved_names else None for n in names]
    state = dict(state)
    for key, per_class in CLASS_ROWS.items():
        old, fresh = state.get(key), own.get(key)
        if old is None or fresh is None or old.shape[1:] != fresh.shape[1:]:
            continue
        if len(old) != per_class * (len(saved_names) + 1):
            continue
        # [(C+1) * per_class, ...] -> [C+1, per_class, ...]: one block of rows per class
        old_rows = old.reshape(len(saved_names) + 1, per_class, *old.shape[1:])
        new_rows = fresh.clone().reshape(len(names) + 1, per_class, *fresh.shape[1:])
        for row, src in enumerate(source):
            if src is not None:
                new_rows[row] = old_rows[src]
        state[key] = new_rows.reshape(fresh.shape)
    return state, {n: n if n in saved_names else None for n in names}


def _init_fits(init: str, config: ModelConfig) -> bool:
    """Whether `--init imagenet|coco` can start a model of `config`: ImageNet's ResNets carry
    BatchNorm statistics (norm batch or frozen, any depth); COCO's Faster R-CNN is a
    ResNet50-FPN with BatchNorm."""
    if config.norm == "group":
        return False
    return init == "imagenet" or config.depth == 50


def _init_refusal(init: str, config: ModelConfig) -> str:
    """Why `--init imagenet|coco` cannot start a model of `config`, and what on the command
    line can: the presets whose models it fits, and what every other preset's model is."""
    from splitdet.training.presets import PRESETS

    need = {
        "imagenet": "ImageNet weights carry BatchNorm statistics, so they need a model with norm "
        "batch or frozen",
        "coco": "COCO weights are a Faster R-CNN ResNet50-FPN with BatchNorm, so they need depth "
        "50 with norm batch or frozen",
    }[init]

    def model(name: str) -> str:
        return f"{name} (depth {PRESETS[name].model.depth}, norm {PRESETS[name].model.norm})"

    fits = [name for name, preset in PRESETS.items() if _init_fits(init, preset.model)]
    others = [name for name in PRESETS if name not in fits]
    use = " or ".join(f"--preset {model(name)}" for name in fits) or "a preset that fits"
    return (
        f"--init {init}: {need}, and this model has depth {config.depth} with norm "
        f"{config.norm}; train with {use}, as no option sets norm or depth; "
        f"{', '.join(map(model, others))} train from scratch (--init none) or from a splitdet "
        "checkpoint of the same preset (--init PATH)"
    )


def load_initial_weights(model: MultiTaskRCNN, init: str, progress: bool = True) -> dict:
    """Start `model` from `init`: "none", "imagenet" (torchvision's ImageNet ResNet of the
    model's depth, backbone body only), "coco" (torchvision's COCO Faster R-CNN ResNet50-FPN; the
    class-specific box predictor is skipped) or a path (splitdet checkpoint or torchvision state
    dict). Tensors whose shape does not fit are skipped and counted. A splitdet checkpoint of
    other class_names (another order, other classes) has its box-predictor rows re-mapped by
    class name (`_remap_class_rows`; the report's "class_rows" says which class came from
    where). Raises InitError."""
    from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    config = model.config
    if init == "none":
        return {"loaded": 0, "skipped": [], "missing": len(model.state_dict())}
    if init in ("imagenet", "coco") and not _init_fits(init, config):
        raise InitError(_init_refusal(init, config))
    if init == "imagenet":
        weights = {18: ResNet18_Weights, 34: ResNet34_Weights, 50: ResNet50_Weights}[config.depth]
        state = _fetch(weights.IMAGENET1K_V1, progress)
        return _load_matching(model, state, prefix="backbone.body.")
    if init == "coco":
        state = _fetch(FasterRCNN_ResNet50_FPN_Weights.COCO_V1, progress)
        state = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor.")}
        return _load_matching(model, state)
    path = Path(init)
    if not path.is_file():
        raise InitError(f"--init {init!r}: not imagenet, coco, none, nor an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own message runs to lines, or is just a byte's value
        why = why_unreadable(path, exc)
        raise InitError(f"--init {path}: not a readable checkpoint or state dict ({why})") from exc
    saved_names = _checkpoint_class_names(state)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InitError(f"{path}: expected a state dict")
    remapped = None
    if saved_names is not None and saved_names != tuple(model.config.class_names):
        state, remapped = _remap_class_rows(state, saved_names, model)
    report = _load_matching(model, state)
    if remapped is not None:
        report["class_rows"] = remapped
    if report["loaded"] == 0:
        raise InitError(f"{path}: no tensor fits this model's configuration")
    return report


# --------------------------------------------------------------------------- optimiser, schedule


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norm weights and biases (torchvision's reference)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
        del name
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


class WarmupCosine:
    """Per-iteration learning rate: linear warm-up from lr/10, then a cosine to 0.

    Progress is the larger of iterations done / `total_iters` and training seconds /
    `budget_seconds`, so a time-budgeted run anneals fully by its deadline whatever the speed
    of the machine. Has `state_dict`/`load_state_dict` like torch's schedulers.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_iters: int,
        warmup_iters: int = 0,
        budget_seconds: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.total_iters = max(1, total_iters)
        self.warmup_iters = warmup_iters
        self.budget_seconds = budget_seconds
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self.seconds = 0.0
        self._apply()

    def progress(self) -> float:
        """How far the schedule has run, in [0, 1]: the larger of the iterations' fraction and
        the time budget's."""
        p = self.step_count / self.total_iters
        if self.budget_seconds:
            p = max(p, self.seconds / self.budget_seconds)
        return min(p, 1.0)

    def factor(self) -> float:
        """The learning-rate multiplier now: cosine over `progress`, ramped up from 0.1 during
        the warmup iterations."""
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress()))
        if self.step_count < self.warmup_iters:
            cosine *= 0.1 + 0.9 * self.step_count / self.warmup_iters
        return cosine

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor()

    def step(self, seconds: float | None = None) -> None:
        """One iteration done; `seconds`: the run's training seconds so far (for the budget)."""
        self.step_count += 1
        if seconds is not None:
            self.seconds = seconds
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, for a checkpoint."""
        return {
            "total_iters": self.total_iters,
            "warmup_iters": self.warmup_iters,
            "budget_seconds": self.budget_seconds,
            "base_lrs": list(self.base_lrs),
            "step_count": self.step_count,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up the schedule where `state` (a `state_dict`) left it."""
        self.__dict__.update({k: state[k] for k in self.state_dict()})
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, iters_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.StepLR | WarmupCosine | None, bool]:
    """(scheduler, per_iteration): StepLR per epoch, WarmupCosine per iteration, or none."""
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma), False
    if config.scheduler == "cosine":
        total = config.epochs * iters_per_epoch
        return WarmupCosine(optimizer, total, config.warmup_iters, config.budget_seconds), True
    return None, False


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


#: Validation metrics (`evaluate`'s keys) as logs and messages name them.
METRIC_NAMES = {
    "map50": "mAP@.5", "map": "mAP@[.5:.95]", "ar100": "AR@100", "gate_auc": "gate AUC",
    "gate_accuracy": "gate accuracy",
}  # fmt: skip
#: Values of the metric best.pt is chosen on this close count as equal (the same mean summed
#: in another order): the tie-break decides between them.
TIE_TOLERANCE = 1e-9


@dataclass
class BestEpoch:
    """The validated epoch best.pt holds: the highest `metric` (`TrainConfig.best_metric`);
    among epochs equal on it, the highest `tie_metric`. A small validation split saturates
    mAP@.5 at 1.0 while the boxes go on tightening (mAP@[.5:.95] 0.19 -> 0.66): on mAP@.5
    alone best.pt kept the first, loosest epoch to reach 1.0. A later epoch replaces the
    best only when strictly better on the two in turn, so a full tie keeps the earlier."""

    metric: str
    epoch: int | None = None
    value: float = -math.inf
    tie_value: float = -math.inf

    @property
    def tie_metric(self) -> str:
        """The metric that breaks ties: mAP@[.5:.95], or mAP@.5 when `metric` is that."""
        return "map50" if self.metric == "map" else "map"

    def offer(self, row: dict[str, Any]) -> bool:
        """Take the epoch of metrics `row` as the best if it is better; True when it is (a row
        without the metric, not validated, is not)."""
        value = row.get(f"val_{self.metric}")
        if value is None or math.isnan(value):
            return False
        tie = row.get(f"val_{self.tie_metric}")
        tie = -math.inf if tie is None or math.isnan(tie) else float(tie)
        better = value > self.value + TIE_TOLERANCE or (
            abs(value - self.value) <= TIE_TOLERANCE and tie > self.tie_value
        )
        if better:
            self.epoch, self.value, self.tie_value = int(row["epoch"]), float(value), tie
        return better

    def to_checkpoint(self) -> dict[str, Any]:
        """The entries a checkpoint keeps of it ("best_value" as before; the epoch and the
        tie-break's value since ties are broken)."""
        return {
            "best_value": self.value, "best_epoch": self.epoch, "best_tie_value": self.tie_value,
        }  # fmt: skip

    @classmethod
    def of_checkpoint(
        cls, checkpoint: dict[str, Any], history: list[dict[str, Any]], metric: str
    ) -> BestEpoch:
        """The best a resumed run's last.pt records. One written before ties were broken
        records only "best_value": its best.pt holds the first epoch of `history` that
        reached it (a strictly greater value replaced it, an equal one did not)."""
        best = cls(metric, value=float(checkpoint.get("best_value", -math.inf)))
        if "best_epoch" in checkpoint:
            best.epoch = checkpoint["best_epoch"]
            best.tie_value = float(checkpoint.get("best_tie_value", -math.inf))
            return best
        for row in history:
            if row.get(f"val_{metric}") == best.value:
                best.epoch = int(row["epoch"])
                tie = row.get(f"val_{best.tie_metric}")
                best.tie_value = -math.inf if tie is None else float(tie)
                break
        return best

    def summary(self) -> dict[str, Any] | None:
        """What best.pt holds, for the run's result (None: no validated epoch)."""
        if self.epoch is None:
            return None
        tie = None if math.isinf(self.tie_value) else self.tie_value
        return {
            "epoch": self.epoch, "metric": self.metric, "value": self.value,
            "tie_metric": self.tie_metric, "tie_value": tie,
        }  # fmt: skip


def describe_best(best: dict[str, Any]) -> str:
    """What a `BestEpoch.summary` says, as a clause: "best.pt holds epoch 9 (val mAP@.5 1.000,
    mAP@[.5:.95] 0.658: ...)"."""
    name = METRIC_NAMES.get(best["metric"], best["metric"])
    tie_name = METRIC_NAMES.get(best["tie_metric"], best["tie_metric"])
    tie = "n/a" if best["tie_value"] is None else f"{best['tie_value']:.3f}"
    return (
        f"best.pt holds epoch {best['epoch']} (val {name} {best['value']:.3f}, {tie_name} {tie}: "
        f"the highest {name}, ties broken by {tie_name})"
    )


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


# ------------------------------------------------------------------------------- records


def write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.json (a list of rows) and metrics.csv (the union of columns)."""
    atomic_write(out_dir / "metrics.json", (json.dumps(history, indent=2) + "\n").encode())
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out_dir / "metrics.csv", table.getvalue().encode())


def plot_learning_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and mAP against epoch, like the paper's Fig. 3.

    The paper compares plain Faster R-CNN with the multi-task model; one run trains only the
    multi-task model, so the plot shows its detection loss (what a plain Faster R-CNN would
    minimise) beside its total multi-task loss, and its mAP / mAP@.5 / gate AUC.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [row["loss"] for row in history], label="multi-task loss (total)")
    ax_loss.plot(epochs, [row["loss_detection"] for row in history], label="detection losses")
    ax_loss.plot(epochs, [row["loss_defect"] for row in history], label="defect loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    evaluated = [row for row in history if row.get("val_map50") is not None]
    for key, label in (
        ("val_map", "mAP@[.5:.95]"),
        ("val_map50", "mAP@.5"),
        ("val_gate_auc", "gate AUC"),
    ):
        points = [(row["epoch"], row[key]) for row in evaluated if row.get(key) is not None]
        if points:
            ax_map.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("validation")
    ax_map.set_ylim(0, 1)
    if evaluated:
        ax_map.legend()
    else:
        ax_map.text(0.5, 0.5, "no validation passes", ha="center", transform=ax_map.transAxes)
    if history:
        minutes = history[-1].get("train_minutes") or 0.0
        fig.suptitle(f"multi-task model, {len(history)} epochs, {minutes:.1f} training minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def _also_in_train(train: list, val: list, data_dir: Path) -> str | None:
    """The warning for validation images (`VocSample`s) that the train split lists too, by id
    or image file; None when there are none."""
    seen = {s.image_id for s in train} | {s.image_path.resolve() for s in train}
    shared = [s.image_id for s in val if s.image_id in seen or s.image_path.resolve() in seen]
    if not shared:
        return None
    return (
        f"{data_dir / 'ImageSets' / 'Main'}: {len(shared)} of the {len(val)} validation images "
        f"are in train.txt too (e.g. {shared[0]!r}): validation, best.pt and the gate "
        "threshold it calibrates then judge on images the model trains on, and read better "
        "than the model is; `splitdet data check` lists them, `splitdet data split "
        "--overwrite` writes disjoint splits"
    )


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
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"--out {out_dir}: cannot make the folder ({exc})") from None
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
    from splitdet.training import voc
    from splitdet.training.evaluate import (
        DEFAULT_TARGET_RECALL,
        calibration_shortfall,
        evaluate,
    )

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
    torch.manual_seed(config.seed)

    mc = config.model
    train_samples = voc.read_split(data_dir, "train", mc.class_names)
    val_samples, all_val = [], []
    if config.eval_every and (data_dir / "ImageSets" / "Main" / "val.txt").is_file():
        all_val = voc.read_split(data_dir, "val", mc.class_names)
        if rank == 0 and (shared := _also_in_train(train_samples, all_val, data_dir)):
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
        if untrained := _untrained_classes(mc.class_names, data_dir, train_samples):
            log.warning("%s", untrained)
        if crowded := _crowded_images(mc.box_detections_per_img, train_samples, all_val):
            log.warning("%s", crowded)
        if not val_samples:
            log.warning("%s", _no_validation(config, data_dir, out_dir))
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

    model = MultiTaskRCNN(mc).to(device)
    configure_training_sampling(model, config)
    optimizer = build_optimizer(model, config)
    lr_scheduler, per_iteration = build_scheduler(optimizer, config, len(loaders["main"]))
    clock = TrainClock(budget_seconds=config.budget_seconds)
    autocast = autocast_dtype(config.precision, device)
    log.info("training precision: %s (%s)", "bf16" if autocast else "fp32", config.precision)

    history: list[dict[str, Any]] = []
    start_epoch, gate_threshold = 0, 0.5
    best = BestEpoch(config.best_metric)  # the epoch best.pt holds
    gate_calibrated = False  # whether gate_threshold came from a validation pass
    epoch_seconds = 0.0  # training seconds of the last epoch (the budget's half-epoch rule)
    if resume and last_path.is_file():
        checkpoint = read_checkpoint(last_path)
        try:
            saved_model = ModelConfig.from_dict(checkpoint["config"])  # as load_model reads it
        except (ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{last_path}: its model configuration is unusable ({exc})"
            ) from None
        # the most detections per image is inference's alone (no weight depends on it): a
        # resume may change it, so that a run warned of crowded images can raise it
        cap = mc.box_detections_per_img
        if replace(saved_model, box_detections_per_img=cap) != config.model:
            saved = checkpoint.get("train_config", {}).get("name", "another recipe")
            presets = (
                "" if saved == config.name else f"; preset {saved!r} there, {config.name!r} here"
            )
            raise ValueError(
                f"{last_path} holds a model of another configuration than this run's "
                f"({_model_difference(saved_model, config.model)}{presets}); resume it with the "
                "same --preset, --classes, --gate-on and --pixel-bits, or give a new --out"
            )
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            start_epoch = int(checkpoint["epoch"]) + 1
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            problem = f"no {exc} entry" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
            raise CheckpointError(f"{last_path}: cannot resume from it ({problem})") from None
        if lr_scheduler is not None and checkpoint.get("lr_scheduler"):
            fresh = lr_scheduler.state_dict()
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if isinstance(lr_scheduler, WarmupCosine):  # a new --minutes/--epochs extends it
                lr_scheduler.budget_seconds = fresh["budget_seconds"]
                lr_scheduler.total_iters = fresh["total_iters"]
                lr_scheduler._apply()
        if saved_model.box_detections_per_img != cap:
            log.info(
                "--detections-per-image %d (the run's was %d): validation passes and the "
                "checkpoints from epoch %d on keep up to %d boxes per image",
                cap, saved_model.box_detections_per_img, int(checkpoint["epoch"]) + 1, cap,
            )  # fmt: skip
        trained_on = checkpoint.get("data")
        if trained_on is not None and trained_on != str(data_dir.resolve()):
            # allowed (a moved dataset), but best.pt compares validation passes of both
            log.warning(
                "%s was trained on %s, now resumed on %s: best.pt keeps the best validation "
                "of either",
                last_path, trained_on, data_dir.resolve(),
            )  # fmt: skip
        clock.seconds = float(checkpoint.get("train_seconds", 0.0))
        # a run its budget ended stays ended when resumed with the same budget
        epoch_seconds = float(checkpoint.get("epoch_seconds", 0.0))
        history = list(checkpoint.get("history", []))
        best = BestEpoch.of_checkpoint(checkpoint, history, config.best_metric)
        gate_threshold = float(checkpoint.get("gate_threshold", 0.5))
        gate_calibrated = threshold_calibration(checkpoint) is not None
        if "rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["rng_state"])
        if start_epoch >= config.epochs:  # before the recipe is rewritten: refused, unchanged
            raise ValueError(
                f"{last_path} holds {start_epoch} trained epochs (epochs 0-{start_epoch - 1}) "
                f"and this run's --epochs is {config.epochs}: nothing is left to train; give "
                f"--epochs above {start_epoch} to train on"
            )
        log.info(
            "resumed from %s: epochs 0-%d trained, training on from epoch %d (--epochs %d)",
            last_path, start_epoch - 1, start_epoch, config.epochs,
        )  # fmt: skip
    else:
        if resume:
            log.warning("no %s to resume from: starting afresh", last_path)
        report = load_initial_weights(model, init, progress=progress and rank == 0)
        if init != "none":
            log.info("init %s: %d tensors loaded, %d kept fresh", init, report["loaded"],
                     report["missing"])  # fmt: skip
        if "class_rows" in report:  # the checkpoint names its classes in another order or set
            rows = ", ".join(f"{n} <- {s or 'fresh'}" for n, s in report["class_rows"].items())
            log.warning("init %s: box-predictor rows re-mapped by class name: %s", init, rows)

    if rank == 0:  # after the resume check: a refused resume leaves the run as it was
        recipe = json.dumps(config.to_dict(), indent=2) + "\n"
        atomic_write(out_dir / "train_config.json", recipe, fsync=True)  # --resume reads it

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    wall_start = time.perf_counter()
    row: dict[str, Any] = dict(history[-1]) if history else {}
    overall = _overall_bar(config, clock, start_epoch, enabled=progress and rank == 0)
    ended_by_epochs = True  # False when the budget or stop_after ended the loop
    epochs_run = 0  # epochs this call trained
    for epoch in range(start_epoch, config.epochs):
        stop = clock.exhausted(epoch_seconds) or (
            stop_after is not None and epochs_run >= stop_after
        )
        if _agree(stop, device):
            ended_by_epochs = False
            break
        # rank 0 decides for all, as for stopping: ranks' clocks differ, and ranks on different
        # loaders would run different step counts and input sizes (a DDP hang)
        whole = _agree(_whole_image_phase(config, clock, epoch), device)
        cropped = bool(config.crop) and not whole
        loader = loaders["whole" if whole else "main"]
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        if config.crop:  # crops arrive at the model's input scale; whole images are resized
            _set_input_size(model, *((config.crop,) * 2 if cropped else (mc.min_size, mc.max_size)))
        epoch_start = clock.seconds
        stats = train_one_epoch(
            ddp_model,
            optimizer,
            loader,
            device,
            epoch,
            lr_scheduler=lr_scheduler if per_iteration else None,
            clock=clock,
            defect_loss_weight=config.defect_loss_weight,
            clip_grad_norm=config.clip_grad_norm,
            max_iters=max_iters,
            progress=progress,
            autocast=autocast,
        )
        if lr_scheduler is not None and not per_iteration:
            lr_scheduler.step()
        epoch_seconds = clock.seconds - epoch_start
        final = epoch + 1 >= config.epochs or clock.exhausted(epoch_seconds)
        row = {
            "epoch": epoch,
            "iters": stats["iters"],
            "train_minutes": round(clock.seconds / 60.0, 3),
            "wall_minutes": round((time.perf_counter() - wall_start) / 60.0, 3),
            "lr": optimizer.param_groups[0]["lr"],
            "inputs": "crops" if cropped else "whole images",
            "loss": stats.get("loss"),
            "loss_detection": sum(stats.get(k, 0.0) for k in DETECTION_LOSSES),
            **{k: stats.get(k) for k in (*DETECTION_LOSSES, "loss_defect")},
        }
        if rank == 0 and val_samples and ((epoch + 1) % config.eval_every == 0 or final):
            _set_input_size(model, mc.min_size, mc.max_size)
            metrics = evaluate(model, val_samples, device=device, progress=progress)
            gate_threshold, gate_calibrated = metrics["gate_threshold"], True
            row.update({f"val_{k}": metrics[k] for k in (
                "map", "map50", "ar100", "gate_auc", "gate_threshold", "gate_accuracy",
            )})  # fmt: skip
            log.info(
                "epoch %d: loss %.3f, val mAP %.3f, mAP@.5 %.3f, gate AUC %s (%.1f train min)",
                epoch, row["loss"], metrics["map"] or 0.0, metrics["map50"] or 0.0,
                "n/a" if metrics["gate_auc"] is None else f"{metrics['gate_auc']:.3f}",
                clock.seconds / 60,
            )  # fmt: skip
        history.append(row)
        epochs_run += 1
        _advance(overall, clock)
        if rank == 0:
            extra = {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                "epoch": epoch,
                "gate_threshold": gate_threshold,
                # False: 0.5, no validation pass set it (readers: .get, older ones lack it)
                "gate_calibrated": gate_calibrated,
                "train_config": config.to_dict(),
                "data": str(data_dir.resolve()),
                "train_seconds": clock.seconds,
                "epoch_seconds": epoch_seconds,
                "history": history,
                "rng_state": torch.get_rng_state(),
            }
            improved = best.offer(row)
            extra.update(best.to_checkpoint())
            # best.pt, the records, then last.pt: last.pt (what --resume reads) says an epoch is
            # done only once all else holds it. Stopped in between, the epoch is trained again;
            # in the other order a run stopped after last.pt kept a best.pt older than the
            # best_value last.pt records, which no later epoch at that level then replaced.
            if improved:
                _save_epoch(best_path, model, extra, epoch)
                log.info("%s", describe_best(best.summary()))
            write_metrics(out_dir, history)
            plot_learning_curve(history, out_dir / "learning_curve.png")
            _save_epoch(last_path, model, extra, epoch)
    overall.close()
    if (
        rank == 0
        and ended_by_epochs
        and config.budget_seconds
        and not clock.exhausted(epoch_seconds)
    ):
        log.info(
            "stopped at --epochs %d after %.1f of its --minutes %g training minutes: a run "
            "ends at whichever comes first; give a larger --epochs to use the whole budget",
            config.epochs, clock.seconds / 60.0, config.minutes,
        )  # fmt: skip
    if world > 1:
        dist.barrier()
    return {
        **row, "out_dir": str(out_dir), "train_seconds": clock.seconds, "epochs_run": epochs_run,
        "best": best.summary(),
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


def _untrained_classes(class_names: Sequence[str], data_dir: Path, samples: list) -> str | None:
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


def _crowded_images(cap: int, train: list, val: list) -> str | None:
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


def _no_validation(config: TrainConfig, data_dir: Path, out_dir: Path) -> str:
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


def _model_difference(saved: ModelConfig, wanted: ModelConfig) -> str:
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
