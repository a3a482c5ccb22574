"""Provenance: what ties a reported figure to the code and the bytes it came from.

`splitdet_version` (from `splitdet.shared.version`: what `splitdet --version` names),
`data_digest` (a split's image ids with their annotation and image bytes), `data_record` (a
split as the eval JSON names it),
`checkpoint_record` (a checkpoint by its weights' digest: the one an export's manifest records
as ``extra.weights_sha256``, so that an evaluation of a checkpoint is matched with the export
deployed from it) and `training_segment` (what a training run, or a resume of it, started on).

Stdlib only at import time (the eval and export commands import it before torch): torch loads
when a checkpoint's weights are digested.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitdet.shared.version import splitdet_version

if TYPE_CHECKING:
    import torch

    from splitdet.training.voc_types import VocSample


#: Bytes read from a file at a time while it is hashed.
CHUNK_BYTES = 1 << 20


def data_digest(root: Path | str, samples: Sequence[VocSample]) -> str:
    """SHA-256 hex over the data of `samples` (a split of the VOC tree at `root`, as
    `voc.read_split` reads it), which tells whether two splits hold the same bytes.

    Covered, for each sample in the order of its image id: the id, the bytes of its annotation
    (``ROOT/Annotations/ID.xml``) and of its image file (``sample.image_path``: its name, e.g.
    ``img_001.png``, too), each file framed by its size, so that no two different splits hash
    alike. Not covered: where the tree is (a moved or copied folder keeps its digest), the
    split file's order, comments and other columns, and the files no listed id names (other
    splits, class lists). Files are read in `CHUNK_BYTES` chunks, never whole. ValueError
    naming the file when one cannot be read, or changes while it is read as far as its size and
    modification time tell (best effort: a rewrite in place within the file system's time
    resolution, keeping the size, is not seen). The bytes a command then scores are read
    again: a file changed between the two is not seen either."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    for sample in sorted(samples, key=lambda s: s.image_id):
        annotation = Path(root) / "Annotations" / f"{sample.image_id}.xml"
        try:
            sizes = annotation.stat().st_size, sample.image_path.stat().st_size
        except OSError as exc:
            raise ValueError(_unreadable(exc)) from None
        header = f"{sample.image_id}\0{sizes[0]}\0{sample.image_path.name}\0{sizes[1]}\n"
        digest.update(header.encode("utf-8", "surrogateescape"))
        for path, size in zip((annotation, sample.image_path), sizes, strict=True):
            _hash_file(digest, path, size, buffer)
    return digest.hexdigest()


def _hash_file(digest: hashlib._Hash, path: Path, size: int, buffer: bytearray) -> None:
    """Feed `path`'s bytes into `digest`, read into `buffer` chunk by chunk; ValueError when it
    cannot be read, or holds other than `size` bytes (it changed since its size was taken)."""
    view, read = memoryview(buffer), 0
    try:
        with open(path, "rb", buffering=0) as handle:
            before = os.fstat(handle.fileno())
            while count := handle.readinto(view):
                digest.update(view[:count])
                read += count
            after = os.fstat(handle.fileno())
    except OSError as exc:
        raise ValueError(_unreadable(exc)) from None
    if read != size or (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size):
        raise ValueError(f"{path}: changed while its digest was taken ({size} bytes, then {read})")


def _unreadable(exc: OSError) -> str:
    """The message of a file `data_digest` cannot read."""
    return f"{exc.filename}: cannot read it for the data's digest ({exc.strerror or exc})"


def data_record(root: Path | str, split: str, samples: Sequence[VocSample]) -> dict[str, Any]:
    """{"path": `root` made absolute, "split", "images": how many, "sha256": `data_digest`}:
    the split `samples` were read from, as the eval JSON's provenance names it."""
    return {
        "path": str(Path(root).resolve()),
        "split": split,
        "images": len(samples),
        "sha256": data_digest(root, samples),
    }


def checkpoint_record(
    path: Path | str, model: torch.nn.Module, checkpoint: dict[str, Any]
) -> dict[str, Any]:
    """{"path": `path` made absolute, "weights_sha256", "epoch"} of the checkpoint file at
    `path`, loaded as `model` (its dict: `checkpoint`). "weights_sha256" is
    `checkpoint.weights_digest`, the digest `splitdet export` records in its manifest's
    ``extra.weights_sha256``: it names the weights, not the file, which `splitdet eval` may
    rewrite to store a calibrated threshold. "epoch": the last epoch trained (None: not a
    training run's)."""
    from splitdet.shared.checkpoint import weights_digest

    return {
        "path": str(Path(path).resolve()),
        "weights_sha256": weights_digest(model),
        "epoch": checkpoint.get("epoch"),
    }


def training_segment(
    root: Path | str,
    train: Sequence[VocSample],
    validation: Sequence[VocSample],
    started_epoch: int,
    precision: str,
) -> dict[str, Any]:
    """What a training run, or one resume of it, starts on: {"path": the dataset made
    absolute, "train_sha256" and "train_images" (`data_digest` of the `train` split),
    "val_sha256" and "val_images" (of the `validation` images its validation passes evaluate;
    None and 0 without), "started_epoch", "splitdet" (the version) and "precision_used"
    (`precision` as resolved: "bf16" or "fp32")}."""
    return {
        "path": str(Path(root).resolve()),
        "train_sha256": data_digest(root, train),
        "train_images": len(train),
        "val_sha256": data_digest(root, validation) if validation else None,
        "val_images": len(validation),
        "started_epoch": started_epoch,
        "splitdet": splitdet_version(),
        "precision_used": precision,
    }
