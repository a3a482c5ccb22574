"""Write ``train``/``val``/``test`` split files for a VOC dataset that has none (or new ones).

Annotation tools (LabelImg, CVAT, Label Studio) export ``Annotations/`` and ``JPEGImages/``
but seldom the splits splitdet reads, and many write no annotation at all for an image with
no box, which for defect inspection is every good part. `split_dataset` divides the
annotated images at random (deterministic per seed), stratified so that each split gets its
share of defect-free images and of every class; with ``write_empty`` it first gives each image
without one an annotation with no object (a defect-free image).

Only the standard library and Pillow (through `voc`): no numpy, no torch.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splitdet.training import voc
from splitdet.training.voc_check import SPLITS, annotated_ids, image_ids

__all__ = ["SplitResult", "split_dataset", "stratum_of", "unannotated_samples"]

#: The stratum of a defect-free image (a defective one's is its rarest class).
DEFECT_FREE = ""


@dataclass
class SplitResult:
    """The ids written per split, and the empty annotations written for unannotated images."""

    ids: dict[str, list[str]]
    paths: dict[str, Path]
    empty_annotations: list[Path]
    added: dict[str, int]  # ids new in each split (all of them without ``add``)

    def counts(self) -> dict[str, int]:
        """Images per split."""
        return {name: len(ids) for name, ids in self.ids.items()}


def unannotated_samples(root: Path) -> list[voc.VocSample]:
    """A sample with no object for every image of ``ROOT/JPEGImages`` without an annotation,
    sized from its header (`voc.VocError` names an image Pillow cannot read)."""
    root = Path(root)
    have = set(annotated_ids(root))
    samples = []
    for image_id, path in sorted(image_ids(root).items()):
        if image_id not in have:
            width, height = voc.image_size(path)
            samples.append(voc.VocSample(image_id, path, width, height, ()))
    return samples


def stratum_of(sample: voc.VocSample, class_counts: Counter) -> str:
    """The group a sample is split within: ``DEFECT_FREE``, or its rarest class overall."""
    if not sample.is_defective:
        return DEFECT_FREE
    return min((obj.name for obj in sample.objects), key=lambda n: (class_counts[n], n))


def _shares(n: int, fractions: Sequence[float]) -> list[int]:
    """``n`` items divided by ``fractions`` (summing to 1), rounded so the sizes add to ``n``
    (largest remainders first)."""
    exact = [n * f for f in fractions]
    sizes = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda k: (sizes[k] - exact[k], k))
    for k in order[: n - sum(sizes)]:
        sizes[k] += 1
    return sizes


def split_dataset(
    root: Path,
    *,
    val: float = 0.2,
    test: float = 0.1,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    write_empty: bool = False,
    add: bool = False,
) -> SplitResult:
    """Write ``ImageSets/Main/{train,val,test}.txt`` over every annotation under ``root``.

    ``val``/``test``: the share of each stratum (defect-free images, and defective images by
    their rarest class) that goes to each split; the rest trains. A split with share 0 is
    written empty only if it existed before (so stale ids never linger), else not at all.
    ``write_empty``: give every image without an annotation one with no object first.
    ``add``: keep every id the existing split files list where it is, and divide only the
    annotations in no split among them (new images collected from the line join the splits,
    and no image moves, so an earlier test split stays held out).
    Nothing is written unless everything can be: raises `voc.VocError` naming the first
    annotation or image that cannot be read, `FileExistsError` when split files exist and not
    ``overwrite``, and `ValueError` for shares out of range.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val {val} and test {test} must each be in [0, 1) and sum below 1")
    root = Path(root)
    split_dir = root / "ImageSets" / "Main"
    existing = [s for s in SPLITS if (split_dir / f"{s}.txt").is_file()]
    kept = {s: voc.read_split_ids(root, s) for s in existing} if add else {}
    if existing and not overwrite and not add:
        raise FileExistsError(
            f"{split_dir}: already holds {', '.join(s + '.txt' for s in existing)}"
        )
    empty = unannotated_samples(root) if write_empty else []
    ids = annotated_ids(root)
    if not ids and not empty:
        raise voc.VocError(f"{root / 'Annotations'}: no annotation (*.xml) to split")
    samples, problems = list(empty), []
    for image_id in ids:
        try:
            samples.append(voc.read_annotation(root, image_id, class_names))
        except voc.VocError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more; `splitdet data check` lists all)"
        raise voc.VocError(problems[0] + (more if len(problems) > 1 else ""))
    written = []
    for sample in empty:
        target = root / "Annotations" / f"{sample.image_id}.xml"
        voc.write_annotation(target, sample)
        written.append(target)

    class_counts = Counter(obj.name for s in samples for obj in s.objects)
    listed = {image_id for ids_ in kept.values() for image_id in ids_}
    strata: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        if sample.image_id not in listed:
            strata[stratum_of(sample, class_counts)].append(sample.image_id)
    rng = random.Random(seed)
    chosen: dict[str, list[str]] = {s: [] for s in SPLITS}
    for stratum in sorted(strata):
        members = sorted(strata[stratum])
        rng.shuffle(members)
        n_train, n_val, _ = _shares(len(members), (1 - val - test, val, test))
        chosen["train"] += members[:n_train]
        chosen["val"] += members[n_train : n_train + n_val]
        chosen["test"] += members[n_train + n_val :]
    paths, ids_written = {}, {}
    for split in SPLITS:
        if chosen[split] or split == "train" or split in existing:
            ids_written[split] = kept.get(split, []) + sorted(chosen[split])
            paths[split] = voc.write_split(root, split, ids_written[split])
    return SplitResult(
        ids=ids_written,
        paths=paths,
        empty_annotations=written,
        added={s: len(chosen[s]) for s in paths},
    )
