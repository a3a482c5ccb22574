"""ONNX Runtime sessions for the edge half: the gate and the lazy FPN completion (no torch).

    runtime = EdgeRuntime(model_dir)
    gate = runtime.gate(prepared.batch)          # p(defect), gate levels, what completion needs
    if gate.p_defect >= runtime.manifest.gate_threshold:
        levels = runtime.complete(gate)          # all five FPN levels, [C, h, w] each

The CUDA provider is used when onnxruntime-gpu and a GPU are present (unless `device="cpu"`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitdet.shared.manifest import COMPLETE_ONNX, GATE_ONNX, Manifest, read_manifest
from splitdet.shared.shortage import short_of


@dataclass
class EdgeGate:
    """The gate's output for one image.

    Attributes:
        p_defect: probability that the image is defective.
        levels: the gate levels computed so far, name -> Float32[C, h, w].
        pending: what completion needs, ONNX input name -> Float32[1, C_i, h, w].
    """

    p_defect: float
    levels: dict[str, np.ndarray]
    pending: dict[str, np.ndarray]


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for `device` in {"auto", "cpu", "cuda"}."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "device 'cuda' asked for, but this ONNX Runtime has no CUDA provider "
                f"(available: {available}); install splitdet[gpu]"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class ModelMemoryError(RuntimeError):
    """ONNX Runtime could not allocate what a session of the export needs (its std::bad_alloc,
    a MemoryError): one line naming memory and the limit to raise (`load_session`)."""


def load_session(
    path: Path, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """An ONNX Runtime session of the graph at `path`; ModelMemoryError when it runs out of
    memory loading it (under an address-space limit: `prlimit --as`, systemd LimitAS=), not
    ONNX Runtime's own "Exception during initialization: std::bad_alloc"."""
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # (ONNX Runtime's own exception classes derive from Exception)
        if short_of(exc) != "memory":
            raise
        from splitdet.shared.cli import memory_limit_hint

        said = " ".join(str(exc).split())[:200] or type(exc).__name__  # (one line)
        raise ModelMemoryError(
            f"not enough memory to load {path.parent} ({memory_limit_hint()}; the edge needs "
            f"about 1.3 GB of address space): {path.name}: {said}"
        ) from None


class EdgeRuntime:
    """The gate and completion sessions of one exported model directory."""

    def __init__(
        self,
        model_dir: Path,
        threads: int | None = None,
        device: str = "auto",
        manifest: Manifest | None = None,
    ) -> None:
        """Open both sessions.

        Args:
            model_dir: a directory written by `splitdet export` (checked against its manifest).
            threads: intra-op threads per session; default all cores.
            device: auto | cpu | cuda.
            manifest: an already verified manifest of `model_dir` (skips re-hashing).
        """
        self.model_dir = Path(model_dir)
        self.manifest = manifest or read_manifest(self.model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # ONNX Runtime's workers spin after each run by default; on a small edge box that burns
        # the cores the next image's decode (or any other process) needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers_for(device)
        self._gate = load_session(self.model_dir / GATE_ONNX, options, providers)
        # No completion graph when the gate reads P2: every level comes out of the gate.
        self._complete = None
        if COMPLETE_ONNX in self.manifest.artifacts:
            self._complete = load_session(self.model_dir / COMPLETE_ONNX, options, providers)
        self._gate_outputs = [o.name for o in self._gate.get_outputs()]
        self._complete_inputs = (
            [i.name for i in self._complete.get_inputs()] if self._complete is not None else []
        )
        self.providers = self._gate.get_providers()

    def gate(self, batch: np.ndarray) -> EdgeGate:
        """Run the gate on Float32[1, 3, H, W] (normalised, padded to /32)."""
        if batch.ndim != 4 or batch.shape[:2] != (1, 3) or batch.dtype != np.float32:
            raise ValueError(
                f"expected a float32 batch [1, 3, H, W], got {batch.dtype} {batch.shape}"
            )
        outputs = dict(zip(self._gate_outputs, self._gate.run(None, {"image": batch}), strict=True))
        levels = {
            name.removeprefix("level_"): value[0]
            for name, value in outputs.items()
            if name.startswith("level_")
        }
        pending = {name: outputs[name] for name in self._complete_inputs}
        return EdgeGate(p_defect=float(outputs["p_defect"][0]), levels=levels, pending=pending)

    def complete(self, gate: EdgeGate) -> dict[str, np.ndarray]:
        """All five FPN levels, name -> Float32[C, h, w] (the gate's plus the lazy ones)."""
        if self._complete is None:
            return dict(gate.levels)
        names = [o.name for o in self._complete.get_outputs()]
        lazy = self._complete.run(names, gate.pending)
        completed = {
            name.removeprefix("level_"): value[0] for name, value in zip(names, lazy, strict=True)
        }
        return {**completed, **gate.levels}
