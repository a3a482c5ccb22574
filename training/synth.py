"""Synthetic titanium-gasket inspection images with scratches, and VOC datasets of them.

The paper's images (2448x2048, PASCAL VOC) are private; these modules render look-alikes
procedurally, with numpy and Pillow only, deterministically from a seed. This one writes the
datasets (`generate_dataset`, behind `splitdet synth`); one image is `synth_image`'s
`generate_image`, composed of the part and its texture (`synth_part`), the scratches
(`synth_scratches`) and the look-alikes (`synth_lookalikes`).

What an image holds
-------------------
- A machined ring (annulus, sometimes with bolt holes) on a dark fixture, slightly off-centre and
  of slightly varying size. The metal has concentric lathe marks (a random radial profile with a
  fine ripple), anisotropic grain (noise streaked along the turning direction), bevels at the
  edges lit from one side, the "bow-tie" specular lobe of a turned surface, slow illumination
  drift, and signal-dependent sensor noise.
- Scratches (class ``scratch``), on defective images only: thin straight or curved (quadratic
  Bezier) strokes, 1-6 px wide, 30 px to ~1400 px long at 2448x2048, bright or dark, strong to
  faint (5-16 times the local clutter: texture detail and sensor noise), with intermittent
  strength and tapered ends. They are rasterised (distance to a polyline, anti-aliased),
  clipped to the metal, so every scratch pixel is known: its box is the bounding box of the
  pixels it changes by at least one unit of that clutter, so a box never claims an invisible
  tail. Scratches whose visible part is too short are re-drawn.
- Sizes. The part, its texture and every length scale with the image; stroke and speck *widths*
  stay in output pixels (1-6 px at any size). A smaller image is a faster stand-in for the
  camera's, in which a scratch looks to a detector as it would at full resolution; scaled, most
  scratches would be sub-pixel at 612x512 (version 1 did that, with a 1 px floor). A scratch
  stays a stroke at every size: at 2448x2048 the shortest (30 px) is five times the widest
  (6 px), and smaller images keep that ratio as a floor on the length (version 2 scaled the
  length alone, so at 612x512 a 6 px wide scratch could be 8 px long: a dot like a dust speck).
  The shortest scratch (30 px) and the shortest tool mark (25 px) keep their camera lengths at
  every size, as widths and dust specks do; the longest scale with the part. (Version 3 scaled
  the floor too: at 612x512 a scratch could be 10 px long beside dust specks of up to 7 px, a
  ratio the camera's images never show; 9% of its test scratches were under 20 px.)
- Look-alikes that are *not* scratches, on every image: dust specks, soft stains, and short low-
  contrast tool marks that follow the lathe direction (concentric arcs). A gate has to learn the
  difference, not just "anything on the metal".

Colour. Industrial cameras for this are usually monochrome; the images are saved as 3-channel
RGB JPEG (quality 90-95, chosen per image) so any VOC tool and any ImageNet-style model reads them.
The three channels are the same mono rendering times a slight per-image white-balance tint (a
warm titanium grey), so they differ by a few grey levels at most.

Determinism. Image ``index`` of stream ``stream`` under ``seed`` is drawn from
``numpy.random.SeedSequence([seed, stream, index])``: it does not depend on which process renders
it or in what order, so parallel generation writes the same bytes as serial generation.
`generate_dataset` uses stream 0 for train/val and stream 1 for the held-out test split.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitdet.training import voc
from splitdet.training.synth_image import (
    CLASS_NAME,
    FULL_SIZE,
    GENERATOR_VERSION,
    STREAM_TEST,
    STREAM_TRAINVAL,
    check_size,
    generate_image,
    save_jpeg,
)

__all__ = [
    "DatasetSummary",
    "SyntheticDatasetExists",
    "generate_dataset",
]


@dataclass(frozen=True)
class DatasetSummary:
    """What `generate_dataset` wrote."""

    root: Path
    counts: dict[str, dict[str, int]]  # split -> {"defective": n, "free": n, "boxes": n}
    seconds: float
    seconds_per_image: float  # summed over workers: the per-core cost

    def to_json(self) -> dict:
        """The summary as a JSON-able dict (times in seconds, rounded)."""
        return {
            "root": str(self.root),
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "seconds_per_image": round(self.seconds_per_image, 4),
        }


@dataclass(frozen=True)
class _Task:
    root: str
    image_id: str
    seed: int
    stream: int
    index: int
    size: tuple[int, int]
    defective: bool


def _ignore_interrupts() -> None:
    """A render worker's start: SIGINT ignored (see `generate_dataset`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _render_task(task: _Task) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    img = generate_image(task.seed, task.index, task.size, task.defective, stream=task.stream)
    root = Path(task.root)
    image_path = root / "JPEGImages" / f"{task.image_id}.jpg"
    save_jpeg(img.image, image_path, img.jpeg_quality)
    sample = voc.VocSample(
        image_id=task.image_id,
        image_path=image_path,
        width=task.size[0],
        height=task.size[1],
        objects=tuple(voc.VocObject(CLASS_NAME, tuple(map(float, b)), False) for b in img.boxes),
    )
    voc.write_annotation(root / "Annotations" / f"{task.image_id}.xml", sample)
    return task.image_id, len(img.boxes), time.perf_counter() - t0


_MARKER = "splitdet.training.synth"


class SyntheticDatasetExists(FileExistsError):
    """``out`` holds an earlier synthetic dataset, which ``overwrite`` would replace (any other
    `FileExistsError` of `generate_dataset` is a folder it never writes into)."""


def _prepare_root(out: Path, overwrite: bool) -> None:
    """Make ``out``'s VOC folders, emptying those of an earlier synthetic dataset when
    ``overwrite``; `FileExistsError` for anything else there."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "dataset.json"
        ours = False
        if meta.is_file():
            try:
                ours = json.loads(meta.read_text()).get("generator") == _MARKER
            except (OSError, ValueError):
                ours = False
        if not ours:
            raise FileExistsError(
                f"{out} is not empty and is not a splitdet synthetic dataset, so it is never "
                "overwritten"
            )
        if not overwrite:
            raise SyntheticDatasetExists(f"{out} already holds a synthetic dataset")
        for sub in ("JPEGImages", "Annotations", "ImageSets"):
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out: Path,
    seed: int = 0,
    size: tuple[int, int] = FULL_SIZE,
    n_defective: int = 540,
    n_free: int = 200,
    val_fraction: float = 0.2,
    n_test_defective: int = 108,
    n_test_free: int = 40,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> DatasetSummary:
    """Write a PASCAL VOC dataset of synthetic gasket images to ``out``.

    Defaults follow the paper: 540 defective + 200 defect-free images, split 80/20 into train
    (432 + 160) and val (108 + 40), plus a held-out ``test`` split (108 + 40) drawn from a
    separate seed stream. Files: ``JPEGImages/*.jpg``, ``Annotations/*.xml``,
    ``ImageSets/Main/{train,val,test}.txt``, ``dataset.json`` (settings) and ``README.md``.
    Image ids (``gasket_00000``...) are shuffled so they reveal neither split nor label.

    ``workers``: processes (default: all cores; 1 renders in this process). The output does not
    depend on it. Workers are started with "spawn", so a script calling this with ``workers > 1``
    needs the usual ``if __name__ == "__main__":`` guard. ``overwrite``: replace a previous
    synthetic dataset at ``out`` (without it: `SyntheticDatasetExists`); anything else in a
    non-empty ``out`` is refused (FileExistsError), and nothing but our own sub-folders is ever
    deleted.
    """
    out = Path(out)
    width, height = int(size[0]), int(size[1])
    _check_arguments(
        (width, height), val_fraction, n_defective, n_free, n_test_defective, n_test_free
    )
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))

    planned = _planned_counts(n_defective, n_free, val_fraction, n_test_defective, n_test_free)
    tasks, splits = _plan_tasks(out, seed, (width, height), planned)

    _prepare_root(out, overwrite)
    settings = _settings(seed, (width, height), val_fraction, planned)
    meta_path = out / "dataset.json"
    meta_path.write_text(json.dumps(settings, indent=2) + "\n")

    t0 = time.perf_counter()
    n_boxes, busy = _render_all(tasks, workers, progress)
    seconds = time.perf_counter() - t0

    for split, ids in splits.items():
        voc.write_split(out, split, ids)
    counts = _split_counts(splits, n_boxes)
    settings["counts"] = counts
    settings["complete"] = True
    meta_path.write_text(json.dumps(settings, indent=2) + "\n")
    (out / "README.md").write_text(_readme(settings))
    return DatasetSummary(
        root=out,
        counts=counts,
        seconds=seconds,
        seconds_per_image=busy / max(len(tasks), 1),
    )


def _check_arguments(
    size: tuple[int, int],
    val_fraction: float,
    n_defective: int,
    n_free: int,
    n_test_defective: int,
    n_test_free: int,
) -> None:
    """Raise ValueError for a size, a count or a val fraction `generate_dataset` cannot use."""
    check_size(size)
    counts_in = {
        "n_defective": n_defective,
        "n_free": n_free,
        "n_test_defective": n_test_defective,
        "n_test_free": n_test_free,
    }
    for name, value in counts_in.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n_defective + n_free + n_test_defective + n_test_free == 0:
        raise ValueError("nothing to generate: every count is 0")


def _planned_counts(
    n_defective: int, n_free: int, val_fraction: float, n_test_defective: int, n_test_free: int
) -> dict[str, dict[str, int]]:
    """Images to render, split -> {"defective": n, "free": n}: ``val_fraction`` of each kind of
    train+val image (rounded) goes to val."""
    n_val_def = round(n_defective * val_fraction)
    n_val_free = round(n_free * val_fraction)
    return {
        "train": {"defective": n_defective - n_val_def, "free": n_free - n_val_free},
        "val": {"defective": n_val_def, "free": n_val_free},
        "test": {"defective": n_test_defective, "free": n_test_free},
    }


def _plan_tasks(
    out: Path, seed: int, size: tuple[int, int], planned: dict[str, dict[str, int]]
) -> tuple[list[_Task], dict[str, list[str]]]:
    """The render tasks, sorted by image id, and each split's image ids (sorted). Ids are
    dealt in a seeded shuffle, so they reveal neither split nor label; train and val images
    come from stream 0, test images from stream 1."""
    width, height = size
    plan: list[tuple[str, bool, int, int]] = []  # (split, defective, stream, index)
    index = 0
    for split, defective, n in (
        ("train", True, planned["train"]["defective"]),
        ("val", True, planned["val"]["defective"]),
        ("train", False, planned["train"]["free"]),
        ("val", False, planned["val"]["free"]),
    ):
        for _ in range(n):
            plan.append((split, defective, STREAM_TRAINVAL, index))
            index += 1
    index = 0
    for defective, n in ((True, planned["test"]["defective"]), (False, planned["test"]["free"])):
        for _ in range(n):
            plan.append(("test", defective, STREAM_TEST, index))
            index += 1
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 99])).permutation(len(plan))
    digits = max(5, len(str(len(plan))))
    tasks: list[_Task] = []
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, j in enumerate(order):
        split, defective, stream, idx = plan[j]
        image_id = f"gasket_{k:0{digits}d}"
        splits[split].append(image_id)
        tasks.append(_Task(str(out), image_id, int(seed), stream, idx, (width, height), defective))
    tasks.sort(key=lambda t: t.image_id)
    for ids in splits.values():
        ids.sort()
    return tasks, splits


def _settings(
    seed: int, size: tuple[int, int], val_fraction: float, planned: dict[str, dict[str, int]]
) -> dict:
    """The dataset's ``dataset.json`` before rendering (``complete`` false, planned counts)."""
    width, height = size
    return {
        "generator": _MARKER,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": [width, height],
        "class_names": [CLASS_NAME],
        "val_fraction": val_fraction,
        "counts": planned,
        "streams": {"train": STREAM_TRAINVAL, "val": STREAM_TRAINVAL, "test": STREAM_TEST},
        "colour": "mono rendering saved as RGB JPEG with a slight per-image tint",
        "jpeg_quality": [90, 95],
        "box_convention": "VOC 1-based inclusive integers (0-based continuous in splitdet)",
        "complete": False,
    }


def _render_all(tasks: list[_Task], workers: int, progress: bool) -> tuple[dict[str, int], float]:
    """Render and write every task, in this process or on ``workers`` spawned ones. Returns the
    number of boxes of each image id and the seconds spent rendering, summed over workers."""
    n_boxes: dict[str, int] = {}
    busy = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="synth", unit="img")
    try:
        if workers == 1 or len(tasks) <= 1:
            results = map(_render_task, tasks)
            for image_id, nb, dt in results:
                n_boxes[image_id] = nb
                busy += dt
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # safe with threads in the parent (tqdm, torch)
            n_proc = min(workers, len(tasks))
            chunk = max(1, min(8, len(tasks) // (n_proc * 4)))
            # the workers leave Ctrl-C to this process (which ends them with the pool): each
            # printed its own KeyboardInterrupt traceback when the terminal's group got it
            with ctx.Pool(n_proc, initializer=_ignore_interrupts) as pool:
                for image_id, nb, dt in pool.imap_unordered(_render_task, tasks, chunksize=chunk):
                    n_boxes[image_id] = nb
                    busy += dt
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return n_boxes, busy


def _split_counts(
    splits: dict[str, list[str]], n_boxes: dict[str, int]
) -> dict[str, dict[str, int]]:
    """What was written, split -> {"defective": n, "free": n, "boxes": n}."""
    return {
        split: {
            "defective": sum(1 for i in ids if n_boxes[i] > 0),
            "free": sum(1 for i in ids if n_boxes[i] == 0),
            "boxes": sum(n_boxes[i] for i in ids),
        }
        for split, ids in splits.items()
    }


def _readme(settings: dict) -> str:
    w, h = settings["size"]
    lines = [
        "# Synthetic titanium-gasket scratch dataset (PASCAL VOC)",
        "",
        f"Made by `splitdet synth` ({settings['generator']} v{settings['generator_version']}), "
        f"seed {settings['seed']}, {w}x{h} px. Class: `scratch`. Images without objects are "
        "defect-free (they still show dust, stains and tool marks, which are not scratches).",
        "",
        "| split | defective | defect-free | boxes |",
        "| --- | --- | --- | --- |",
    ]
    for split, c in settings["counts"].items():
        lines.append(f"| {split} | {c['defective']} | {c['free']} | {c['boxes']} |")
    lines += [
        "",
        "Images are a mono rendering saved as RGB JPEG (quality 90-95). Boxes are tight around",
        "every pixel a scratch changes; VOC coordinates are 1-based and inclusive.",
        "Regenerate with the same seed and size to get the same images.",
        "",
    ]
    return "\n".join(lines)
