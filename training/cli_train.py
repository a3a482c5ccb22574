"""`splitdet train`: joint multi-task training on a VOC dataset.

    splitdet train --data data/gaskets --out runs/cpu --preset cpu
    splitdet train --data data/gaskets --out runs/cpu --resume          # continue last.pt
    splitdet train --data D --out R --preset paper --nproc-per-node 2   # DDP, 2 GPUs
    torchrun --nnodes 2 ... -m splitdet.training.cli_train --data D --out R  # several machines

Top-level imports are stdlib and the torch-free presets: torch loads when the command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from splitdet.shared.cli import add_pixel_bits_option
from splitdet.shared.sigterm import Terminated, sigterm_as_interrupt
from splitdet.shared.spec import POOL_LEVEL, PYRAMID_LEVELS
from splitdet.training.presets import PRECISIONS, PRESETS, TrainConfig

#: This process's parent as it started (read as this module is, before any option is parsed:
#: a parent that dies after is told by `os.getppid()` differing from it; `_launcher_pid`).
_PARENT_AT_START = os.getppid()

#: `--gate-on` names -> `ModelConfig.gate_level`: torchvision's FPN keys "0".."3" are P2..P5.
GATE_LEVELS = {f"P{n + 2}": name for n, name in enumerate(PYRAMID_LEVELS)}
GATE_LEVELS[POOL_LEVEL] = POOL_LEVEL

#: `ModelConfig` fields -> the option that sets each (errors of the model's own checks name
#: the field: they are told by the option).
MODEL_OPTIONS = {
    "class_names": "--classes",
    "gate_level": "--gate-on",
    "pixel_bits": "--pixel-bits",
    "box_detections_per_img": "--detections-per-image",
}
#: Exit status of a run stopped by SIGTERM: 128 + 15, as the signal's default action gives.
SIGTERM_STATUS = 143
#: Exit status of a run stopped by Ctrl-C (SIGINT): 128 + 2.
CTRL_C_STATUS = 130
#: Exit status of a rank whose run stopped because another rank's process ended.
PEER_LOST_STATUS = 1

EXAMPLE = """example:
  splitdet synth --out data/gaskets --size 612x512
  splitdet train --data data/gaskets --out runs/cpu --preset cpu --minutes 30
  splitdet train --data data/gaskets --out runs/cpu --resume --minutes 60   # extend the budget
  splitdet train --data data/gaskets --out runs/p --preset paper --init coco --nproc-per-node 2

exit status: 0 trained; 2 a problem with the data, the options or the run folder; 130 Ctrl-C,
143 SIGTERM (either way last.pt holds the last finished epoch: continue with --resume)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `train`'s options to `parser` (the subcommand's, and `main`'s for torchrun)."""
    parser.add_argument(
        "--data",
        required=True,
        help="VOC tree with ImageSets/Main/train.txt (val.txt for validation)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="run folder: last.pt, best.pt (the highest val mAP@.5; ties: mAP@[.5:.95]), "
        "metrics.csv/json, learning_curve.png",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="training recipe (default: cpu, 30 minutes from scratch on a CPU; cpu-r50: the "
        "benchmark's ResNet50-FPN, 2 hours on 2448x2048 images at half scale; with --resume: "
        "the run's own recipe, from OUT/train_config.json, also when this names the preset it "
        "started from; another preset replaces it, with a warning, keeping the run's classes "
        "unless --classes is given)",
    )
    parser.add_argument(
        "--init",
        default="none",
        help="starting weights: none | imagenet | coco | PATH (a splitdet checkpoint or a "
        "torchvision state dict); imagenet/coco download through torchvision's hub cache and "
        "need a BatchNorm model: --preset "
        + " or ".join(name for name, preset in PRESETS.items() if preset.model.norm != "group")
        + " (the other presets use GroupNorm and train from scratch); with --resume only while "
        "OUT holds no last.pt yet (the run then starts afresh from it), refused once it does",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument(
        "--minutes",
        type=float,
        help="training-time budget in minutes (evaluation excluded); the run ends at "
        "whichever comes first, --minutes or --epochs (the preset's: "
        + ", ".join(f"{name} {preset.epochs}" for name, preset in PRESETS.items())
        + "), so raise --epochs too for a longer run; 0: no budget, the run is fixed by "
        "--epochs: the same steps on any machine",
    )
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=int, help="images per step and process")
    parser.add_argument("--lr", type=float, help="base learning rate")
    parser.add_argument(
        "--crop",
        type=int,
        help="square training crops, px at the model's input scale, a multiple of 32; 0: whole "
        "images (default: the preset's; cpu: 256)",
    )
    parser.add_argument(
        "--crop-object-fraction",
        type=float,
        help="share of a defective image's crops centred on one of its objects, 0-1; the others "
        "fall anywhere (default: the preset's, 0.6; 0.3 learned far slower on synthetic data)",
    )
    parser.add_argument(
        "--whole-image-fraction",
        type=float,
        help="last share of the run (of --minutes, else of --epochs) trained on whole images "
        "instead of crops, 0 to below 1, so that GroupNorm meets the statistics inference sees "
        "(default: the preset's; 0: crops to the end)",
    )
    parser.add_argument(
        "--gate-on",
        choices=tuple(GATE_LEVELS),
        help="FPN map the defect gate reads (default: the preset's; cpu: P3, paper: P5, the "
        "deepest). A finer map tells short scratches from texture better but leaves less of the "
        "FPN to compute lazily: P2 leaves none",
    )
    add_pixel_bits_option(parser, default=None)
    parser.add_argument(
        "--detections-per-image",
        type=int,
        metavar="N",
        help="most boxes the model returns per image, 1-1000 (default: a resumed run's, else "
        "the preset's, 100); an image with more objects has its recall capped at N (train "
        "warns of such images in train and val); kept in the checkpoint, so eval and export "
        "use it",
    )
    parser.add_argument("--workers", type=int, help="DataLoader worker processes")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="training arithmetic: bf16 autocast or fp32; auto = bf16 where the processor has "
        "it natively (default: the preset's; cpu: auto, paper: fp32)",
    )
    parser.add_argument(
        "--eval-every", type=int, help="epochs between validation passes (0: never)"
    )
    parser.add_argument(
        "--classes", help="comma-separated class names (default: the preset's, 'scratch')"
    )
    parser.add_argument("--seed", type=int, help="seed of initialisation and augmentation")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (none either when stderr is not a terminal: a log then gets a "
        "line every 25 steps)",
    )
    parser.add_argument("--json", action="store_true", help="print the final metrics row as JSON")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (DDP, started through torchrun's launcher): "
        "one per GPU; without a GPU, gloo on the CPU, each process with its share of the cores. "
        "--batch-size is per process (default: 1; under torchrun, torchrun's own count)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "train",
        help="train the multi-task detector on a VOC dataset",
        description="Joint multi-task training: detection losses on every image (defect-free "
        "ones as negatives) plus the defect gate's loss. Writes resumable checkpoints.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _base_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe the command line's changes apply to: with --resume the run's own (from
    OUT/train_config.json), also when --preset restates the preset it was made from (the run's
    own changes, its --epochs say, stay: a preset named again is no new recipe); a --preset of
    another name replaces it, but for the run's class names and detections per image, which
    are the data's (a warning, rank 0's alone, names what changes; a model of another
    configuration is refused when the checkpoint is read, before the data is). Without
    --resume: --preset, default cpu."""
    import dataclasses
    import json
    import logging
    from pathlib import Path

    from splitdet.shared.cli import CommandError
    from splitdet.training.presets import PROCESSES_KEY

    saved = Path(args.out) / "train_config.json"
    if not args.resume or not saved.is_file():
        return PRESETS[args.preset or "cpu"]
    try:
        recorded = json.loads(saved.read_text())
        if isinstance(recorded, dict):  # the run's processes, beside the recipe (`train`)
            recorded.pop(PROCESSES_KEY, None)
        own = TrainConfig.from_dict(recorded)
    except (OSError, ValueError, TypeError) as exc:
        raise CommandError(f"{saved}: not a readable training config ({exc})") from exc
    if args.preset is None or args.preset == own.name:
        return own
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, model=dataclasses.replace(
        preset.model, class_names=own.model.class_names,
        box_detections_per_img=own.model.box_detections_per_img,
    ))  # fmt: skip
    changed = _recipe_difference(own, preset)
    if os.environ.get("RANK", "0") != "0":  # (about the run, not a rank: rank 0 says it)
        return preset
    logging.getLogger(__name__).warning(
        "--resume --preset %s: the run's recipe (%s, %s) is replaced by preset %s's%s",
        args.preset, own.name, saved, args.preset, f" ({changed})" if changed else "",
    )  # fmt: skip
    return preset


def _recipe_difference(there: TrainConfig, here: TrainConfig) -> str:
    """The training settings (not the model's) in which two recipes differ, "NAME A there, B
    here" each; the name aside."""
    a, b = there.to_dict(), here.to_dict()
    keys = sorted(
        k for k in a.keys() | b.keys() if k not in ("name", "model") and a.get(k) != b.get(k)
    )
    return "; ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} here" for k in keys)


def _stderr_is_terminal() -> bool:
    """Whether progress bars would reach a person: stderr open and a terminal."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (ValueError, OSError):  # closed
        return False


def run(args: argparse.Namespace) -> int:
    """Train the recipe the options describe into `args.out`; returns 0 (CommandError on a
    problem with the data, the options or the run folder)."""
    import dataclasses
    import logging
    import os

    from splitdet.shared.cli import CommandError, class_names, refuse_closed_stdout
    from splitdet.shared.parent_death import PARENT_PID_ENV
    from splitdet.shared.strict_json import strict_dumps
    from splitdet.training.epoch_records import describe_best, epoch_span

    if args.json:  # (`>&-`: the run's result it was asked for would be lost after training)
        refuse_closed_stdout("--json prints the run's result there")
    if "RANK" not in os.environ and args.nproc_per_node != 1:
        if args.nproc_per_node < 1:
            raise CommandError(f"--nproc-per-node {args.nproc_per_node}: give 1 or more")
        from splitdet.training.launch import train_processes

        def said(how: str, since: float | None) -> str | None:
            if since is not None and not _holds_checkpoint(args, since):
                return None
            return _stopped_on_sigterm(args, how, processes=args.nproc_per_node)

        return train_processes(args.command_argv, args.nproc_per_node, said)
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world and args.nproc_per_node not in (1, int(local_world)):
        raise CommandError(
            f"--nproc-per-node {args.nproc_per_node}: this run is one of the {local_world} "
            "processes torchrun started on this machine; give the count to torchrun alone"
        )
    rank = os.environ.get("RANK", "0")  # torchrun's process; the others' lines are rank 0's
    if rank != "0":
        root = logging.getLogger()
        root.setLevel(max(root.getEffectiveLevel(), logging.WARNING))
    config = _base_config(args)
    # flags named as the TrainConfig fields they override
    changes = {
        field: getattr(args, field)
        for field in (
            "minutes", "epochs", "batch_size", "lr", "workers", "eval_every", "seed",
            "precision", "crop_object_fraction", "whole_image_fraction",
        )
        if getattr(args, field) is not None
    }  # fmt: skip
    if args.crop is not None:
        changes["crop"] = args.crop or None
    model_changes = {}
    if args.classes is not None:
        try:
            model_changes["class_names"] = class_names(args.classes)
        except ValueError as exc:
            raise CommandError(f"--classes {args.classes!r}: {exc}") from None
        if not model_changes["class_names"]:
            raise CommandError(
                f"--classes {args.classes!r}: names no class; give at least one foreground "
                "class name (e.g. --classes scratch)"
            )
    if args.gate_on:
        model_changes["gate_level"] = GATE_LEVELS[args.gate_on]
    if args.pixel_bits is not None:
        model_changes["pixel_bits"] = args.pixel_bits
    if args.detections_per_image is not None:
        model_changes["box_detections_per_img"] = args.detections_per_image
    try:
        if model_changes:
            changes["model"] = dataclasses.replace(config.model, **model_changes)
        config = dataclasses.replace(config, **changes)
    except ValueError as exc:  # the recipe's own check names its fields: name the options
        message = _one_line(exc)
        options = {field: f"--{field.replace('_', '-')}" for field in changes if field != "model"}
        options.update({field: MODEL_OPTIONS[field] for field in model_changes})
        for field, option in options.items():
            message = re.sub(rf"\b{field}\b", option, message)
        raise CommandError(message) from None

    # the ranks `splitdet train --nproc-per-node` started leave the line to it: it alone knows
    # whether the user stopped the run or a rank's end made it stop the others
    launched = PARENT_PID_ENV in os.environ

    def stopped(status: int, how: str = "stopped on SIGTERM", fresh: str = START_AGAIN) -> int:
        if rank == "0" and not launched:  # (torchrun signals every rank: one line says it)
            print(_stopped_on_sigterm(args, how, fresh_start=fresh), file=sys.stderr)
        return status

    try:
        with sigterm_as_interrupt() as terminated:
            row = _train(config, args)
    except Terminated:
        return stopped(SIGTERM_STATUS)
    except KeyboardInterrupt:  # Ctrl-C: the same line, said of an interruption
        return stopped(CTRL_C_STATUS, "interrupted")
    except Exception as exc:
        if terminated:
            # unwinding from SIGTERM, the run failed otherwise: a DataLoader worker the same
            # SIGTERM ended (a container's stop signals every process), a DDP peer gone
            return stopped(SIGTERM_STATUS)
        if _peer_lost(exc):  # (the launcher names the process that ended, and how)
            return stopped(PEER_LOST_STATUS, PEER_ENDED, PEER_ENDED_START_AGAIN)
        raise
    best = f"; {describe_best(row['best'])}" if row.get("best") else ""
    if rank != "0":  # rank 0 prints the run's result
        return 0
    if args.json:
        from splitdet.edge.cli_predict import json_text  # (names: as `predict --json`'s)

        print(strict_dumps(json_text(row), indent=2))
    elif not row.get("epochs_run") and row.get("epoch") is not None:  # resumed, none to train
        print(f"trained no further epoch: the run's {row['train_seconds'] / 60:.1f} training "
              f"minutes reach its --minutes budget; last.pt holds {epoch_span(0, row['epoch'])} in "
              f"{args.out} (give a larger --minutes to train on){best}")  # fmt: skip
    else:
        print(f"trained to epoch {row.get('epoch')} in {row['train_seconds'] / 60:.1f} min; "
              f"checkpoints in {args.out}{best}")  # fmt: skip
    return 0


def _peer_lost(exc: Exception) -> bool:
    """Whether `exc` is what a rank of a multi-process run meets when another rank's process
    ended (killed, out of memory): the collective backend's error on a closed connection."""
    import os

    if os.environ.get("WORLD_SIZE", "1") == "1" or not isinstance(exc, RuntimeError):
        return False
    return bool(re.search(r"gloo|NCCL|[Cc]onnection (reset|closed)|Broken pipe", str(exc)))


#: How a rank whose peer's process ended says why it stopped (the peer's own error, if it said
#: one, is on stderr before it), and what to do when no epoch was kept.
PEER_ENDED = "stopped: another process of this run ended (its error, if it said one, is above)"
PEER_ENDED_START_AGAIN = "start it again once what ended that process is fixed"
#: The remedy of a run stopped before its first checkpoint by a signal.
START_AGAIN = "start it again"


def _holds_checkpoint(args: argparse.Namespace, since: float = 0.0) -> bool:
    """Whether the run folder holds last.pt or best.pt (a --resume continues from it) written
    at or after `since` (unix s)."""
    from pathlib import Path

    for name in ("last.pt", "best.pt"):
        try:
            if (Path(args.out) / name).stat().st_mtime >= since:
                return True
        except OSError:
            continue
    return False


def _stopped_on_sigterm(
    args: argparse.Namespace,
    stopped: str = "stopped on SIGTERM",
    *,
    processes: int | None = None,
    fresh_start: str = START_AGAIN,
) -> str:
    """The line a run stopped by SIGTERM (or, `stopped` "interrupted", by Ctrl-C; or by the end
    of another process of the run) ends with: what it kept and how to continue it, with
    `--nproc-per-node` when it ran in several `processes` on this machine (default: the
    torchrun rank's own count). `fresh_start`: what to do when no epoch was kept."""
    import os
    import shlex
    from pathlib import Path

    last, best = Path(args.out) / "last.pt", Path(args.out) / "best.pt"
    if not last.is_file() and not best.is_file():
        return (
            f"splitdet train: {stopped} before its first epoch ended: no checkpoint was "
            f"written; {fresh_start}"
        )
    words = ["splitdet", "train", "--data", args.data, "--out", args.out, "--resume"]
    if processes is None:
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        one_machine = os.environ.get("WORLD_SIZE") == local  # one machine's DDP
        processes = int(local) if one_machine else 1
    if processes != 1:
        words += ["--nproc-per-node", str(processes)]
    command = shlex.join(words)
    if not last.is_file():  # stopped between best.pt and last.pt (--resume starts from best.pt)
        return (
            f"splitdet train: {stopped} before last.pt was written; {best} holds a finished "
            f"epoch: continue with `{command}`"
        )
    return (
        f"splitdet train: {stopped}; {last} holds the last finished epoch: continue with "
        f"`{command}`"
    )


def _train(config: TrainConfig, args: argparse.Namespace) -> dict:
    """`train(config)` into `args.out`, its errors as CommandErrors; returns its result."""
    from splitdet.shared.atomic_file import WriteError, write_problem
    from splitdet.shared.checkpoint import CheckpointError
    from splitdet.shared.cli import CommandError
    from splitdet.training.initial_weights import InitError
    from splitdet.training.train import train
    from splitdet.training.voc import VocError, check_hint

    try:
        return train(
            config, args.data, args.out, resume=args.resume, init=args.init,
            # bars on a terminal only: in a log file they are carriage returns and cursor
            # moves (125 kB for a minute of `tiny`); without them a line every 25 steps
            progress=not args.no_progress and _stderr_is_terminal(),
        )  # fmt: skip
    except VocError as exc:
        message = _one_line(exc)
        if "unknown class" in message and (names := _dataset_classes(args.data)):
            raise CommandError(f"{message}; {names}") from exc
        raise CommandError(check_hint(message, args.data)) from exc
    except (InitError, CheckpointError, ValueError) as exc:
        raise CommandError(_one_line(exc)) from exc
    except WriteError as exc:  # a checkpoint: its message names the file and why
        raise CommandError(str(exc)) from None
    except OSError as exc:  # a record (metrics, recipe, curve) that cannot be written
        where = exc.filename or f"--out {args.out}"
        raise CommandError(f"{where}: cannot write ({write_problem(where, exc)})") from None
    except FloatingPointError as exc:  # diverged: the epochs finished before it are in last.pt
        from pathlib import Path

        last = Path(args.out) / "last.pt"
        kept = f" ({last} holds the last finished epoch)" if last.is_file() else ""
        raise CommandError(f"training diverged: {exc}{kept}") from exc


def _dataset_classes(data: str) -> str | None:
    """What to give --classes for the dataset at `data`, as `splitdet data check` says it:
    every class its annotations name (they are read, not its images), and which of them differ
    only in case or Unicode normalisation (two classes printed alike); instead of the option,
    the classes no --classes can name (a comma in the name) and to rename them. None when none
    could be read."""
    import shlex
    from pathlib import Path

    from splitdet.training.voc_check_boxes import (
        case_twin_warnings,
        class_boxes,
        classes_option,
        comma_class_problems,
    )

    try:
        boxes, partly_read = class_boxes(Path(data))
    except (OSError, ValueError):
        return None
    if not boxes:
        return None
    unread = (
        f" (some annotations could not be read: `splitdet data check {shlex.quote(data)}` "
        "lists them)"
        if partly_read
        else ""
    )
    where = Path(data) / "Annotations"
    names = classes_option(boxes)
    twins = case_twin_warnings(boxes, where)
    if names is None:  # (a comma the option would split, or names alike but for Unicode)
        return "; ".join([*comma_class_problems(boxes, where), *twins]) + unread
    but = "".join(f"; but {line}" for line in twins)
    return (
        f"the dataset's annotations name the classes {names}: train with --classes {names}"
        f"{unread}{but}"
    )


def _one_line(exc: Exception) -> str:
    """The error's own message; an error raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is the original "module.Error: message"."""
    message = str(exc)
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


def _launcher_pid() -> int | None:
    """The pid of the launcher a rank ends with (`die_with_parent`): the one
    `splitdet train --nproc-per-node` names (PARENT_PID_ENV), else, under plain torchrun (its
    agent sets TORCHELASTIC_RUN_ID), this process's parent as it started, the torchrun agent;
    None outside a rank (`RANK` unset). A plain torchrun SIGKILLed left its ranks training on,
    re-parented to pid 1 and holding --out."""
    from splitdet.shared.parent_death import PARENT_PID_ENV

    if "RANK" not in os.environ:
        return None
    if named := os.environ.get(PARENT_PID_ENV):
        return int(named)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return _PARENT_AT_START
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m splitdet.training.cli_train` (what torchrun launches, and what each process of
    `splitdet train --nproc-per-node N` runs: it logs at the level LOG_LEVEL_ENV gives)."""
    import logging
    import os

    from splitdet.shared.cli import CommandError, Parser, add_log_level, before_torch_imports
    from splitdet.shared.logs import TextLogFormatter
    from splitdet.shared.parent_death import die_with_parent
    from splitdet.shared.stdout_guard import tolerate_unencodable_output
    from splitdet.training.launch import LOG_LEVEL_ENV

    # (splitdet's parser: a path option given twice is refused here too)
    parser = Parser(
        prog="splitdet train", epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    add_log_level(parser)  # (`splitdet train ... --log-level X` hands it to the ranks too)
    args = parser.parse_args(argv)
    args.command_argv = list(sys.argv[1:] if argv is None else argv)
    tolerate_unencodable_output()  # (rank 0's closing line names --out, as `splitdet train`)
    parent = _launcher_pid()
    if parent is not None and not die_with_parent(parent, "this rank"):
        print("splitdet train: the launcher that started this rank is gone; not training",
              file=sys.stderr)  # fmt: skip
        return 1
    handler = logging.StreamHandler()  # the lines `splitdet train` writes
    handler.setFormatter(TextLogFormatter())
    level = getattr(args, "log_level", None) or os.environ.get(LOG_LEVEL_ENV, "INFO")
    logging.basicConfig(level=level, handlers=[handler])
    before_torch_imports()  # (as `splitdet train` readies its own: a stop met in torch's import)

    try:
        return run(args)
    except CommandError as exc:  # (every rank meets a problem of the data: each says it)
        rank = os.environ.get("RANK", "0")
        # one write of the whole line: print() writes the text and its newline apart, and on an
        # unbuffered stderr (PYTHONUNBUFFERED) the other rank's line landed between the two
        who = "" if rank == "0" else f" (rank {rank})"
        sys.stderr.write(f"splitdet train: error{who}: {exc}\n")
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
