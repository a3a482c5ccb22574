"""Joint multi-task training: detection losses (RPN + ROI) on every image plus the defect loss.

    from splitdet.training.presets import PRESETS
    from splitdet.training.train import train
    train(PRESETS["cpu"], "data/gaskets", "runs/cpu")  # = splitdet train --data ... --out ...

Multi-process (the paper trained on two GPUs): `splitdet train --data D --out R --nproc-per-node
2`, which starts its ranks through torchrun's launcher (`launch`; gloo on CPU, nccl on GPU),
or torchrun running `-m splitdet.training.cli_train` itself. Each process takes
`batch_size` images per step; only rank 0 readies the run folder (the others wait for it
before they read last.pt), evaluates and writes checkpoints and metrics.

Outputs in the run folder: `last.pt` (every epoch, resumable), `best.pt` (best validation
`best_metric`, ties broken by mAP@[.5:.95]: `epoch_records.BestEpoch`), `metrics.csv` /
`metrics.json` (one row per epoch), `learning_curve.png`, `train_config.json`.

This module holds `train` and the run it drives: the run folder (locked, readied), the
epochs in turn, what each leaves in the folder (`_save_epoch_records`) and the progress bar.
How a run starts (resumed, or afresh) is in `run_start`, its state in `run_state`, its data
and loaders in `run_inputs`, an epoch's steps and validation in `train_epoch`, the starting
weights in `initial_weights`, the optimiser and schedule in `schedule`, the per-epoch records
in `epoch_records` and the checks of the data and the run before training in `run_checks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from splitdet.shared.atomic_file import (
    WriteError,
    atomic_write,
    replacing,
    stale_temporaries,
    write_problem,
)
from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.folder_lock import folder_lock
from splitdet.shared.model import MultiTaskRCNN
from splitdet.shared.progress import progress_off
from splitdet.shared.sigterm import stop_behind
from splitdet.training.epoch_records import (
    BestEpoch,
    describe_best,
    plot_learning_curve,
    write_metrics,
)
from splitdet.training.presets import PROCESSES_KEY, TrainConfig
from splitdet.training.provenance import training_segment
from splitdet.training.run_inputs import _epoch_loaders, _read_samples, _validation_subset
from splitdet.training.run_start import (
    data_history,
    resume_run,
    resumed_checkpoint,
    start_afresh,
)
from splitdet.training.run_state import _Run
from splitdet.training.schedule import build_optimizer, build_scheduler
from splitdet.training.train_epoch import (
    TrainClock,
    _agree,
    _train_epoch,
    _validate,
    _world,
    autocast_dtype,
    configure_training_sampling,
    train_one_epoch,
)

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

#: What callers import from here, wherever it is defined. Tests replace `save_checkpoint` and
#: `_save_epoch_records` in this module: they stay in use here (`_save_epoch`, `_train_epochs`).
__all__ = [
    "RUN_FILES",
    "STALE_AFTER_SECONDS",
    "TRAIN_LOCK",
    "TrainClock",
    "_save_epoch_records",
    "_validation_subset",
    "autocast_dtype",
    "configure_training_sampling",
    "save_checkpoint",
    "train",
    "train_one_epoch",
]


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


def train(
    config: TrainConfig,
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    resume: bool = False,
    init: str = "none",
    progress: bool | None = None,
    stop_after: int | None = None,
    max_iters: int | None = None,
) -> dict[str, Any]:
    """Train `config` on the VOC tree at `data_dir` (splits train, val), writing to `out_dir`.

    Args:
        resume: continue from `out_dir/last.pt` (model, optimiser, schedule, epoch, RNG, clock).
        init: starting weights when not resuming: none | imagenet | coco | PATH.
        progress: draw the progress bar on stderr (rank 0); None: only when stderr is a
            terminal (`shared.progress.progress_off`), as `splitdet train` does.
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
            progress=not progress_off() if progress is None else progress,
            stop_after=stop_after, max_iters=max_iters,
        )  # fmt: skip


#: The lock file a run holds in its --out while it trains (`folder_lock`).
TRAIN_LOCK = ".splitdet-train.lock"
#: The files a run writes through `atomic_file.replacing`, whose temporary files a killed run
#: leaves behind (".last.pt.k2x9_q0a.tmp", as large as the checkpoint).
RUN_FILES = (
    "last.pt", "best.pt", "metrics.json", "metrics.csv", "train_config.json", "learning_curve.png"
)  # fmt: skip
#: A temporary file younger than this may be another process's write in progress (`splitdet
#: eval --checkpoint OUT/best.pt` storing its threshold): kept, for the next start to remove.
STALE_AFTER_SECONDS = 300.0

#: learning_curve.png is redrawn after an epoch at most this often (seconds), and as a run
#: ends: drawing it takes about half a second, the whole of a small dataset's epoch.
PLOT_EVERY_S = 30.0


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
    _prepare_run_folder_on_rank_0(out_dir, resume, rank, world)
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
    precision = "bf16" if autocast else "fp32"  # (the recipe's "auto" resolved)
    threads = torch.get_num_threads()  # OMP_NUM_THREADS's, unless the caller set another
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    log.info(
        "training precision: %s (%s); %d torch thread(s) (set by %s; with other jobs on the "
        "machine, fewer can be faster)", precision, config.precision,
        threads, "OMP_NUM_THREADS" if omp == str(threads) else "the caller or torch's default",
    )  # fmt: skip
    run = _Run(
        config, data_dir, out_dir, device, rank, world, progress, model, optimizer,
        lr_scheduler, per_iteration, clock, autocast, best=BestEpoch(config.best_metric),
    )  # fmt: skip
    if checkpoint is not None:
        resume_run(run, checkpoint)
    else:
        start_afresh(run, init, resume)
    records = _provenance(run, checkpoint, train_samples, val_samples, precision)
    if rank == 0:  # after the resume check: a refused resume leaves the run as it was
        # (the processes are not the recipe's: `splitdet train --nproc-per-node` sets them)
        recipe = json.dumps({**config.to_dict(), PROCESSES_KEY: world}, indent=2) + "\n"
        atomic_write(out_dir / "train_config.json", recipe, fsync=True)  # --resume reads it
    row, ended_by_epochs = _train_epochs(
        run, loaders, val_samples, stop_after=stop_after, max_iters=max_iters, records=records
    )
    return _finish(run, row, ended_by_epochs)


def _provenance(
    run: _Run,
    checkpoint: dict[str, Any] | None,
    train_samples: list,
    val_samples: list,
    precision: str,
) -> dict[str, Any]:
    """What ties `run`'s checkpoints and metrics rows to the code and data they came from
    (rank 0; {} on the others, which write neither): {"splitdet": the version,
    "precision_used": `precision` ("bf16" | "fp32"), "data_history": the data each start of
    the run trained on (`run_start.data_history`: the resumed `checkpoint`'s, then this
    start's `provenance.training_segment` of `train_samples` and `val_samples`)}."""
    if run.rank != 0:
        return {}
    segment = training_segment(run.data_dir, train_samples, val_samples, run.start_epoch, precision)
    return {
        "splitdet": segment["splitdet"],
        "precision_used": precision,
        "data_history": data_history(checkpoint, segment, run.last_path),
    }


def _prepare_run_folder_on_rank_0(out_dir: Path, resume: bool, rank: int, world: int) -> None:
    """`_prepare_run_folder` by rank 0 alone, the only rank that writes into `out_dir` (and
    holds its lock), before any rank reads last.pt: the others wait for it (a broadcast of its
    outcome). When it fails, rank 0 raises its error and the others a ValueError of its message,
    so that each rank says a refused start as it says a problem of the data."""
    if world == 1:
        _prepare_run_folder(out_dir, resume)
        return
    outcome: list[str | None] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            _prepare_run_folder(out_dir, resume)
        except Exception as exc:  # said by every rank, raised as it was by rank 0
            failure, outcome[0] = exc, str(exc)
    dist.broadcast_object_list(outcome, src=0)  # (the others wait here for rank 0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise ValueError(outcome[0])


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
        try:
            with replacing(last_path, fsync=True) as copy:
                shutil.copyfile(best_path, copy)
        except OSError as exc:  # (shutil's error names best.pt, the file it read, not last.pt)
            raise WriteError(
                last_path, write_problem(last_path, exc), exc.errno,
                f"{last_path}: cannot write it, the copy of {best_path} to resume from "
                f"({write_problem(last_path, exc)}); {best_path} is kept as it was: --resume "
                "again once the cause is fixed",
            ) from None  # fmt: skip
    if not (resume and last_path.is_file()):
        held = [p.name for p in (last_path, best_path) if p.is_file()]
        if held:  # a fresh start would replace them after its first epoch
            advice = "continue it with --resume, or" if last_path.is_file() else "move it or"
            raise ValueError(
                f"{out_dir} already holds a training run ({', '.join(held)}); {advice} give "
                "another --out"
            )


def _train_epochs(
    run: _Run,
    loaders: dict[str, DataLoader],
    val_samples: list,
    *,
    stop_after: int | None,
    max_iters: int | None,
    records: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Train epoch after epoch from `run.start_epoch` until --epochs, the time budget or
    `stop_after` epochs of this call end it, each validated on `val_samples` when due and
    checkpointed (rank 0) with `records` (`_provenance`), whose version, precision and train
    data digest each metrics row holds too ("splitdet", "precision_used", "train_sha256").
    Returns (the last metrics row, whether --epochs ended the run); the
    row is the resumed history's last (or empty) when no epoch was trained."""
    config, clock, device = run.config, run.clock, run.device
    ddp_model: nn.Module = run.model
    if run.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # the run's wall clock goes on from its earlier calls' (last.pt's wall_seconds)
    wall_start = run.wall_start = time.perf_counter() - run.wall_seconds
    run.recorded_rows = run.plotted_rows = len(run.history)  # (a resumed run's, drawn already)
    row: dict[str, Any] = dict(run.history[-1]) if run.history else {}
    overall = _overall_bar(config, clock, run.start_epoch, enabled=run.progress and run.rank == 0)
    ended_by_epochs = True  # False when the budget or stop_after ended the loop
    try:
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
            elif run.rank == 0:  # (a validated epoch's line is `_validate`'s)
                _log_unvalidated_epoch(run, row, epoch, bool(val_samples))
            row.update(_row_provenance(records))
            run.history.append(row)
            run.epochs_run += 1
            _advance(overall, clock)
            if run.rank == 0:
                _save_epoch_records(run, row, epoch, records)
    except BaseException:  # stopped (Ctrl-C, SIGTERM, an error): the curve shows metrics.json
        _catch_up_plot(run, quiet=True)
        raise
    overall.close()
    _catch_up_plot(run)
    return row, ended_by_epochs


def _log_unvalidated_epoch(run: _Run, row: dict[str, Any], epoch: int, validates: bool) -> None:
    """The line of an epoch no validation pass followed (rank 0), as `_validate` logs a
    validated one: its loss and training minutes, and when the next validation comes
    (`validates`: the run has validation images; else it has none, e.g. --eval-every 0).
    Without it an epoch between --eval-every's passes left nothing in the log."""
    every = run.config.eval_every
    if validates and every:
        due = (epoch // every + 1) * every - 1  # (the run's last epoch is validated too)
        when = f"--eval-every {every}: the next validation follows epoch "
        when += str(min(due, run.config.epochs - 1))
    else:
        when = "this run validates nothing"
    loss = row.get("loss")
    log.info(
        "epoch %d: loss %s, not validated (%s) (%.1f train min)",
        epoch, "n/a" if loss is None else f"{loss:.3f}", when, run.clock.seconds / 60,
    )  # fmt: skip


def _row_provenance(records: dict[str, Any] | None) -> dict[str, Any]:
    """What a metrics row records of `records` (`_provenance`): the version, the precision and
    the digest of the train split this start of the run trains on ({} without records)."""
    if not records:
        return {}
    return {
        "splitdet": records["splitdet"],
        "precision_used": records["precision_used"],
        "train_sha256": records["data_history"][-1]["train_sha256"],
    }


def _save_epoch_records(
    run: _Run, row: dict[str, Any], epoch: int, records: dict[str, Any] | None = None
) -> None:
    """Write what `epoch` (metrics `row`, in the history already) leaves in the run folder
    (rank 0): best.pt if it is the best yet, metrics.json/.csv, learning_curve.png, last.pt;
    the checkpoints with `records` (`_provenance`: "splitdet", "precision_used",
    "data_history")."""
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
        PROCESSES_KEY: run.world,  # (images per step: batch_size times this)
        "data": str(run.data_dir.resolve()),  # (this start's: all of them in data_history)
        **(records or {}),
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
    run.recorded_rows = len(run.history)
    _save_epoch(run.last_path, run.model, extra, epoch)
    # the plot last, and never the run's end: it cost the epoch just trained when it failed
    if run.plotted_at is None or time.perf_counter() - run.plotted_at >= PLOT_EVERY_S:
        _catch_up_plot(run, quiet=True)


def _plot(run: _Run) -> None:
    """Draw learning_curve.png from the epochs metrics.json holds (rank 0)."""
    plot_learning_curve(run.history[: run.recorded_rows], run.out_dir / "learning_curve.png")
    run.plotted_rows, run.plotted_at = run.recorded_rows, time.perf_counter()


def _catch_up_plot(run: _Run, *, quiet: bool = False) -> None:
    """Redraw learning_curve.png if epochs were recorded since it was drawn (rank 0), after an
    epoch or as a run ends; `quiet`: a failure is logged, not raised (after an epoch: the next
    tries again; or the run is ending on another error)."""
    if run.rank != 0 or run.plotted_rows >= run.recorded_rows:
        return
    try:
        _plot(run)
    except Exception as error:
        stop = stop_behind(error)  # (SIGTERM or Ctrl-C while matplotlib's extensions load)
        if stop is not None:
            raise stop from None
        if not quiet:
            raise
        log.warning("learning_curve.png not redrawn: %s", error)


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
            + (  # (no last.pt yet: the run's best.pt is this epoch's, which a resume copies)
                f"; {path.parent / 'best.pt'} holds the epoch: --resume continues from it once "
                "the cause is fixed"
                if path.name == "last.pt" and (path.parent / "best.pt").is_file()
                else ""
            )
        )
        message = f"epoch {epoch}: {exc}; {kept}"
        raise WriteError(path, exc.reason, exc.errno, message) from exc


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
