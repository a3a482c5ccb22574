"""An int8 edge gate: ONNX Runtime static quantisation of `edge_gate.onnx`, calibrated on images.

    quantize_gate(model_dir / "edge_gate.onnx", calibration_batches)

The gate graph (ResNet body + FPN top + defect head) is most of what a defect-free image costs the
edge. Static quantisation (QDQ format: int8 weights per output channel, uint8 activations with
ranges from MinMax calibration) runs its convolutions in int8. Measured on this project's 2-core
CPU, ResNet50 at 800x960: 0.19 s instead of 0.75 s per image. It is lossy (a few percent relative
error on the outputs), so `splitdet export` only applies it when asked (`--quantize-edge`) and
records it in the manifest; whether it keeps the mAP must be measured on trained weights.

The completion graph and the cloud half stay float32.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

#: What onnxruntime's quantiser logs, through the root logger, for each weight of rank 1 it is
#: asked to quantise per channel on axis 1: the scale of every InstanceNormalization that a
#: GroupNorm exports to (20 of them in a ResNet18). It quantises those per tensor instead, which
#: is what they need (one value each); the warning says nothing a user can act on.
AXIS_OUT_OF_RANGE = re.compile(r"Axis -?\d+ is out-of-range for weight ")


class _DropAxisOutOfRange(logging.Filter):
    """Drops the `AXIS_OUT_OF_RANGE` records; lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not AXIS_OUT_OF_RANGE.match(record.getMessage())


@contextlib.contextmanager
def _quiet_axis_warnings() -> Iterator[None]:
    """While in it, the root logger drops the `AXIS_OUT_OF_RANGE` records. A logger's filter
    sees only the records logged through that logger itself, so the records of splitdet's own
    loggers, which reach the root logger's handlers by propagation, pass untouched."""
    quiet = _DropAxisOutOfRange()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over preprocessed batches."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._iter: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {"image": batch}


def quantize_gate(gate_path: Path, batches: Sequence[np.ndarray]) -> None:
    """Replace the float32 gate graph at `gate_path` with its int8 (QDQ) version, in place.

    Args:
        gate_path: an `edge_gate.onnx` written by export.
        batches: calibration inputs, each Float32[1, 3, H, W] as `edge.preprocess.prepare` makes
            them (normalised, padded to /32); sizes may differ.

    Raises:
        ValueError: no calibration batches.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not batches:
        raise ValueError("int8 calibration needs at least one image")
    gate_path = Path(gate_path)
    with tempfile.TemporaryDirectory(dir=gate_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantised = Path(tmp) / "quantised.onnx"
        # Folds constants and infers shapes so that every convolution gets quantised.
        quant_pre_process(str(gate_path), str(prepared), skip_symbolic_shape=True)
        with _quiet_axis_warnings():
            quantize_static(
                str(prepared),
                str(quantised),
                _Batches(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                # 7-bit weights: x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 by s8 with
                # VPMADDUBSW, whose 16-bit sums saturate on full-range weights, so p(defect)
                # depended on the CPU (0.034 off the float gate's on an AVX2-only machine where
                # the suite's bound is 0.01 and others kept within it); ONNX Runtime's advice
                reduce_range=True,
            )
        quantised.replace(gate_path)
