"""Export a trained model to a model directory: the edge half as ONNX, the cloud half's weights.

    gate      edge_gate.onnx      image [1, 3, H, W] (normalised, padded to /32)
                                  -> p_defect [1], the gate levels, laterals C_i, top_down
    complete  edge_complete.onnx  laterals + top_down -> the lazy FPN levels (only when some level
                                  is lazy: a gate on P2 computes every level itself)
    cloud     cloud_heads.pt      `rpn.*` and `roi_heads.*` weights

Export checks itself: it runs ONNX Runtime on a sample image and compares every output with
PyTorch (relative error bound) before it writes the manifest; a failed check leaves no manifest,
so a half-exported directory can never be served.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from splitdet.shared.atomic_file import WriteError, atomic_write, write_problem
from splitdet.shared.checkpoint import save_torch, weights_digest
from splitdet.shared.codec import CODECS
from splitdet.shared.config import EXPORT_TOLERANCE
from splitdet.shared.folder_lock import folder_lock
from splitdet.shared.manifest import (
    ALL_ARTIFACTS,
    CLOUD_WEIGHTS,
    COMPLETE_ONNX,
    GATE_ONNX,
    MANIFEST_NAME,
    PUBLISHING_MARKER,
    Manifest,
    artifacts_for,
    write_manifest,
)
from splitdet.shared.model import EdgeHalf, MultiTaskRCNN
from splitdet.shared.spec import STRIDES
from splitdet.training.provenance import splitdet_version
from splitdet.training.quantize_edge import quantize_gate

if TYPE_CHECKING:  # loaded when an export is checked
    import onnxruntime as ort

log = logging.getLogger(__name__)

#: Name prefix of the folder an export is built and checked in, inside its --out.
STAGING_PREFIX = ".export-staging-"
#: The lock file an export holds in its --out while it writes there (`folder_lock`).
EXPORT_LOCK = ".splitdet-export.lock"

#: ONNX opset; 17 is served by every ONNX Runtime since 1.13.
OPSET = 17


class ExportError(RuntimeError):
    """Export failed; the message says which step and why."""


@dataclass(frozen=True)
class EdgeIO:
    """Tensor names of the two edge graphs, as the edge runtime looks them up."""

    gate_inputs: tuple[str, ...]
    gate_outputs: tuple[str, ...]
    complete_inputs: tuple[str, ...]
    complete_outputs: tuple[str, ...]


def edge_io(model: MultiTaskRCNN) -> EdgeIO:
    """The ONNX input/output names for `model`'s split (they depend on its gate level)."""
    spec = model.config.split_spec
    levels = tuple(f"level_{n}" for n in spec.gate_levels)
    if not spec.lazy_levels:  # gate on P2: nothing is left to complete
        return EdgeIO(("image",), ("p_defect", *levels), (), ())
    laterals = tuple(f"lateral_{name}" for name in spec.lazy_levels)
    return EdgeIO(
        gate_inputs=("image",),
        gate_outputs=("p_defect", *levels, *laterals, "top_down"),
        complete_inputs=(*laterals, "top_down"),
        complete_outputs=tuple(f"level_{name}" for name in spec.lazy_levels),
    )


class _GateGraph(nn.Module):
    def __init__(self, edge: EdgeHalf, with_state: bool) -> None:
        super().__init__()
        self.edge = edge
        self.with_state = with_state  # also output what completion needs

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.edge.gate(image)
        state = (*out.laterals, out.top_down) if self.with_state else ()
        return (out.p_defect, *out.levels.values(), *state)


class _CompleteGraph(nn.Module):
    def __init__(self, edge: EdgeHalf) -> None:
        super().__init__()
        self.edge = edge

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        *laterals, top_down = inputs
        return tuple(self.edge.complete(laterals, top_down).values())


def _export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    # The TorchScript-based exporter handles torchvision's FPN (nearest upsampling to a
    # dynamic size) in seconds; it is deprecated in favour of dynamo but still shipped.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max()), 1e-6)
    return float(np.abs(actual - expected).max()) / scale


def _errors_against_torch(
    session: ort.InferenceSession,
    names: tuple[str, ...],
    feeds: dict[str, np.ndarray],
    expected: tuple[Tensor, ...],
) -> dict[str, float]:
    """Output name -> relative error of ONNX Runtime against PyTorch (shapes must match)."""
    return _compare(names, session.run(list(names), feeds), expected)


def _compare(
    names: tuple[str, ...], outputs: list[np.ndarray], expected: tuple[Tensor, ...]
) -> dict[str, float]:
    """Output name -> `_relative_error` of ONNX Runtime's `outputs` against PyTorch's
    `expected`; ExportError when a shape differs."""
    errors = {}
    for name, actual, reference in zip(names, outputs, expected, strict=True):
        reference = reference.detach().numpy()
        if actual.shape != reference.shape:
            raise ExportError(
                f"{name}: ONNX Runtime shape {actual.shape} != torch {reference.shape}"
            )
        errors[name] = _relative_error(actual, reference)
    return errors


def _check_against_torch(
    session: ort.InferenceSession,
    names: tuple[str, ...],
    feeds: dict[str, np.ndarray],
    expected: tuple[Tensor, ...],
    tolerance: float = EXPORT_TOLERANCE,
) -> dict[str, float]:
    errors = _errors_against_torch(session, names, feeds, expected)
    for name in names:
        if not errors[name] <= tolerance:
            loosen = (
                " (untrained weights amplify float differences: for a timing-only export, "
                "--tolerance loosens the check)"
                if tolerance == EXPORT_TOLERANCE
                else ""
            )
            raise ExportError(
                f"{name}: ONNX Runtime differs from PyTorch by {errors[name]:.2e} relative "
                f"(bound {tolerance:g}){loosen}"
            )
    return errors


def _int8_gate_errors(
    session: ort.InferenceSession,
    names: tuple[str, ...],
    image: Tensor,
    expected: tuple[Tensor, ...],
) -> dict:
    """How far the int8 gate graph (`session`) is from PyTorch (`expected`, the float gate's
    outputs named `names`, p_defect first) on `image` (Float32[1, 3, H, W]).

    p(defect) is compared in absolute terms: a relative error means nothing near 0, where
    PyTorch's 0.00137 against int8's 0.0 (one quantisation step below) reads as 100%. The
    feature maps keep `_relative_error`, scaled by each map's largest magnitude.

    Returns {"p_defect_float": PyTorch's p (probability, [0, 1]), "p_defect_int8": the int8
    graph's, "p_defect_abs_error": |int8 - float| (probability units), "max_relative_error":
    {output name: relative error} for every output but p_defect}."""
    outputs = session.run(list(names), {"image": image.numpy()})
    relative = _compare(names, outputs, expected)  # (checks every shape, p_defect's too)
    del relative[names[0]]
    p_int8 = float(outputs[0].reshape(-1)[0])
    p_float = float(expected[0].detach().numpy().reshape(-1)[0])
    return {
        "p_defect_float": p_float,
        "p_defect_int8": p_int8,
        "p_defect_abs_error": abs(p_int8 - p_float),
        "max_relative_error": relative,
    }


def export_model(
    model: MultiTaskRCNN,
    out_dir: Path,
    gate_threshold: float = 0.5,
    default_codec: str = "int8",
    sample_hw: tuple[int, int] | None = None,
    extra: dict | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    tolerance: float = EXPORT_TOLERANCE,
) -> Manifest:
    """Write `model`'s edge graphs, cloud weights and manifest into `out_dir`.

    Args:
        model: the multi-task detector (any mode; exported in eval mode).
        out_dir: created if missing. Everything is written and checked in a staging folder
            inside it first, then moved in, the manifest last: an export that fails, or is
            killed before it moves its files in, leaves an earlier export in `out_dir` whole
            and servable; one killed between those moves leaves a folder `read_manifest`
            refuses as interrupted until an export into it completes (`_publish`).
        gate_threshold: p(defect) at or above which the edge sends an image to detection.
        default_codec: one of CODECS.
        sample_hw: padded (H, W) of the self-check sample, multiples of 32; default: the size a
            4:3 image takes after the model's resize.
        extra: facts recorded in the manifest (e.g. the source checkpoint).
        calibration: when given, preprocessed images (each Float32[1, 3, H, W]) that calibrate
            an int8 gate graph (`quantize_edge`); its error against PyTorch on the first of them
            is recorded in the manifest's "edge_quantization", not bounded (int8 is lossy by
            design): p(defect)'s absolute error, each feature map's relative error
            (`_int8_gate_errors`).
        tolerance: the largest relative error of ONNX Runtime against PyTorch accepted on any
            output of the float graphs (recorded in the manifest's "export_check").
    """
    if default_codec not in CODECS:
        raise ExportError(f"unknown codec {default_codec!r}; choose one of {CODECS}")
    if not 0.0 <= gate_threshold <= 1.0:
        raise ExportError(f"gate threshold must be in [0, 1], got {gate_threshold}")
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as held:
        try:  # one export at a time: another's staging folder is never taken for a stale one
            held.enter_context(folder_lock(out_dir, EXPORT_LOCK, "splitdet export", "--out"))
        except ValueError as exc:  # another export into it, or a folder that cannot be made
            raise ExportError(str(exc)) from None
        for stale in out_dir.glob(f"{STAGING_PREFIX}*"):  # left by an export that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if (out_dir / PUBLISHING_MARKER).exists():
            log.warning(
                "--out %s: an earlier export was killed while it replaced its files (%s); "
                "this export replaces them all",
                out_dir, PUBLISHING_MARKER,
            )  # fmt: skip
        earlier = earlier_export(out_dir)  # (under the lock: what this export replaces)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        try:
            try:
                manifest = _export_into(
                    model, held.enter_context(_utf8_named(staging)), gate_threshold,
                    default_codec, sample_hw, extra, calibration, tolerance,
                )  # fmt: skip
                # before the first move, as `_publish` says; a full disk may refuse it too
                atomic_write(out_dir / PUBLISHING_MARKER, f"pid {os.getpid()}\n", fsync=True)
            except OSError as exc:  # a full disk (torch.save's, ONNX's), the staging folder
                raise ExportError(_unwritten(out_dir, staging, exc)) from exc
            _publish(staging, out_dir, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if earlier is not None and earlier["fingerprint"] == manifest.fingerprint:
        changed = codec_changed(out_dir, earlier, manifest)
        if changed is not None:
            log.warning("%s", changed)
        else:
            log.info(
                "--out %s: unchanged, it held this export already (fingerprint %s)",
                out_dir, manifest.fingerprint[:16],
            )  # fmt: skip
    elif earlier is not None:
        log.warning("%s", replaced_export(out_dir, earlier, manifest))
    return manifest


@contextlib.contextmanager
def _utf8_named(folder: Path) -> Iterator[Path]:
    """`folder` under a path that is valid UTF-8 text, for the libraries it is handed to.

    A folder whose name is not UTF-8 (`--out "$(printf 'mod\\xe9l')"`, a Latin-1 name) reaches
    Python with surrogate escapes, which torch's ONNX exporter and ONNX Runtime (C++ through
    pybind11) refuse as an argument ("incompatible function arguments"). Such a folder is
    reached, while in it, through a symbolic link of an ASCII name in a new private temporary
    folder, removed after: the files are still written into `folder` itself, which `_publish`
    then moves by its own name (Python's file calls take any name). Any other folder is
    yielded as it is."""
    try:
        str(folder).encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="splitdet-export-") as links:
        alias = Path(links) / "staging"
        try:
            alias.symlink_to(folder.resolve(), target_is_directory=True)
        except OSError as exc:  # (no symbolic links here: the export fails as it did)
            raise ExportError(
                f"{folder.parent}: its name is not UTF-8, which ONNX export cannot take, and "
                f"no ASCII link to it could be made ({exc.strerror or exc}); export into a "
                "folder whose name is UTF-8"
            ) from None
        yield alias


def earlier_export(out_dir: Path) -> dict | None:
    """What `out_dir`'s manifest.json says of the export it holds, read as it is (not
    checked against its files: a damaged or interrupted export is replaced all the same):
    {"fingerprint", "checkpoint", "checkpoint_epoch", "class_names", "default_codec"}, None
    for what it does not record (an export of an older splitdet names no checkpoint); None
    when it holds no manifest with a fingerprint."""
    try:
        data = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str):
        return None
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    names = data.get("class_names")
    checkpoint, epoch = extra.get("checkpoint"), extra.get("checkpoint_epoch")
    codec = data.get("default_codec")
    return {
        "fingerprint": data["fingerprint"],
        "checkpoint": checkpoint if isinstance(checkpoint, str) else None,
        "checkpoint_epoch": epoch if isinstance(epoch, int) else None,
        "class_names": [str(n) for n in names] if isinstance(names, list) else None,
        "default_codec": codec if isinstance(codec, str) else None,
    }


def codec_changed(out_dir: Path, earlier: dict, manifest: Manifest) -> str | None:
    """The one-line warning for an export into `out_dir` of the same fingerprint as the one
    it held (`earlier_export`'s record of it) but another default codec, None when the codec
    is the same (or the earlier one unknown). The fingerprint leaves the default codec out (an
    edge may override it with --codec), so "unchanged" would be false: every edge started on
    the folder without --codec now sends features in another codec (fp16 2.5 times int8's
    bytes)."""
    before = earlier.get("default_codec")
    if before is None or before == manifest.default_codec:
        return None
    return (
        f"--out {out_dir}: the same model (fingerprint {manifest.fingerprint[:16]}), but its "
        f"default codec is now {manifest.default_codec} (it was {before}): an edge started on "
        f"it without --codec sends {manifest.default_codec} features; give --codec {before} to "
        "keep the earlier one"
    )


def replaced_export(out_dir: Path, earlier: dict, manifest: Manifest) -> str:
    """The one-line warning for an export into `out_dir` that replaced another
    (`earlier_export`'s record of it) with `manifest`'s: both fingerprints, with what each
    was exported from, and what a cloud serving the folder then does."""

    def made_of(fingerprint: str, record: dict) -> str:
        facts = []
        if record.get("checkpoint"):
            epoch = record.get("checkpoint_epoch")
            facts.append(f"checkpoint {record['checkpoint']}"
                         + (f" epoch {epoch}" if epoch is not None else ""))  # fmt: skip
        if record.get("class_names"):
            facts.append(f"classes {','.join(record['class_names'])}")
        return f"fingerprint {fingerprint[:16]}" + (f" ({', '.join(facts)})" if facts else "")

    new = {
        "checkpoint": manifest.extra.get("checkpoint"),
        "checkpoint_epoch": manifest.extra.get("checkpoint_epoch"),
        "class_names": list(manifest.class_names),
    }
    return (
        f"--out {out_dir}: replaced the export of {made_of(earlier['fingerprint'], earlier)} "
        f"with {made_of(manifest.fingerprint, new)}; a cloud serving {out_dir} drops "
        f"{earlier['fingerprint'][:16]} at its next reload (SIGHUP) or restart and refuses "
        "the edges still running it: to serve both while edges move, export into another "
        "folder and serve both"
    )


def _unwritten(out_dir: Path, staging: Path, exc: OSError) -> str:
    """The one-line error for an export whose files could not be written into `staging`:
    which file (when known), why ("no space left on device"), and what `out_dir` still holds."""
    name = Path(exc.filename).name if exc.filename else None
    what = f"its {name}" if name else "its files"
    why = exc.reason if isinstance(exc, WriteError) else write_problem(staging / "x", exc)
    held = (
        "keeps its earlier model as it was"
        if (out_dir / MANIFEST_NAME).is_file()
        else "holds no model"
    )
    return f"--out {out_dir}: cannot write {what} ({why}); {out_dir} {held}"


def _publish(staging: Path, out_dir: Path, manifest: Manifest) -> None:
    """Move a checked export from `staging` into `out_dir` (same file system: each move is a
    rename), the manifest last; artifacts of an earlier export the new one does not have (a
    completion graph) go.

    The files cannot be replaced all at once: between the first move and the last, a reader
    finds the old manifest with some new files, which the manifest's hashes refuse; never a
    mixed model. A marker file (`PUBLISHING_MARKER`) lies in `out_dir` from before the first
    move to after the last, so that, should the export be killed in between, `read_manifest`
    says that an export was interrupted and what to do (export again), instead of only that a
    file differs from its hash. A folder whose files all match its manifest is read as it is,
    marker or not (an export killed before its first move, or after its last). The caller
    writes the marker first."""
    for name in artifacts_for(manifest.model_config):
        os.replace(staging / name, out_dir / name)
    for name in set(ALL_ARTIFACTS) - set(manifest.artifacts):
        (out_dir / name).unlink(missing_ok=True)
    os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    (out_dir / PUBLISHING_MARKER).unlink(missing_ok=True)


def _export_into(
    model: MultiTaskRCNN,
    out_dir: Path,
    gate_threshold: float,
    default_codec: str,
    sample_hw: tuple[int, int] | None,
    extra: dict | None,
    calibration: Sequence[np.ndarray] | None,
    tolerance: float,
) -> Manifest:
    """`export_model`'s work, in the (empty) folder `out_dir`."""
    import onnxruntime as ort

    model = model.eval()
    edge = EdgeHalf(model).eval()
    io = edge_io(model)
    if sample_hw is None:
        short = model.config.min_size
        sample_hw = (-(-short // 32) * 32, -(-(short * 4 // 3) // 32) * 32)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, *sample_hw, generator=generator)

    # Wrappers must be in eval mode too: the exporter restores each wrapper's own mode after
    # tracing, and a wrapper left in training mode would put the whole model in training mode.
    lazy = bool(io.complete_outputs)
    gate_graph, complete_graph = _GateGraph(edge, lazy).eval(), _CompleteGraph(edge).eval()
    with torch.inference_mode():
        gate_expected = gate_graph(image)
    lazy_inputs = gate_expected[len(io.gate_outputs) - len(io.complete_inputs) :]

    axes = {"image": {2: "height", 3: "width"}}
    for name in io.gate_outputs[1:] + io.complete_outputs:
        axes[name] = {2: f"{name}_h", 3: f"{name}_w"}
    _export_graph(
        gate_graph,
        (image,),
        out_dir / GATE_ONNX,
        io.gate_inputs,
        io.gate_outputs,
        axes,
    )
    if lazy:
        _export_graph(
            complete_graph,
            tuple(lazy_inputs),
            out_dir / COMPLETE_ONNX,
            io.complete_inputs,
            io.complete_outputs,
            axes,
        )
    if model.training:
        raise ExportError("the model left export in training mode")

    options = ort.SessionOptions()
    options.log_severity_level = 3

    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(
            str(out_dir / name), options, providers=["CPUExecutionProvider"]
        )

    gate_session = session(GATE_ONNX)
    errors = _check_against_torch(
        gate_session, io.gate_outputs, {"image": image.numpy()}, gate_expected, tolerance
    )
    if lazy:
        with torch.inference_mode():
            complete_expected = complete_graph(*lazy_inputs)
        feeds = {n: t.numpy() for n, t in zip(io.complete_inputs, lazy_inputs, strict=True)}
        errors |= _check_against_torch(
            session(COMPLETE_ONNX), io.complete_outputs, feeds, complete_expected, tolerance
        )

    quantization = None
    if calibration is not None:
        quantize_gate(out_dir / GATE_ONNX, calibration)
        gate_session = session(GATE_ONNX)
        # Measured on a real (calibration) image: on the noise sample the activations fall
        # outside the calibrated ranges and the error says nothing about use.
        real = torch.from_numpy(np.ascontiguousarray(calibration[0]))
        with torch.inference_mode():
            real_expected = gate_graph(real)
        quantization = {
            "gate": "int8 static (QDQ), per-channel weights",
            "calibration_images": len(calibration),
            **_int8_gate_errors(gate_session, io.gate_outputs, real, real_expected),
        }
        log.info(
            "int8 gate on the first calibration image: p(defect) %.4f against PyTorch's %.4f "
            "(absolute error %.2e, in probability units); feature maps off by up to %.2e "
            "relative (max |int8 - float| / max |float| per map)",
            quantization["p_defect_int8"],
            quantization["p_defect_float"],
            quantization["p_defect_abs_error"],
            max(quantization["max_relative_error"].values()),
        )

    cloud_state = {
        k: v for k, v in model.state_dict().items() if k.startswith(("rpn.", "roi_heads."))
    }
    save_torch(cloud_state, out_dir / CLOUD_WEIGHTS, fsync=False)  # WriteError: ENOSPC...
    log.info("export self-check passed; worst relative error %.2e", max(errors.values()))
    return write_manifest(
        out_dir,
        model.config,
        gate_threshold,
        default_codec,
        extra={
            **(extra or {}),
            "export_check": {
                "sample_hw": list(sample_hw),
                "max_relative_error": errors,
                "tolerance": tolerance,
            },
            "edge_quantization": quantization,
            "weights_sha256": weights_digest(model),
            # the version that exported it (not in the fingerprint, as nothing of `extra` is)
            "splitdet": splitdet_version(),
            "onnx_opset": OPSET,
            "strides": STRIDES,
        },
    )
