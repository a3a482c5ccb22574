"""The exported model directory's manifest (torch-free; the edge and the cloud both read it).

A model directory, as `splitdet export` writes it:

    manifest.json        this file's contents
    edge_gate.onnx       image [1, 3, H, W] -> p(defect), gate levels, what completion needs
    edge_complete.onnx   laterals + top-down state -> the lazy FPN levels (absent when the gate
                         reads P2: then no level is lazy)
    cloud_heads.pt       RPN + ROI head weights (torch state dict: `rpn.*`, `roi_heads.*`)

The fingerprint is a SHA-256 over every artifact's hash, the split spec version and the model
settings; the edge stamps it on every request and the cloud refuses one it does not serve.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitdet.shared import __version__
from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.codec import CODECS
from splitdet.shared.config import ModelConfig
from splitdet.shared.regular_file import open_regular
from splitdet.shared.spec import SIZE_DIVISIBLE, SPEC_VERSION

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
GATE_ONNX = "edge_gate.onnx"
COMPLETE_ONNX = "edge_complete.onnx"
CLOUD_WEIGHTS = "cloud_heads.pt"


#: Written (with the pid of the export) before `splitdet export` renames its first file into a
#: model directory, removed after its last: while it is there, the files may be part old, part
#: new (an export killed between two renames), which `read_manifest` then says so.
PUBLISHING_MARKER = ".splitdet-export-publishing"

#: Every file any model directory may hold besides the manifest.
ALL_ARTIFACTS = (GATE_ONNX, COMPLETE_ONNX, CLOUD_WEIGHTS)


def artifacts_for(model_config: ModelConfig) -> tuple[str, ...]:
    """The files a model directory of `model_config` holds besides the manifest.

    The completion graph exists only when some FPN level is lazy (the gate reads P3 or coarser).
    """
    if model_config.split_spec.lazy_levels:
        return (GATE_ONNX, COMPLETE_ONNX, CLOUD_WEIGHTS)
    return (GATE_ONNX, CLOUD_WEIGHTS)


#: Largest manifest accepted (it is small JSON; anything bigger is not ours).
MAX_MANIFEST_BYTES = 1 << 20


class ManifestError(ValueError):
    """A model directory that cannot be served; the message names the file and the problem."""


def gate_threshold_problem(value: Any) -> str | None:
    """Why `value` cannot be a manifest's gate_threshold, or None: it must be a p(defect) from
    0 to 1, as `splitdet export` writes it (training/export.py refuses any other). NaN would
    judge every image ok, defective ones included, and a value above 1 flags nothing: both
    would pass defects unnoticed (`edge run --threshold P` may still choose such a P on
    purpose; a manifest cannot)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number (p(defect) from 0 to 1), got {repr(value)[:60]}"
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return f"must be a p(defect) from 0 to 1, got {value!r}"
    return None


@dataclass(frozen=True)
class Manifest:
    """What a model directory holds and how to feed it.

    Attributes:
        model_config: the detector's configuration (input sizes, normalisation, split).
        gate_threshold: p(defect) at or above which an image goes to detection.
        default_codec: the feature codec the edge uses unless told otherwise.
        artifacts: file name -> SHA-256 hex digest.
        fingerprint: SHA-256 hex over artifacts, spec version and settings.
        spec_version: the split spec version the model was exported under.
        extra: free-form facts from export (validation errors, source checkpoint, ...).
    """

    model_config: ModelConfig
    gate_threshold: float
    default_codec: str
    artifacts: dict[str, str]
    fingerprint: str
    spec_version: str = SPEC_VERSION
    format: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Foreground class names; label k (1-based) is class_names[k - 1]."""
        return self.model_config.class_names

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as written to manifest.json."""
        return {
            "format": self.format,
            "fingerprint": self.fingerprint,
            "spec_version": self.spec_version,
            "class_names": list(self.class_names),
            "gate_threshold": self.gate_threshold,
            "default_codec": self.default_codec,
            "input": input_settings(self.model_config),
            "model_config": self.model_config.to_dict(),
            "artifacts": dict(sorted(self.artifacts.items())),
            "extra": self.extra,
        }


def edge_gate_kind(manifest: Manifest) -> str:
    """ "int8" for a gate quantised by `export --quantize-edge`, else "float32"."""
    return "int8" if manifest.extra.get("edge_quantization") else "float32"


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def compute_fingerprint(
    artifacts: dict[str, str],
    model_config: ModelConfig,
    gate_threshold: float,
    spec_version: str = SPEC_VERSION,
) -> str:
    """SHA-256 hex over artifact digests, spec version and the settings that change answers
    (a setting added to `ModelConfig` later is hashed only away from its old implied value:
    `config.LATER_FIELDS`, so that older exports keep their fingerprint)."""
    settings = model_config.to_dict()
    canonical = json.dumps(
        {
            "artifacts": dict(sorted(artifacts.items())),
            "spec_version": spec_version,
            "model_config": settings,
            "gate_threshold": gate_threshold,
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(
    model_dir: Path,
    model_config: ModelConfig,
    gate_threshold: float,
    default_codec: str,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Hash the artifacts already in `model_dir` and write manifest.json; returns the manifest."""
    model_dir = Path(model_dir)
    artifacts = {name: file_sha256(model_dir / name) for name in artifacts_for(model_config)}
    manifest = Manifest(
        model_config=model_config,
        gate_threshold=float(gate_threshold),
        default_codec=default_codec,
        artifacts=artifacts,
        fingerprint=compute_fingerprint(artifacts, model_config, float(gate_threshold)),
        extra=extra or {},
    )
    atomic_write(model_dir / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def _checkpoint_in(folder: Path) -> Path | None:
    """The training checkpoint a folder holds (best.pt first, then last.pt, then any *.pt but
    an export's cloud_heads.pt), or None: `folder` is then no training run's."""
    try:
        found = sorted(p for p in folder.glob("*.pt") if p.name != CLOUD_WEIGHTS and p.is_file())
    except OSError:
        return None
    preferred = {"best.pt": 0, "last.pt": 1}
    return min(found, key=lambda p: (preferred.get(p.name, 2), p.name), default=None)


def _artifacts_in(folder: Path) -> list[str]:
    """The names of an export's artifacts (`ALL_ARTIFACTS`) that `folder` holds, whatever
    their kind."""
    return [name for name in ALL_ARTIFACTS if os.path.lexists(folder / name)]


def _no_manifest(model_dir: Path, path: Path) -> str:
    """Why `model_dir` without its manifest `path` is no export: an export that lost its
    manifest (it holds an export's files: half-copied?), a training run's folder (it holds a
    checkpoint: export that first), or no folder `splitdet export` made."""
    if not model_dir.is_dir():
        return f"{path}: missing; is {model_dir} a directory made by splitdet export?"
    held = _artifacts_in(model_dir)
    if held:
        return (
            f"{path}: missing: {model_dir} holds {', '.join(held)} of an export but not its "
            "manifest (half-copied, or damaged?): copy the export again, whole"
        )
    checkpoint = _checkpoint_in(model_dir)
    if checkpoint is None:
        return f"{path}: missing; is {model_dir} a directory made by splitdet export?"
    return (
        f"{path}: missing: {model_dir} is not the folder `splitdet export` makes; it holds "
        f"{checkpoint.name}, a training checkpoint: export it first: splitdet export "
        f"--checkpoint {checkpoint} --out DIR"
    )


def _not_opened(path: Path, exc: OSError, what: str) -> str:
    """Why `path` (the export's `what`: "missing from the model directory", ...) could not be
    opened (`open_regular` raised `exc`): missing, not a regular file (named as what it is: a
    FIFO, a device, a folder), or unreadable."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: {what}"
    if exc.errno == errno.EINVAL and str(exc.strerror).startswith("not a regular file"):
        return (
            f"{path}: {exc.strerror}, not the file `splitdet export` writes: copy the "
            "export again, whole"
        )
    return f"{path}: cannot be read ({exc.strerror or exc})"


def _read_manifest_bytes(model_dir: Path, path: Path) -> bytes:
    """The bytes of `model_dir`'s manifest.json, read once (never waiting on a FIFO)."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise ManifestError(_no_manifest(model_dir, path)) from None
    except OSError as exc:
        raise ManifestError(_not_opened(path, exc, "missing")) from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    return data


def _checked_artifact(model_dir: Path, name: str, expected: str, keep: bool) -> bytes | None:
    """Read the artifact `name` of `model_dir` once and compare its SHA-256 with `expected`;
    its bytes with `keep` (else None, read in chunks). ManifestError naming the file when it
    is missing, not a regular file, unreadable or different (an interrupted export said so)."""
    artifact = model_dir / name
    problem, data = None, None
    try:
        with os.fdopen(open_regular(artifact), "rb") as handle:
            if keep:
                data = handle.read()
                digest = hashlib.sha256(data).hexdigest()
            else:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != expected:
            problem = (
                f"{artifact}: contents differ from the manifest's hash (sha256 "
                f"{digest[:16]}, the manifest lists {str(expected)[:16]}): the file was "
                "changed, or copied from another export; copy the export again, whole "
                "(every file from the same `splitdet export`)"
            )
    except OSError as exc:
        problem = _not_opened(artifact, exc, "missing from the model directory")
    if problem is not None and (model_dir / PUBLISHING_MARKER).exists():
        raise ManifestError(
            f"an export into {model_dir} was interrupted while it replaced its files "
            f"({problem}): run `splitdet export` again"
        )
    if problem is not None:
        raise ManifestError(problem)
    return data


def read_artifact(model_dir: Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of `model_dir`'s artifact `name`, read once and checked against `manifest`'s
    hash of it: load what this returns, never the file by its path again. What is loaded is
    then what was hashed, under `manifest`'s fingerprint, even when the folder is renamed or
    the file replaced meanwhile (a swap since `manifest` was read is refused, not loaded).

    Raises:
        ManifestError: `manifest` lists no such artifact, or the file is missing, not a
            regular file, unreadable, or its bytes differ from the manifest's hash.
    """
    model_dir = Path(model_dir)
    if name not in manifest.artifacts:
        raise ManifestError(f"{model_dir / MANIFEST_NAME}: lists no {name}; re-export the model")
    data = _checked_artifact(model_dir, name, manifest.artifacts[name], keep=True)
    assert data is not None  # (keep=True)
    return data


def _class_names_problem(data: dict[str, Any], model_config: ModelConfig) -> str | None:
    """Why the manifest ``data``'s top-level ``class_names`` (what a reader of the file sees)
    cannot stand beside its ``model_config``'s (what predictions are named by, and what the
    fingerprint covers), or None: they must be the same list, as export writes them. A copy
    edited by hand would load, its predictions named otherwise than it says. A manifest
    without the top-level list is read by model_config's alone."""
    if "class_names" not in data:
        return None
    top, names = data["class_names"], list(model_config.class_names)
    if top == names:
        return None
    shown = [json.dumps(value, ensure_ascii=False) for value in (top, names)]
    if unicodedata.normalize("NFC", shown[0]) == unicodedata.normalize("NFC", shown[1]):
        shown = [json.dumps(value) for value in (top, names)]  # printed alike: escaped
    return (
        f"class_names {shown[0][:300]} differ from model_config's class_names {shown[1]} "
        "(which predictions are named by, and the fingerprint covers): the manifest was "
        "edited; re-export the model, or restore the manifest.json export wrote"
    )


def input_settings(model_config: ModelConfig) -> dict[str, Any]:
    """The manifest's ``input`` block, as export writes it from ``model_config``: how an edge of
    one's own resizes (min_size, max_size: px), normalises (image_mean, image_std: per RGB
    channel, in [0, 1] units), reads pixels (pixel_bits) and pads (size_divisible: px)."""
    return {
        "min_size": model_config.min_size,
        "max_size": model_config.max_size,
        "image_mean": list(model_config.image_mean),
        "image_std": list(model_config.image_std),
        "pixel_bits": model_config.pixel_bits,
        "size_divisible": SIZE_DIVISIBLE,
    }


#: What to do about an export a newer splitdet made (a manifest refusal ends with it).
_UPGRADE = (
    "upgrade splitdet here to the version that made the export (`splitdet --version` on both "
    "machines), or re-export the model with this one"
)


def _made_by(data: dict[str, Any]) -> str:
    """The splitdet that exported the manifest ``data`` as its extra records it (export
    writes extra.splitdet), as ", made by splitdet VERSION"; "" when it records none."""
    extra = data.get("extra")
    made = extra.get("splitdet") if isinstance(extra, dict) else None
    return f", made by splitdet {made[:80]}" if isinstance(made, str) and made else ""


def _newer(found: Any, ours: int | str) -> bool:
    """Whether the version `found` in a manifest is a later one than `ours` (both read as
    whole numbers; False when `found` is none)."""
    try:
        return not isinstance(found, bool) and int(found) > int(ours)
    except (TypeError, ValueError):
        return False


def _version_problem(data: dict[str, Any]) -> str | None:
    """Why this splitdet cannot read the manifest ``data`` by its ``format`` and
    ``spec_version`` (each shown as JSON, so that the text "1" and the number 1 read apart),
    naming both versions, the splitdet that made the export and what to do: upgrade this
    splitdet for a newer one, re-export for an older one, restore a hand-edited one; None
    when it can."""
    for key, ours, what in (
        ("format", MANIFEST_FORMAT, "manifest format"),
        ("spec_version", SPEC_VERSION, "split spec"),
    ):
        found = data.get(key)
        if found == ours and type(found) is type(ours):
            continue
        shown, wanted = json.dumps(found)[:60], json.dumps(ours)
        reads = f"this splitdet ({__version__}) reads {what} {wanted}"
        if key not in data:
            return (
                f"no {key} ({what}); {reads}: not a manifest `splitdet export` wrote (cut short, "
                "or edited?): copy the export again, whole, or re-export the model"
            )
        if str(found) == str(ours):
            return (
                f"{key} {shown} where export writes {wanted} ({what}): the manifest was "
                "edited; restore the manifest.json export wrote, or re-export the model"
            )
        if _newer(found, ours):
            return f"{key} {shown} ({what}){_made_by(data)}; {reads}: {_UPGRADE}"
        return f"{key} {shown} ({what}){_made_by(data)}; {reads}: re-export the model with this one"
    return None


def _unknown_keys(data: dict[str, Any]) -> str:
    """What a refusal of the manifest ``data``'s model_config adds when it holds settings this
    splitdet does not know (a newer splitdet's export): who made it and what to do; "" when
    it holds none."""
    config = data.get("model_config")
    if not isinstance(config, dict) or not set(config) - set(ModelConfig.__dataclass_fields__):
        return ""
    return f" (settings this splitdet ({__version__}) does not know{_made_by(data)}): {_UPGRADE}"


def _input_problem(data: dict[str, Any], model_config: ModelConfig) -> str | None:
    """Why the manifest ``data``'s ``input`` (how an edge of one's own resizes, pads and
    normalises: proto/README.md) cannot stand beside its ``model_config`` (which splitdet's
    edge and cloud go by, and the fingerprint covers), or None: each value it holds must be
    the one export writes from model_config. A hand-edited copy would have the two kinds of
    edge feed the same export differently (other boxes, or every request refused). A key it
    lacks (an older export's) or one this splitdet does not know (a newer one's) is not
    compared; a manifest without ``input`` is read by model_config alone."""
    given = data.get("input")
    if given is None:
        return None
    if not isinstance(given, dict):
        return f"input must be an object of the input settings, got {json.dumps(given)[:60]}"
    for key, value in input_settings(model_config).items():
        if key in given and given[key] != value:
            source = "the split spec's" if key == "size_divisible" else "model_config's"
            return (
                f"input.{key} {json.dumps(given[key])[:60]} differs from {source} "
                f"{json.dumps(value)} (which splitdet's edge and cloud go by, and the fingerprint "
                "covers; an edge of your own reads input): the manifest was edited; re-export "
                "the model, or restore the manifest.json export wrote"
            )
    return None


def read_manifest(
    model_dir: Path, verify: bool = True, read_later: tuple[str, ...] = ()
) -> Manifest:
    """Read and check a model directory's manifest.

    With `verify`, every artifact's SHA-256 is recomputed and compared, and the fingerprint is
    recomputed: a model directory edited after export is refused, never half-served. The
    artifacts named in `read_later` are left to the caller, who loads them with
    `read_artifact` (which checks the same hash of the bytes it returns): not hashed twice.
    The model configuration (`ModelConfig`) and the gate threshold are checked field by field
    whether or not: a manifest whose fingerprint matches is not trusted for that (anyone who
    can write the folder can make one).

    Raises:
        ManifestError: the manifest is missing, malformed, of another format or spec, holds a
            model_config field of the wrong type or out of range (the message names the field,
            its value and the range), a top-level class_names other than model_config's,
            holds a gate_threshold that is not a p(defect) from 0 to
            1 (NaN, negative, above 1), or (with `verify`) does not match the files.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if model_dir.is_file():
        raise ManifestError(
            f"{model_dir}: a file, not the folder `splitdet export` makes (a checkpoint? "
            f"export it first: splitdet export --checkpoint {model_dir} --out DIR)"
        )
    raw = _read_manifest_bytes(model_dir, path)
    try:
        data = json.loads(raw.decode())
        version_problem = _version_problem(data)
        if version_problem is not None:
            raise ManifestError(f"{path}: {version_problem}")
        try:
            model_config = ModelConfig.from_dict(data["model_config"])
        except (ValueError, TypeError) as exc:  # a value of the wrong type or out of range
            raise ManifestError(f"{path}: model_config: {exc}{_unknown_keys(data)}") from None
        names_problem = _class_names_problem(data, model_config)
        if names_problem is None:
            names_problem = _input_problem(data, model_config)
        if names_problem is not None:
            raise ManifestError(f"{path}: {names_problem}")
        codec = data["default_codec"]
        if codec not in CODECS:
            raise ManifestError(
                f"{path}: default_codec {json.dumps(codec)[:60]} is none this splitdet "
                f"({__version__}) knows ({', '.join(CODECS)}){_made_by(data)}: {_UPGRADE}"
            )
        threshold_problem = gate_threshold_problem(data["gate_threshold"])
        if threshold_problem is not None:
            raise ManifestError(
                f"{path}: gate_threshold {threshold_problem}; `splitdet export` writes no other: "
                "re-export the model"
            )
        manifest = Manifest(
            model_config=model_config,
            gate_threshold=float(data["gate_threshold"]),
            default_codec=str(data["default_codec"]),
            artifacts={str(k): str(v) for k, v in data["artifacts"].items()},
            fingerprint=str(data["fingerprint"]),
            spec_version=data["spec_version"],
            extra=dict(data.get("extra") or {}),
        )
    except ManifestError:
        raise
    except RecursionError:  # JSON nested deeper than the parser follows: no manifest is
        raise ManifestError(f"{path}: malformed manifest (JSON nested too deep)") from None
    except KeyError as exc:  # a key export writes is missing (a partly copied or edited file)
        raise ManifestError(
            f"{path}: malformed manifest: it lacks {exc}, which `splitdet export` writes (cut "
            "short, or edited?): copy the export again, whole, or re-export the model"
        ) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({exc!r})") from exc
    expected_artifacts = artifacts_for(manifest.model_config)
    if set(manifest.artifacts) != set(expected_artifacts):
        raise ManifestError(
            f"{path}: lists artifacts {sorted(manifest.artifacts)}, expected "
            f"{sorted(expected_artifacts)}"
        )
    if verify:
        for name, expected in manifest.artifacts.items():
            if name not in read_later:
                _checked_artifact(model_dir, name, expected, keep=False)
        recomputed = compute_fingerprint(
            manifest.artifacts, manifest.model_config, manifest.gate_threshold
        )
        if recomputed != manifest.fingerprint:
            raise ManifestError(
                f"{path}: fingerprint does not match the manifest's contents (its "
                f"fingerprint {manifest.fingerprint[:16]}, its artifacts and settings hash to "
                f"{recomputed[:16]}): the manifest was edited, or pieced together from "
                "several exports; copy the export again, whole, or re-export the model"
            )
    return manifest
