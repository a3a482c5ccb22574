"""ONNX Runtime sessions for the edge half: the gate and the lazy FPN completion (no torch).

    runtime = EdgeRuntime(model_dir)
    gate = runtime.gate(prepared.batch)          # p(defect), gate levels, what completion needs
    if gate.p_defect >= runtime.manifest.gate_threshold:
        levels = runtime.complete(gate)          # all five FPN levels, [C, h, w] each

The CUDA provider is used when onnxruntime-gpu and a GPU are present (unless `device="cpu"`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitdet.shared.cores import usable_cores
from splitdet.shared.manifest import (
    COMPLETE_ONNX,
    GATE_ONNX,
    Manifest,
    ManifestError,
    read_artifact,
    read_manifest,
)
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


class ModelOutputError(RuntimeError):
    """A session of the export gave what no export `splitdet export` writes gives (a p_defect
    that is NaN, out of 0..1 or not one value; a level that is not float32 or not finite): the
    export is broken, not the image; no verdict can be taken with it. One line naming the
    graph, the output and what it gave."""


#: ONNX Runtime's session option naming the folder a graph loaded from bytes finds its external
#: data in (otherwise: the working directory).
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
#: ONNX Runtime's name of a float32 tensor output.
FLOAT32 = "tensor(float)"


def session_options(threads: int | None) -> ort.SessionOptions:
    """Fresh options for one session (`load_session` sets an entry of its own in them: set
    twice, ONNX Runtime warns on stderr, outside the logs): `threads` intra-op threads (None:
    the cores this process may run on, `cores.usable_cores`), one inter-op thread, its own
    log quiet but for fatal errors."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # (fatal only: a failure is splitdet's one line, its stderr
    # lines would break JSON logs)
    # ONNX Runtime's workers spin after each run by default; on a small edge box that burns
    # the cores the next image's decode (or any other process) needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_session(
    path: Path, data: bytes, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """An ONNX Runtime session of the graph `data`, the bytes of `path` checked against the
    manifest (`read_artifact`): the session runs what the fingerprint covers.

    Its external data, which the fingerprint does not cover, is looked for in an empty folder
    (`options` gets EXTERNAL_DATA_FOLDER): never found. Raises ModelMemoryError when loading runs
    out of memory (under an address-space limit: `prlimit --as`, systemd LimitAS=), not ONNX
    Runtime's own "Exception during initialization: std::bad_alloc"; ManifestError in one line
    for a graph that uses external data or cannot be loaded (not ONNX, an unknown operator).
    """
    try:
        with tempfile.TemporaryDirectory(prefix="splitdet-no-external-data-") as empty:
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, empty)
            return ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:  # (ONNX Runtime's own exception classes derive from Exception)
        said = " ".join(str(exc).split())[:300] or type(exc).__name__  # (one line)
        if short_of(exc) == "memory":
            from splitdet.shared.cli import memory_limit_hint

            raise ModelMemoryError(
                f"not enough memory to load {path.parent} ({memory_limit_hint()}; the edge "
                f"needs about 1.3 GB of address space): {path.name}: {said[:200]}"
            ) from None
        if "external data" in said.lower():  # (its detail names a folder of ours: left out)
            what = said.split(". Error:")[0].split(" : ")[-1]
            raise ManifestError(
                f"{path}: uses external data ({what}), which the fingerprint does not cover: "
                "re-export"
            ) from None
        raise ManifestError(f"{path}: not a loadable ONNX graph ({said}): re-export") from None


def _outputs_problem(session: ort.InferenceSession, required: tuple[str, ...]) -> str | None:
    """What is wrong with a session's outputs, or None: each of `required` present and every
    `level_*` output float32, as `splitdet export` writes them."""
    kinds = {output.name: output.type for output in session.get_outputs()}
    absent = [name for name in required if name not in kinds]
    if absent:
        return f"has no {', '.join(absent)} output (its outputs: {', '.join(kinds)[:200]})"
    wrong = [f"{name} {kind}" for name, kind in kinds.items() if name.startswith("level_")]
    wrong = [item for item in wrong if not item.endswith(f" {FLOAT32}")]
    if wrong:
        return f"gives {', '.join(wrong)[:200]}, not float32 levels"
    return None


def _p_defect_problem(value: object) -> str | None:
    """What is wrong with a gate's p_defect output, or None: one float from 0 to 1."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        return f"is {kind}, not a float probability"
    if value.size != 1:
        return f"holds {value.size} values, not one"
    p = float(value.reshape(-1)[0])
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        return f"is {p!r}, not a p(defect) from 0 to 1"
    return None


def _level_problem(name: str, value: np.ndarray) -> str | None:
    """What is wrong with a level output, or None: float32, finite."""
    if not isinstance(value, np.ndarray) or value.dtype != np.float32:
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        return f"{name} is {kind}, not float32"
    if not np.isfinite(value).all():
        return f"{name} holds NaN or infinite values"
    return None


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
            manifest: an already verified manifest of `model_dir` (skips re-hashing the
                files: the graphs' bytes are checked against it as they are loaded).

        Raises:
            ManifestError: the export cannot be loaded: its manifest, a graph whose bytes
                differ from its hash, that uses external data, that ONNX Runtime cannot
                load, or whose inputs and outputs are not those `splitdet export` writes.
            ModelMemoryError: not enough memory to load a graph.
        """
        self.model_dir = Path(model_dir)
        # (the graphs' hashes are checked as `_load` reads them: not twice)
        self.manifest = manifest or read_manifest(
            self.model_dir, read_later=(GATE_ONNX, COMPLETE_ONNX)
        )
        providers = providers_for(device)
        self._gate = self._load(GATE_ONNX, session_options(threads), providers, ("p_defect",))
        # No completion graph when the gate reads P2: every level comes out of the gate.
        self._complete = None
        if COMPLETE_ONNX in self.manifest.artifacts:
            self._complete = self._load(COMPLETE_ONNX, session_options(threads), providers, ())
        self._gate_outputs = [o.name for o in self._gate.get_outputs()]
        self._complete_inputs = (
            [i.name for i in self._complete.get_inputs()] if self._complete is not None else []
        )
        self._check_inputs()

    def _load(
        self,
        name: str,
        options: ort.SessionOptions,
        providers: list[str],
        required: tuple[str, ...],
    ) -> ort.InferenceSession:
        """The session of the export's graph `name`, from the bytes checked against the
        manifest, its outputs checked (`_outputs_problem`)."""
        path = self.model_dir / name
        data = read_artifact(self.model_dir, self.manifest, name)
        session = load_session(path, data, options, providers)
        problem = _outputs_problem(session, required)
        if problem is not None:
            raise ManifestError(f"{path}: {problem}: not a graph export writes: re-export")
        return session

    def _check_inputs(self) -> None:
        """ManifestError unless the gate takes `image` alone and the completion's inputs are
        among the gate's outputs."""
        gate_inputs = [i.name for i in self._gate.get_inputs()]
        if gate_inputs != ["image"]:
            raise ManifestError(
                f"{self.model_dir / GATE_ONNX}: takes {', '.join(gate_inputs)[:200]}, not one "
                "image: not a graph `splitdet export` writes: re-export"
            )
        absent = [name for name in self._complete_inputs if name not in self._gate_outputs]
        if absent:
            raise ManifestError(
                f"{self.model_dir / COMPLETE_ONNX}: needs {', '.join(absent)[:200]}, which "
                f"{GATE_ONNX} does not give: not the graphs `splitdet export` writes: re-export"
            )

    def gate(self, batch: np.ndarray) -> EdgeGate:
        """Run the gate on Float32[1, 3, H, W] (normalised, padded to /32)."""
        if batch.ndim != 4 or batch.shape[:2] != (1, 3) or batch.dtype != np.float32:
            raise ValueError(
                f"expected a float32 batch [1, 3, H, W], got {batch.dtype} {batch.shape}"
            )
        outputs = dict(zip(self._gate_outputs, self._gate.run(None, {"image": batch}), strict=True))
        problem = _p_defect_problem(outputs["p_defect"])
        problem = f"p_defect {problem}" if problem else self._levels_problem(outputs)
        if problem is not None:
            raise self._broken(GATE_ONNX, problem)
        levels = {
            name.removeprefix("level_"): value[0]
            for name, value in outputs.items()
            if name.startswith("level_")
        }
        pending = {name: outputs[name] for name in self._complete_inputs}
        p_defect = float(outputs["p_defect"].reshape(-1)[0])
        return EdgeGate(p_defect=p_defect, levels=levels, pending=pending)

    def complete(self, gate: EdgeGate) -> dict[str, np.ndarray]:
        """All five FPN levels, name -> Float32[C, h, w] (the gate's plus the lazy ones)."""
        if self._complete is None:
            return dict(gate.levels)
        names = [o.name for o in self._complete.get_outputs()]
        lazy = self._complete.run(names, gate.pending)
        problem = self._levels_problem(dict(zip(names, lazy, strict=True)))
        if problem is not None:
            raise self._broken(COMPLETE_ONNX, problem)
        completed = {
            name.removeprefix("level_"): value[0] for name, value in zip(names, lazy, strict=True)
        }
        return {**completed, **gate.levels}

    @staticmethod
    def _levels_problem(outputs: dict[str, np.ndarray]) -> str | None:
        """The first problem of the `level_*` outputs among `outputs` (`_level_problem`)."""
        for name, value in outputs.items():
            problem = _level_problem(name, value) if name.startswith("level_") else None
            if problem is not None:
                return problem
        return None

    def _broken(self, name: str, problem: str) -> ModelOutputError:
        """The ModelOutputError of the export's graph `name`, which gave `problem`."""
        return ModelOutputError(
            f"{self.model_dir / name}: {problem}: the export is broken (no verdict taken): "
            "re-export the model"
        )
