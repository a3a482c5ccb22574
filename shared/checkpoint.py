"""Checkpoints: one dict, readable by plain torchvision (torch).

    {"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "config": ModelConfig.to_dict(),
     "epoch": int, "class_names": [...], "gate_threshold": float, "format": 1}

`model` holds torchvision FasterRCNN keys plus `defect_head.*`; `detector_state_dict` strips the
latter so `fasterrcnn_resnet50_fpn(num_classes=K).load_state_dict(...)` accepts it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from splitdet.shared.atomic_file import WriteError, replacing, write_problem
from splitdet.shared.config import MAX_REFINE_STEPS, ModelConfig
from splitdet.shared.model import MultiTaskRCNN

CHECKPOINT_FORMAT = 1
DEFAULT_GATE_THRESHOLD = 0.5


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


class _ErrorKeeping:
    """A file object for torch.save that keeps the first OSError its writes raised: torch
    reports a failed write as RuntimeError("... unexpected pos ..."), its errno lost."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._handle.flush()


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (KeyboardInterrupt, or train's SIGTERM as one) behind torch's RuntimeError, if
    any: torch turns what its Python write callback raised into RuntimeError("unexpected pos"),
    with that exception in its context chain (raised inside the write, or as it was entered)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def save_torch(obj: Any, path: Path | str, *, fsync: bool = True) -> None:
    """`torch.save(obj)` to `path` whole (`atomic_file.replacing`: a failed write keeps the
    earlier file as it was and leaves no temporary file).

    Raises:
        KeyboardInterrupt: a Ctrl-C (or SIGTERM raised as one) during a write, as it came.
        WriteError: the file could not be written; its message names `path` and why, "no
            space left on device" on a full file system (torch's own error is a RuntimeError
            "basic_ios::clear: iostream error" or "unexpected pos", whatever the cause).
    """
    path = Path(path)
    try:
        with replacing(path, fsync=fsync) as tmp, open(tmp, "wb") as handle:
            writer = _ErrorKeeping(handle)
            try:
                torch.save(obj, writer)
            except RuntimeError as exc:
                interrupt = _interrupt_in(exc)
                if interrupt is not None:  # stopped, not a failed write
                    raise interrupt from None
                # told while the temporary file still fills the disk (`replacing` removes it)
                cause = writer.error or exc
                number = getattr(cause, "errno", None)
                raise WriteError(path, write_problem(path, cause), number) from exc
    except WriteError:
        raise
    except OSError as exc:  # the open, a flush, the fsync, the rename
        raise WriteError(path, write_problem(path, exc), exc.errno) from exc


def save_checkpoint(path: Path, model: MultiTaskRCNN, **extra: Any) -> None:
    """Write `model` and `extra` (optimizer, lr_scheduler, epoch, gate_threshold...) atomically.

    Raises WriteError (an OSError) naming the file and why when it cannot be written: the
    earlier checkpoint at `path` is then kept as it was."""
    path = Path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": model.config.to_dict(),
        "class_names": list(model.config.class_names),
        "gate_threshold": DEFAULT_GATE_THRESHOLD,
        **extra,
    }
    save_torch(checkpoint, path)  # a full disk leaves the last checkpoint whole


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, validated; tensors on the CPU."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(f.name for f in path.glob("*.pt") if f.is_file())
        if (path / "manifest.json").is_file():
            hint = "it is a model export (manifest.json), which commands take as --model"
        elif inside:
            hint = f"give a checkpoint file in it: {', '.join(inside)}"
        else:
            hint = "give a checkpoint file (a training run's best.pt or last.pt)"
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        why = why_unreadable(path, exc)
        raise CheckpointError(f"{path}: not a readable checkpoint ({why})") from exc
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"{path}: not a splitdet checkpoint (no 'model'/'config' entries)")
    found = checkpoint.get("format", CHECKPOINT_FORMAT)
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {found!r}; this splitdet reads format {CHECKPOINT_FORMAT}"
        )
    return checkpoint


def why_unreadable(path: Path | bytes, exc: Exception) -> str:
    """One line on why torch.load refused `path` (or the bytes of a file read already: the
    cloud loads its heads from the bytes it hashed) (torch's own messages run to a dozen lines
    and suggest weights_only=False, which would run whatever code the file holds)."""
    if isinstance(path, bytes):
        head = path[:4]
    else:
        with open(path, "rb") as file:
            head = file.read(4)
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "not a file written by torch.save"
    if "Weights only load failed" in str(exc):
        return "it holds Python objects, not only tensors and plain data; not loaded, for safety"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else type(exc).__name__
    return f"damaged or truncated: {first}"


def load_model(
    path: Path, *, box_refine_steps: int | None = None
) -> tuple[MultiTaskRCNN, dict[str, Any]]:
    """Rebuild the model from a checkpoint file; returns (model in eval mode, checkpoint dict).

    `box_refine_steps`, when given, replaces the checkpoint's (inference only: the weights are
    the same for any value, see `ModelConfig.box_refine_steps`); the file is not changed.
    """
    checkpoint = read_checkpoint(path)
    if box_refine_steps is not None and not 0 <= box_refine_steps <= MAX_REFINE_STEPS:
        raise CheckpointError(
            f"box refinement steps must be 0-{MAX_REFINE_STEPS}, got {box_refine_steps}"
        )
    try:
        config = ModelConfig.from_dict(checkpoint["config"])
        if box_refine_steps is not None:
            config = replace(config, box_refine_steps=box_refine_steps)
        model = MultiTaskRCNN(config)
        misfit = weights_misfit(model.state_dict(), checkpoint["model"])
        if misfit is not None:
            raise CheckpointError(f"{path}: weights do not fit its configuration ({misfit})")
        model.load_state_dict(checkpoint["model"])
    except (ValueError, RuntimeError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        said = " ".join(str(exc).split())  # (torch's message spans lines)
        raise CheckpointError(f"{path}: weights do not fit its configuration ({said})") from exc
    unusable = not_finite(checkpoint["model"])
    if unusable:
        raise CheckpointError(
            f"{path}: {len(unusable)} weight tensor(s) hold NaN or infinity (e.g. "
            f"{unusable[0]}): the training diverged before this checkpoint was saved; use "
            "an earlier one, or train again with a lower learning rate"
        )
    return model.eval(), checkpoint


def weights_misfit(expected: Mapping[str, Any], given: Any) -> str | None:
    """What keeps `given` (a checkpoint's "model") from loading into a model whose state dict
    is `expected`, in one line: keys missing, keys unknown, shapes that differ (a count and
    the first of each); None when it fits."""
    if not isinstance(given, Mapping):
        return f"its weights are a {type(given).__name__}, not a state dict"
    missing = [k for k in expected if k not in given]
    unknown = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} where the model has {tuple(expected[k].shape)}"
        for k in expected
        if k in given
        and hasattr(given[k], "shape")
        and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(found)} {what}, e.g. {found[0]}"
        for what, found in (
            ("missing", missing),
            ("unknown", unknown),
            ("of another shape", shapes),
        )
        if found
    ]
    return "; ".join(parts) or None


def not_finite(weights: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `weights` holding a NaN or an infinity."""
    return [
        name
        for name, value in weights.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


def detector_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain-torchvision part of a model state dict (drops `defect_head.*`)."""
    return {k: v for k, v in model_state.items() if not k.startswith("defect_head.")}


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 hex over every tensor of `model.state_dict()`: names, dtypes, shapes and values.

    Tells whether two models hold the same weights, edge and cloud halves alike; `splitdet
    export` records it in the manifest (`weights_sha256`) so that the benchmark can tell a
    checkpoint from the one a model directory was exported from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def threshold_calibration(checkpoint: dict) -> str | None:
    """What calibrated the checkpoint's gate threshold: "eval", "validation" (training's), or
    None when nothing did (it is then the 0.5 default, or a value set by hand).

    `splitdet eval --checkpoint` stores "gate_target_recall" (and "gate_calibrated" True)
    beside the threshold it calibrates; `splitdet train` records "gate_calibrated", True once a
    validation pass calibrated the threshold. Checkpoints older than that key tell it by their
    "history" rows: "val_gate_threshold" in one of them (none: no usable val split, or
    --eval-every 0). Where it was calibrated: `recorded_calibration_source`."""
    if checkpoint.get("gate_target_recall") is not None:
        return "eval"
    calibrated = checkpoint.get("gate_calibrated")
    if calibrated is not None:
        return "validation" if calibrated else None
    history = checkpoint.get("history")
    if isinstance(history, list) and any(
        isinstance(row, dict) and row.get("val_gate_threshold") is not None for row in history
    ):
        return "validation"
    return None


#: The checkpoint entries naming where its gate threshold was calibrated: the VOC root
#: (resolved) and the split. Written by `splitdet train` (its val split) and by `splitdet eval
#: --checkpoint` when it stores a threshold; checkpoints of an older splitdet lack them.
CALIBRATION_DATA, CALIBRATION_SPLIT = "gate_calibration_data", "gate_calibration_split"


def calibration_source(root: Path | str, split: str) -> dict[str, str]:
    """The checkpoint entries recording a threshold calibrated on `split` of the VOC tree at
    `root` (resolved: the same data reached by another path is the same source)."""
    return {CALIBRATION_DATA: str(Path(root).resolve()), CALIBRATION_SPLIT: str(split)}


def recorded_calibration_source(checkpoint: Mapping[str, Any]) -> dict[str, str] | None:
    """`calibration_source`'s entries as the checkpoint records them, or None when it records
    none (never calibrated, or calibrated by an eval of a splitdet older than the record). A
    training checkpoint older than the record whose threshold its validation calibrated tells
    it by its "data" (the resolved --data, recorded long before): the val split of that."""
    data, split = checkpoint.get(CALIBRATION_DATA), checkpoint.get(CALIBRATION_SPLIT)
    if isinstance(data, str) and isinstance(split, str):
        return {CALIBRATION_DATA: data, CALIBRATION_SPLIT: split}
    trained_on = checkpoint.get("data")
    if threshold_calibration(dict(checkpoint)) == "validation" and isinstance(trained_on, str):
        return {CALIBRATION_DATA: trained_on, CALIBRATION_SPLIT: "val"}
    return None


def describe_calibration_source(source: Mapping[str, str]) -> str:
    """`source` (`calibration_source`'s entries) for people: "split val of /data/gaskets"."""
    return f"split {source[CALIBRATION_SPLIT]} of {source[CALIBRATION_DATA]}"
