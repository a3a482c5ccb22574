"""The image and annotation files of a PASCAL VOC dataset, for `voc_check.check_dataset`.

Which ids ``Annotations`` and ``JPEGImages`` hold (`annotated_ids`, `image_ids`,
`image_files`), reading one annotation and its image (`_read_one`), and the checks across
them: images no annotation points at (`unannotated_images`, `_check_images`), annotations
whose <filename> names another image (`_check_filenames`), 16-bit images whose values stop
well below the bits they are scaled by (`_narrow_sixteen_bit`).

Only the standard library, the model config and `voc`: no torch.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from splitdet.shared.config import pixel_full_scale
from splitdet.training import voc
from splitdet.training.voc_check_report import DatasetReport
from splitdet.training.voc_layout import unread_annotations

__all__ = ["annotated_ids", "image_files", "image_ids", "unannotated_images"]

#: A 16-bit image whose pixels all lie below (full scale + 1) / this holds values of 4 bits
#: fewer than `pixel_bits` says, or fewer still (12-bit values, unscaled, read as 16-bit ones).
NARROW_FACTOR = 16
#: Bit depths cameras give (GenICam Mono8, Mono10, Mono12, Mono14, Mono16).
CAMERA_BITS = (8, 10, 12, 14, 16)


def _stem_files(
    folder: Path, suffixes: Sequence[str], any_case: bool = True
) -> dict[str, list[Path]]:
    """``{stem: paths}`` of the regular files in ``folder`` whose suffix is in ``suffixes`` (in
    any case, unless not ``any_case``), in name order; hidden files skipped."""
    if not folder.is_dir():
        return {}
    wanted = {s.lower() for s in suffixes} if any_case else set(suffixes)
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower() if any_case else path.suffix
        if suffix in wanted and not path.name.startswith(".") and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def _first_of_each(files: dict[str, list[Path]]) -> dict[str, Path]:
    """``{stem: its first path}`` of a `_stem_files` listing."""
    return {stem: paths[0] for stem, paths in files.items()}


def annotated_ids(root: Path) -> list[str]:
    """Sorted ids of ``ROOT/Annotations/*.xml`` (the readers look for ``ID.xml`` exactly)."""
    return sorted(_stem_files(Path(root) / "Annotations", (".xml",), any_case=False))


def image_ids(root: Path) -> dict[str, Path]:
    """``{id: image path}`` for every image file in ``ROOT/JPEGImages`` (the first in name
    order of an id with several)."""
    return _first_of_each(image_files(root))


def image_files(root: Path) -> dict[str, list[Path]]:
    """``{id: its image files}`` in ``ROOT/JPEGImages`` (``a.jpg`` and ``a.png``: two)."""
    return _stem_files(Path(root) / "JPEGImages", voc.IMAGE_EXTENSIONS)


def _read_one(
    root: Path,
    image_id: str,
    class_names: Sequence[str] | None,
    decode: bool,
    pixel_bits: int,
) -> tuple[voc.VocSample | str, int | None]:
    """(The sample, or the problem line naming the file; with `decode`, the peak value of a
    16-bit image, else None)."""
    try:
        sample = voc.read_annotation(root, image_id, class_names, check_image=True)
        if decode:
            image, peak = voc.load_rgb_and_peak(sample.image_path, pixel_bits)
            image.close()
            return sample, peak
        return sample, None
    except voc.VocError as exc:
        return str(exc), None


def _narrow_sixteen_bit(report: DatasetReport, peaks: dict[Path, int], pixel_bits: int) -> None:
    """Warn of 16-bit images whose values stop 4 bits or more below `pixel_bits` (a Mono10 or
    Mono12 camera saving its values unscaled, read as 16-bit ones): scaled by 2**pixel_bits - 1
    as the edge scales them they are dark, and training's 8 bits leave them a few grey levels."""
    full_scale = pixel_full_scale(pixel_bits)
    narrow = {p: peak for p, peak in peaks.items() if peak < (full_scale + 1) // NARROW_FACTOR}
    if not narrow:
        return
    path, peak = max(narrow.items(), key=lambda item: item[1])
    bits = next(b for b in CAMERA_BITS if peak < 1 << b)
    report.warnings.append(
        f"{path}: one of {len(narrow)} 16-bit images whose pixels stop at {peak} of "
        f"{full_scale} (a {bits}-bit camera's values saved unscaled?): with --pixel-bits "
        f"{pixel_bits}{' (the default)' if pixel_bits == 16 else ''} splitdet scales them by "
        f"{full_scale}, on the edge as in training, so the "
        f"model sees dark images, and training's 8 bits keep {peak * 255 // full_scale + 1} grey "
        f"levels of them; give the bits the camera uses (data check and train --pixel-bits "
        f"{bits}: the export carries it to the edge), or have the camera write its values "
        "scaled to the full range"
    )


def unannotated_images(
    images: dict[str, Path], annotated: set[str], samples: Iterable[voc.VocSample]
) -> list[tuple[str, Path]]:
    """(id, path) of the ``images`` (`image_ids`) that have no annotation of their name
    (``annotated``: `annotated_ids`) and are not the image of one of ``samples`` through its
    <filename>, by id."""
    used = {sample.image_path.resolve() for sample in samples}
    return [
        (image_id, path)
        for image_id, path in sorted(images.items())
        if image_id not in annotated and path.resolve() not in used
    ]


def _check_images(
    report: DatasetReport,
    files: dict[str, list[Path]],
    annotated: set[str],
    samples: dict[str, voc.VocSample],
) -> None:
    """Images no annotation points at, images two annotations point at, and ids with two
    images (only one of them is used); ``files``: `image_files`."""
    images = _first_of_each(files)
    unread = unread_annotations(report.root)
    for image_id, path in unannotated_images(images, annotated, samples.values()):
        twin = voc.normalisation_note(
            report.root / "Annotations", f"{image_id}.xml", looked_for_by=path
        )
        hidden = unread.get(_id_key(image_id))
        if hidden and not twin:  # (not --write-empty: that would lose its boxes)
            twin = (
                f"; {hidden[0].path} is its annotation, which splitdet does not read: "
                f"{hidden[0].fix}"
            )
        advice = twin or (
            "; a defect-free image needs one with no <object> (`splitdet data split "
            "--write-empty` writes them; add --add when split files exist)"
        )
        report.problems.append(f"{path}: no annotation (Annotations/{image_id}.xml){advice}")
    users: dict[Path, list[str]] = {}
    for image_id, sample in samples.items():
        users.setdefault(sample.image_path.resolve(), []).append(image_id)
    for path, ids in sorted(users.items()):
        if len(ids) > 1:
            report.problems.append(
                f"{path}: the image of {len(ids)} annotations ({', '.join(sorted(ids))}); keep one"
            )
    for image_id, paths in sorted(files.items()):
        used = samples[image_id].image_path if image_id in samples else None
        if used is not None and len(paths) > 1:
            unused = [p.name for p in paths if p.resolve() != used.resolve()]
            report.warnings.append(
                f"{used}: one of {len(paths)} images of id {image_id}; {', '.join(unused)} "
                "never used (an annotation's <filename> chooses among them): remove or rename it"
            )


def _id_key(name: str) -> str:
    """An id as `_check_filenames` compares them: NFC, any case (tools writing <filename>
    on Windows or macOS may change either)."""
    return unicodedata.normalize("NFC", name).casefold()


def _check_filenames(
    report: DatasetReport, files: dict[str, list[Path]], samples: dict[str, voc.VocSample]
) -> None:
    """Warnings for annotations whose <filename> names another image than the one they are
    paired with (`voc.read_annotation`: their own id's). One naming the image of another id of
    the dataset is the sign of an annotation copied from that image's, boxes and all: one
    warning each. One naming no image of the dataset (a camera's or a tool's own name, often
    harmless): one line for them all. ``files``: `image_files`."""
    ids = {_id_key(image_id): image_id for image_id in files}
    foreign: list[tuple[voc.VocSample, str]] = []  # (sample, the bare name it gives)
    for image_id, sample in sorted(samples.items()):
        named = voc.bare_filename(sample.filename)
        if named is None:
            continue
        own = (_id_key(image_id), _id_key(sample.image_path.stem))
        stem = _id_key(os.path.splitext(named)[0])
        if stem in own or _id_key(named) in own:  # (an id with a dot, written without suffix)
            continue  # its own image, maybe of another extension or case
        annotation = report.root / "Annotations" / f"{image_id}.xml"
        other = ids.get(stem) or ids.get(_id_key(named))
        if other is None:
            foreign.append((sample, named))
            continue
        report.warnings.append(
            f"{annotation}: <filename> names {named}, the image of id {other}, but splitdet "
            f"pairs this annotation with its own image {sample.image_path.name}: copied from "
            f"{other}'s annotation, boxes and all? Check its boxes on {sample.image_path.name}, "
            "then write that name in <filename>"
        )
    if foreign:
        sample, named = foreign[0]
        report.warnings.append(
            f"{report.root / 'Annotations'}: {len(foreign)} annotation(s) name a <filename> "
            f"other than their own image, e.g. {sample.image_id}.xml names {named!r} "
            f"(its image: {sample.image_path.name}); splitdet pairs each annotation with its "
            "own id's image"
        )
