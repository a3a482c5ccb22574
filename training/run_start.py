"""How a training run starts (torch): resumed from its last.pt (checked against this run's
recipe before the data is read; the model, optimiser, schedule, clock, history and RNG taken
up, this run's --lr and other settings applied from there on) or afresh from --init."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splitdet.shared.checkpoint import (
    CheckpointError,
    read_checkpoint,
    recorded_calibration_source,
    threshold_calibration,
)
from splitdet.shared.config import ModelConfig
from splitdet.training.epoch_records import BestEpoch, epoch_span
from splitdet.training.initial_weights import load_initial_weights
from splitdet.training.presets import PROCESSES_KEY, TrainConfig
from splitdet.training.run_checks import model_difference, recipe_changes
from splitdet.training.schedule import WarmupCosine

if TYPE_CHECKING:
    from splitdet.training.run_state import _Run

# the lines of `splitdet train`, whichever module says them
log = logging.getLogger("splitdet.training.train")


def _resumable_model(
    checkpoint: dict[str, Any], config: TrainConfig, last_path: Path
) -> ModelConfig:
    """The model configuration of `last_path`'s `checkpoint`, which this run's `config` must
    have too but for box_detections_per_img. Raises CheckpointError (unusable) and ValueError
    (another model)."""
    try:
        saved_model = ModelConfig.from_dict(checkpoint["config"])  # as load_model reads it
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{last_path}: its model configuration is unusable ({exc})") from None
    # the most detections per image is inference's alone (no weight depends on it): a
    # resume may change it, so that a run warned of crowded images can raise it
    cap = config.model.box_detections_per_img
    if replace(saved_model, box_detections_per_img=cap) != config.model:
        saved = checkpoint.get("train_config", {}).get("name", "another recipe")
        presets = "" if saved == config.name else f"; preset {saved!r} there, {config.name!r} here"
        raise ValueError(
            f"{last_path} holds a model of another configuration than this run's "
            f"({model_difference(saved_model, config.model)}{presets}); resume it with the "
            "same --preset, --classes, --gate-on and --pixel-bits, or give a new --out"
        )
    return saved_model


def resumed_checkpoint(config: TrainConfig, out_dir: Path, init: str) -> dict[str, Any] | None:
    """The last.pt a --resume continues (None: there is none, the run starts afresh), read
    and checked against this run's `config` before the data is: a model of another
    configuration (`_resumable_model`) or another optimiser or schedule is refused
    (ValueError) as such, not as a class the data holds. --init with a last.pt to resume is
    refused too: the run's own weights would be resumed, and --init ignored."""
    last_path = out_dir / "last.pt"
    if not last_path.is_file():
        return None
    if init != "none":
        raise ValueError(
            f"--init {init} with --resume: {last_path} holds the run to continue, from its own "
            f"weights, so --init would be ignored; drop --init to continue the run, or start "
            f"a new run from those weights with another --out and --init {init}"
        )
    checkpoint = read_checkpoint(last_path)
    _resumable_model(checkpoint, config, last_path)
    saved = checkpoint.get("train_config") or {}
    for key in ("optimizer", "scheduler"):  # their state in last.pt is of the run's own
        if saved.get(key, getattr(config, key)) != getattr(config, key):
            raise ValueError(
                f"{last_path} was trained with {key} {saved[key]!r}, this run's recipe has "
                f"{getattr(config, key)!r}: its state cannot go on under another; resume with "
                f"the run's own --preset, or start a new run from its weights with another "
                f"--out and --init {last_path}"
            )
    return checkpoint


def _best_pt_ahead(run: _Run) -> BestEpoch | None:
    """The best epoch of the run's best.pt when it holds an epoch last.pt does not (the run
    was stopped between the two writes: best.pt is written first, `train._save_epoch_records`),
    else None. Taken as the run's best, the epoch trained again replaces best.pt only when it
    is better: with last.pt's older record, a worse retraining left best.pt holding an epoch
    the run's records and result did not name. Called once `run.start_epoch` is set."""
    path = run.best_path
    if not path.is_file():
        return None
    try:  # (mmap: the record without reading the weights)
        held = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        best = BestEpoch.of_checkpoint(held, held.get("history", []), run.config.best_metric)
    except Exception as exc:  # a damaged best.pt is no reason to refuse the resume
        log.warning("%s: not read (%s); last.pt's record of the best epoch is kept", path, exc)
        return None
    if best.epoch is None or int(best.epoch) < run.start_epoch:
        return None
    log.info(
        "%s holds epoch %d (%s %.4f), which %s does not: the run was stopped between "
        "their writes; epoch %d is trained again and replaces best.pt only if better",
        path.name, best.epoch, best.metric, best.value, run.last_path.name, best.epoch,
    )  # fmt: skip
    return best


def resume_run(run: _Run, checkpoint: dict[str, Any]) -> None:
    """Take `run` up where its last.pt (read: `checkpoint`) left off: model, optimiser,
    schedule, clock, history, best epoch, gate threshold and RNG. This run's recipe applies
    from here on (`_apply_recipe`). Raises CheckpointError (unusable) and ValueError (no epoch
    left)."""
    config, last_path = run.config, run.last_path
    saved_model = ModelConfig.from_dict(checkpoint["config"])  # (`_resumable_model` checked it)
    cap = config.model.box_detections_per_img
    # the optimiser's settings and the schedule as this run's recipe builds them
    fresh_groups = [
        {k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups
    ]
    fresh_schedule = run.lr_scheduler.state_dict() if run.lr_scheduler is not None else None
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.start_epoch = int(checkpoint["epoch"]) + 1
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        problem = f"no {exc} entry" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
        raise CheckpointError(f"{last_path}: cannot resume from it ({problem})") from None
    _apply_recipe(run, checkpoint, fresh_groups, fresh_schedule)
    if saved_model.box_detections_per_img != cap:
        log.info(
            "--detections-per-image %d (the run's was %d): validation passes and the "
            "checkpoints from epoch %d on keep up to %d boxes per image",
            cap, saved_model.box_detections_per_img, int(checkpoint["epoch"]) + 1, cap,
        )  # fmt: skip
    # (a resume onto another path is said by `data_history`, which knows whether its data differ)
    run.clock.seconds = float(checkpoint.get("train_seconds", 0.0))
    run.wall_seconds = float(checkpoint.get("wall_seconds", 0.0))  # (older last.pt: none)
    # a run its budget ended stays ended when resumed with the same budget
    run.epoch_seconds = float(checkpoint.get("epoch_seconds", 0.0))
    run.history = list(checkpoint.get("history", []))
    run.best = _best_pt_ahead(run) or BestEpoch.of_checkpoint(
        checkpoint, run.history, config.best_metric
    )
    run.gate_threshold = float(checkpoint.get("gate_threshold", 0.5))
    run.gate_calibrated = threshold_calibration(checkpoint) is not None
    run.gate_source = recorded_calibration_source(checkpoint)  # (saved again until validation)
    if "rng_state" in checkpoint:
        torch.set_rng_state(checkpoint["rng_state"])
    start_epoch = run.start_epoch
    if start_epoch >= config.epochs:  # before the recipe is rewritten: refused, unchanged
        raise ValueError(
            f"{last_path} holds {start_epoch} trained epoch{'s' if start_epoch != 1 else ''} "
            f"({epoch_span(0, start_epoch - 1)}) "
            f"and this run's --epochs is {config.epochs}: nothing is left to train; give "
            f"--epochs above {start_epoch} to train on"
        )
    log.info(
        "resumed from %s: %s trained, training on from epoch %d (--epochs %d)",
        last_path, epoch_span(0, start_epoch - 1), start_epoch, config.epochs,
    )  # fmt: skip
    saved = checkpoint.get("train_config") or {}
    trained = _trained_lr(checkpoint)
    if run.rank == 0 and trained and trained != config.lr:
        log.warning(
            "--lr %g replaces the run's %g (%s): the learning rate is scaled by %g from epoch %d "
            "on, its schedule going on where it was", config.lr, trained, last_path,
            config.lr / trained, start_epoch,
        )  # fmt: skip
    changes = [recipe_changes(saved, config, leave=("lr",)), processes_change(checkpoint, run)]
    if changed := "; ".join(change for change in changes if change):
        log.info("resumed with settings other than the run's (%s): %s", last_path, changed)


def data_history(
    checkpoint: dict[str, Any] | None, segment: dict[str, Any], last_path: Path
) -> list[dict[str, Any]]:
    """The data every start of a run trained on, oldest first: those the resumed
    `checkpoint` (read from `last_path`; None: a fresh start) records in its "data_history",
    then this start's `segment` (`provenance.training_segment`). A checkpoint of an older
    splitdet, which recorded only its "data" path, gives that path with no digest, epoch or
    version (None): a resume onto other data keeps where the run began. Warns when the
    dataset at the path the run last trained on holds other train data now (its train
    digest changed): best.pt then compares validations of either, as for another path."""
    earlier = list((checkpoint or {}).get("data_history") or [])
    if checkpoint is not None and not earlier and checkpoint.get("data") is not None:
        unknown = dict.fromkeys(segment)  # (every key of a segment: None, but the path)
        earlier = [{**unknown, "path": checkpoint["data"]}]
    last = earlier[-1] if earlier else {}
    was = last.get("train_sha256")
    if last.get("path") not in (None, segment["path"]):  # allowed: a moved or copied dataset
        if was == segment["train_sha256"]:
            log.info(
                "%s was trained on %s, now resumed on %s: the same train data (digest %s)",
                last_path, last["path"], segment["path"], was[:12],
            )  # fmt: skip
        else:  # (best.pt compares validation passes of both)
            log.warning(
                "%s was trained on %s, now resumed on %s: best.pt keeps the best validation "
                "of either",
                last_path, last["path"], segment["path"],
            )  # fmt: skip
    if last.get("path") == segment["path"] and was not in (None, segment["train_sha256"]):
        log.warning(
            "%s: the train split of %s changed since this run's epoch %s started on it "
            "(digest %s then, %s now): best.pt keeps the best validation of either",
            last_path, segment["path"], last.get("started_epoch"), was[:12],
            segment["train_sha256"][:12],
        )  # fmt: skip
    return [*earlier, segment]


def processes_change(checkpoint: dict[str, Any], run: _Run) -> str:
    """The text "processes OLD -> NEW (images per step A -> B)" when `run` trains in another
    number of processes than last.pt's (read: `checkpoint`) recorded; "" when the same, or
    when last.pt records none (a run of an older splitdet)."""
    saved = checkpoint.get(PROCESSES_KEY)
    if saved is None or int(saved) == run.world:
        return ""
    batch = run.config.batch_size
    before = (checkpoint.get("train_config") or {}).get("batch_size", batch)
    return (
        f"processes {int(saved)} -> {run.world} (images per step {int(before) * int(saved)} -> "
        f"{batch * run.world})"
    )


def _trained_lr(checkpoint: dict[str, Any]) -> float | None:
    """The base learning rate last.pt's schedule ran at: its record's lr, but for a run an
    earlier splitdet resumed with another --lr, which it recorded and did not apply. None when
    neither is known."""
    bases = (checkpoint.get("lr_scheduler") or {}).get("base_lrs")
    if bases:
        return float(bases[0])
    lr = (checkpoint.get("train_config") or {}).get("lr")
    return None if lr is None else float(lr)


def _apply_recipe(
    run: _Run,
    checkpoint: dict[str, Any],
    fresh_groups: list[dict[str, Any]],
    fresh_schedule: dict[str, Any] | None,
) -> None:
    """After last.pt's optimiser state is loaded into `run`, make this run's recipe the one
    trained on from here (what train_config.json records): its optimiser settings
    (`fresh_groups`: momentum, weight decay...), its --lr (the learning rate where the schedule
    has it, scaled by the new lr over the run's), and its schedule (`fresh_schedule`: warm-up,
    a new --minutes or --epochs extending it; a new number of iterations per epoch, from
    --batch-size say, re-spreading the cosine's rest over the epochs left)."""
    config, optimizer, lr_scheduler = run.config, run.optimizer, run.lr_scheduler
    trained = _trained_lr(checkpoint)
    ratio = config.lr / trained if trained else 1.0
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        lr = group["lr"]
        group.update(fresh)
        group["lr"] = lr * ratio
    if lr_scheduler is None or not checkpoint.get("lr_scheduler") or fresh_schedule is None:
        return
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if isinstance(lr_scheduler, WarmupCosine):
        for key in ("base_lrs", "warmup_iters", "budget_seconds"):
            setattr(lr_scheduler, key, fresh_schedule[key])
        # the steps done, then this run's steps for each epoch left: the cosine ends with the
        # last epoch (what a fresh run's total is, unless the steps per epoch changed on the
        # way, by --batch-size now or at an earlier resume: else it ends early, or never)
        per_epoch = fresh_schedule["total_iters"] // max(1, config.epochs)
        left = max(0, config.epochs - run.start_epoch)
        lr_scheduler.total_iters = max(1, lr_scheduler.step_count + left * per_epoch)
        lr_scheduler._apply()
    else:  # StepLR: steps from the learning rate the optimiser has
        for key in ("base_lrs", "step_size", "gamma"):
            setattr(lr_scheduler, key, fresh_schedule[key])
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def start_afresh(run: _Run, init: str, resume: bool) -> None:
    """Start `run`'s model from `init` (`load_initial_weights`), logging what it loaded and
    any box-predictor rows it re-mapped; `resume`: a resume found no last.pt (warned). Its
    lines are about the run, not a rank: rank 0 alone says them (`_log_initial_weights`)."""
    if resume and run.rank == 0:
        log.warning("no %s to resume from: starting afresh", run.last_path)
    report = load_initial_weights(run.model, init, progress=run.progress and run.rank == 0)
    if run.rank == 0:
        _log_initial_weights(run, init, report)
        if run.config.name == "paper" and init == "none":
            log.warning(
                "preset paper from random weights: the paper's ResNet50 was pre-trained "
                "(--init imagenet, or --init coco for torchvision's COCO detector)",
                extra={"fields": {"event": "paper_from_scratch"}},
            )
        if run.config.name == "paper" and run.device.type == "cpu":
            log.warning(
                "preset paper on the CPU: a step of %d images at %dx%d px takes about 5 GB of "
                "memory per image (20 GB at 4) and minutes of time; the paper trained on GPUs",
                run.config.batch_size, run.config.model.max_size, run.config.model.min_size,
                extra={"fields": {"event": "paper_on_cpu"}},
            )  # fmt: skip


def _log_initial_weights(run: _Run, init: str, report: dict[str, Any]) -> None:
    """Say what `load_initial_weights` loaded into `run`'s model from `init` (its `report`):
    how many tensors, those a checkpoint of another model left fresh, the rows re-mapped."""
    fresh = report.get("fresh", [])
    if init in ("imagenet", "coco") or (init != "none" and not fresh):
        log.info("init %s: %d tensors loaded, %d kept fresh", init, report["loaded"],
                 report["missing"])  # fmt: skip
    elif init != "none":  # a checkpoint of another model: part of it starts from random weights
        there, here = report.get("preset"), run.config.name
        named = ", ".join(fresh[:4]) + (f" and {len(fresh) - 4} more" if len(fresh) > 4 else "")
        made = (
            "the checkpoint records no preset"
            if there is None
            else f"preset {there!r} there, {here!r} here"
            if there != here
            else f"preset {here!r} there too, with other settings"
        )
        log.warning(
            "init %s: %d tensors loaded, %d kept fresh (random), of shapes the checkpoint has "
            "not (%s): %s; those layers train from scratch", init, report["loaded"],
            report["missing"], made, named,
        )  # fmt: skip
    if "class_rows" in report:  # the checkpoint names its classes in another order or set
        rows = ", ".join(f"{n} <- {s or 'fresh'}" for n, s in report["class_rows"].items())
        log.warning("init %s: box-predictor rows re-mapped by class name: %s", init, rows)
