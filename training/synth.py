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
  Bezier) strokes, 1-6 px wide, along centre lines 30 px to ~1400 px long at 2448x2048,
  bright or dark, strong to faint (5-16 times the local clutter: texture detail and sensor
  noise), with intermittent strength and tapered ends. They are rasterised (distance to a
  polyline, anti-aliased), clipped to the metal, and only the pixels they change by at least
  one unit of that clutter are drawn, so every scratch pixel is known: its box is the bounding
  box of those pixels and never claims an invisible tail. A box is therefore shorter than its
  centre line when the tapered ends fade out, down to 20 px on its longer side: a scratch whose
  visible part is shorter is re-drawn.
- Sizes. The part, its texture and every length scale with the image; stroke and speck *widths*
  stay in output pixels (1-6 px at any size). A smaller image is a faster stand-in for the
  camera's, in which a scratch looks to a detector as it would at full resolution; scaled, most
  scratches would be sub-pixel at 612x512 (version 1 did that, with a 1 px floor). A scratch
  stays a stroke at every size: at 2448x2048 the shortest centre line (30 px) is five times the
  widest scratch (6 px), and smaller images keep that ratio as a floor on the length (version 2
  scaled the length alone, so at 612x512 a 6 px wide scratch could be 8 px long: a dot like a
  dust speck). The shortest centre line (30 px; its box at least 20 px) and the shortest tool
  mark (25 px) keep their camera lengths at every size, as widths and dust specks do; the
  longest scale with the part. (Version 3 scaled the floor too: at 612x512 a scratch could be
  10 px long beside dust specks of up to 7 px, a ratio the camera's images never show; 9% of
  its test scratches were under 20 px.)
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

import contextlib
import io
import json
import multiprocessing
import multiprocessing.resource_tracker
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitdet.shared.atomic_file import atomic_write, stale_temporaries
from splitdet.shared.folder_lock import folder_lock
from splitdet.shared.progress import progress_off
from splitdet.training import voc
from splitdet.training.synth_image import (
    CLASS_NAME,
    FULL_SIZE,
    GENERATOR_VERSION,
    STREAM_TEST,
    STREAM_TRAINVAL,
    check_size,
    generate_image,
)
from splitdet.training.voc_check_folder import SYNTH_GENERATOR, is_unfinished_synth

__all__ = [
    "DatasetSummary",
    "SyntheticDatasetExists",
    "generate_dataset",
    "train_shortfall",
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


@dataclass(frozen=True)
class _Rendered:
    """A rendered image as a worker hands it back: its JPEG file's bytes and its boxes. The
    worker writes nothing: only the process that owns ``--out`` does (`_write_rendered`), so
    a worker outliving it (its parent SIGKILLed) cannot put a file into a later run's tree."""

    image_id: str
    jpeg: bytes
    boxes: np.ndarray
    seconds: float


#: The signals held (blocked) while the render workers start (`_held_signals`).
_HELD = (signal.SIGINT, signal.SIGTERM)


def _start_worker(parent: int) -> None:
    """A render worker's start: SIGINT ignored (the parent ends the pool on Ctrl-C: each
    worker printed its own KeyboardInterrupt traceback when the terminal's group got it),
    SIGTERM back to the default, and SIGTERM asked for when the parent goes
    (`die_with_parent`: a SIGKILLed parent left its workers rendering on); a parent already
    gone ends the worker at once. SIGTERM must end a worker (`Pool.terminate` and the parent's
    death rely on it), but a spawned worker re-imports the caller's ``__main__``: a script's
    own SIGTERM handler, set at module level, was installed in every worker, which then
    survived both and hung the caller in the pool's join. Then the signals blocked since it
    was started (`_held_signals`) are let through: a Ctrl-C sent meanwhile is dropped
    (ignored), a SIGTERM ends it."""
    from splitdet.shared.parent_death import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not die_with_parent(parent, "a `splitdet synth` render worker"):
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)


@contextlib.contextmanager
def _held_signals() -> Iterator[None]:
    """While inside (the render workers being started), SIGINT and SIGTERM are blocked in this
    thread, so that the workers start with them blocked (a process inherits its starter's
    mask) until `_start_worker` ignores SIGINT: a worker still importing its modules printed
    a KeyboardInterrupt traceback on a Ctrl-C then. One that reaches this process meanwhile
    (another thread takes it) is noted, not raised inside the pool's start, and raised on
    the way out, once the previous handlers are back: nothing lost. Nothing changes outside
    the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # (started now if not yet: starting it unblocks SIGINT and SIGTERM in the calling thread)
    multiprocessing.resource_tracker.ensure_running()
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in _HELD}
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # (one pending comes now, to `note`)
        for sig, handler in previous.items():  # (None: not set from Python; the default)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(received):  # (each once, in order: its handler takes it now)
            signal.raise_signal(sig)


def _render_task(task: _Task) -> _Rendered:
    """Render one image and encode its JPEG (at the image's `jpeg_quality`)."""
    from PIL import Image

    t0 = time.perf_counter()
    img = generate_image(task.seed, task.index, task.size, task.defective, stream=task.stream)
    buffer = io.BytesIO()
    Image.fromarray(img.image).save(buffer, format="JPEG", quality=int(img.jpeg_quality))
    return _Rendered(task.image_id, buffer.getvalue(), img.boxes, time.perf_counter() - t0)


def _write_rendered(root: Path, size: tuple[int, int], rendered: _Rendered) -> None:
    """Write a rendered image and its annotation into ``root`` (each whole, atomically); an
    OSError names the file it was writing (a full disk's error names none by itself)."""
    image_path = root / "JPEGImages" / f"{rendered.image_id}.jpg"
    ann_path = root / "Annotations" / f"{rendered.image_id}.xml"
    with _naming(image_path):
        atomic_write(image_path, rendered.jpeg)
    sample = voc.VocSample(
        image_id=rendered.image_id,
        image_path=image_path,
        width=size[0],
        height=size[1],
        objects=tuple(
            voc.VocObject(CLASS_NAME, tuple(map(float, b)), False) for b in rendered.boxes
        ),
    )
    with _naming(ann_path):
        voc.write_annotation(ann_path, sample)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError naming no file as one naming ``path``, the file being written (the
    write of its temporary file says "[Errno 28] No space left on device" alone)."""
    try:
        yield
    except OSError as exc:
        if exc.filename or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


_MARKER = SYNTH_GENERATOR
#: The lock file a run holds in --out while it writes there (`shared.folder_lock`).
SYNTH_LOCK = ".splitdet-synth.lock"


class SyntheticDatasetExists(FileExistsError):
    """``out`` holds an earlier synthetic dataset, which ``overwrite`` would replace (any other
    `FileExistsError` of `generate_dataset` is a folder it never writes into); ``unfinished``:
    an interrupted run's remnant (dataset.json ``"complete": false``)."""

    def __init__(self, message: str, unfinished: bool = False) -> None:
        super().__init__(message)
        self.unfinished = unfinished


def _is_ours(out: Path) -> bool:
    """Whether ``out/dataset.json`` is a synthetic dataset's (finished or not)."""
    try:
        return json.loads((out / "dataset.json").read_text()).get("generator") == _MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_root(out: Path, overwrite: bool, settings: dict) -> None:
    """Write ``out/dataset.json`` (``settings``: "complete" false) and make ``out``'s VOC
    folders, emptying those of an earlier synthetic dataset when ``overwrite``;
    `FileExistsError` for anything else there. dataset.json comes first: a run stopped at any
    point after it leaves a tree that says it is unfinished, never an earlier run's "complete"
    over emptied folders."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    earlier = out.is_dir() and any(p.name != SYNTH_LOCK for p in out.iterdir())
    if earlier:
        if not _is_ours(out):
            raise FileExistsError(
                f"{out} is not empty and is not a splitdet synthetic dataset, so it is never "
                "overwritten"
            )
        if not overwrite and is_unfinished_synth(out):
            raise SyntheticDatasetExists(
                f"{out} holds an unfinished synthetic dataset (an interrupted `splitdet synth`: "
                "dataset.json complete: false)",
                unfinished=True,
            )
        if not overwrite:
            raise SyntheticDatasetExists(f"{out} already holds a synthetic dataset")
        foreign = _foreign_files(out)
        if foreign:
            example = ", ".join(str(p) for p in foreign[:2]) + (", ..." if len(foreign) > 2 else "")
            raise FileExistsError(
                f"{out} holds {len(foreign)} file(s) `splitdet synth` did not write ({example}), "
                "which --overwrite would delete with the synthetic dataset: move them out of it "
                "first (`splitdet data merge` then trains on both)"
            )
    _write_settings(out, settings)
    if earlier:
        for sub in ("JPEGImages", "Annotations", "ImageSets"):
            shutil.rmtree(out / sub, ignore_errors=True)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)


#: The names of the files synth writes in JPEGImages/ and Annotations/ (`_plan_tasks`).
_OUR_FILE = re.compile(r"gasket_[0-9]{5,}\.(jpg|xml)")


#: What a file browser leaves in a folder it showed (deleted with it, no data).
_BROWSER_LITTER = (".DS_Store", "Thumbs.db", "desktop.ini")


def _foreign_files(out: Path) -> list[Path]:
    """The files (and folders) in ``out``'s JPEGImages/ and Annotations/ that synth does not
    write: images and annotations of one's own added to a synthetic dataset, which emptying
    those folders for --overwrite would delete. A killed run's temporary files are synth's."""
    found: list[Path] = []
    for sub, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        folder = out / sub
        if not folder.is_dir() or folder.is_symlink():
            if folder.exists() or folder.is_symlink():
                found.append(folder)
            continue
        temporaries = set(stale_temporaries(folder, None))
        for entry in sorted(folder.iterdir()):
            ours = _OUR_FILE.fullmatch(entry.name) and entry.suffix == suffix
            if (ours and entry.is_file() and not entry.is_symlink()) or entry in temporaries:
                continue
            if entry.name in _BROWSER_LITTER:
                continue
            found.append(entry)
    return found


def _write_settings(out: Path, settings: dict) -> None:
    """Write ``out/dataset.json`` whole (a kill mid-write leaves the file before)."""
    atomic_write(out / "dataset.json", json.dumps(settings, indent=2) + "\n")


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
    progress: bool | None = None,
    overwrite: bool = False,
) -> DatasetSummary:
    """Write a PASCAL VOC dataset of synthetic gasket images to ``out``.

    Defaults follow the paper: 540 defective + 200 defect-free images, split 80/20 into train
    (432 + 160) and val (108 + 40), plus a held-out ``test`` split (108 + 40) drawn from a
    separate seed stream. Files: ``JPEGImages/*.jpg``, ``Annotations/*.xml``,
    ``ImageSets/Main/{train,val,test}.txt``, ``dataset.json`` (settings) and ``README.md``.
    Image ids (``gasket_00000``...) are shuffled so they reveal neither split nor label.

    ``progress``: draw a progress bar on stderr (default None: only when stderr is a terminal,
    as `splitdet synth` does). ``workers``: processes (default: all cores; 1 renders in this
    process). The output does not depend on it. Workers are started with "spawn", so a script
    calling this with ``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard;
    its own SIGINT and SIGTERM handlers, installed again as the workers import its module,
    are reset there (ignored and default). ``overwrite``: replace a previous
    synthetic dataset at ``out`` (without it: `SyntheticDatasetExists`); anything else in a
    non-empty ``out`` is refused (FileExistsError), and nothing but our own sub-folders is ever
    deleted; so is ``overwrite`` of one whose JPEGImages/ or Annotations/ hold files synth did
    not write (one's own images added to it: `_foreign_files`). ValueError, before anything
    is written, for a ``val_fraction`` that leaves train no image or no defective image
    (`train_shortfall`). ``dataset.json`` is written first, with
    ``"complete": false``, and made true last: a run stopped part way (a signal, a full disk)
    leaves a tree that says so (`splitdet data check` reports it).
    """
    out = Path(out)
    width, height = int(size[0]), int(size[1])
    _check_arguments(
        (width, height), val_fraction, n_defective, n_free, n_test_defective, n_test_free
    )
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    progress = not progress_off() if progress is None else progress

    planned = _planned_counts(n_defective, n_free, val_fraction, n_test_defective, n_test_free)
    tasks, splits = _plan_tasks(out, seed, (width, height), planned)

    settings = _settings(seed, (width, height), val_fraction, planned)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    # two runs on one --out (the second with --overwrite) emptied each other's folders and
    # left a mix marked complete: the second is refused while the first runs (ValueError)
    with folder_lock(out, SYNTH_LOCK, "splitdet synth", "--out"):
        _prepare_root(out, overwrite, settings)
        t0 = time.perf_counter()
        n_boxes, busy = _render_all(out, tasks, workers, progress)
        seconds = time.perf_counter() - t0
        for split, ids in splits.items():
            voc.write_split(out, split, ids)
        counts = _split_counts(splits, n_boxes)
        settings["counts"] = counts
        settings["complete"] = True
        atomic_write(out / "README.md", _readme(settings))
        _write_settings(out, settings)  # (last: "complete" once everything else is written)
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
    shortfall = train_shortfall(n_defective, n_free, val_fraction)
    if shortfall is not None:
        raise ValueError(
            f"val_fraction {val_fraction:g} leaves the train split no {shortfall} (of "
            f"n_defective {n_defective}, n_free {n_free}): lower it"
        )


def train_shortfall(n_defective: int, n_free: int, val_fraction: float) -> str | None:
    """What ``val_fraction`` leaves the train split without, though the counts asked for it:
    "image" (train+val images asked for, all going to val), "defective image" (defective
    ones asked for, all going to val), or None. Counts of 0 are the caller's choice, never a
    shortfall: ``n_defective`` 0 makes a defect-free set (for false-alarm tests)."""
    planned = _planned_counts(n_defective, n_free, val_fraction, 0, 0)["train"]
    if n_defective + n_free > 0 and planned["defective"] + planned["free"] == 0:
        return "image"
    if n_defective > 0 and planned["defective"] == 0:
        return "defective image"
    return None


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


def _render_all(
    out: Path, tasks: list[_Task], workers: int, progress: bool
) -> tuple[dict[str, int], float]:
    """Render every task, in this process or on ``workers`` spawned ones, and write each image
    and annotation into ``out`` here. Returns the number of boxes of each image id and the
    seconds spent rendering, summed over workers.

    Once every image is in, the pool is closed and joined: its workers end on their own. An
    exception here (Ctrl-C's KeyboardInterrupt, the CLI's SIGTERM) ends the pool at once
    (terminated on the way out); a SIGKILL of this process ends them too, by the SIGTERM each
    asked for (`_start_worker`). Workers never write: a worker that lived on would otherwise
    put its image into ``out`` after this process had returned."""
    n_boxes: dict[str, int] = {}
    busy = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="synth", unit="img")
    size = tasks[0].size if tasks else (0, 0)
    try:
        if workers == 1 or len(tasks) <= 1:
            for rendered in map(_render_task, tasks):
                busy += _take(out, size, rendered, n_boxes, bar)
        else:
            # spawn: safe with threads in the parent (tqdm, torch)
            ctx = multiprocessing.get_context("spawn")
            n_proc = min(workers, len(tasks))
            chunk = max(1, min(8, len(tasks) // (n_proc * 4)))
            pool = None
            try:
                # (started from this, the main, thread: the kernel's SIGTERM comes when it ends)
                with _held_signals():
                    pool = ctx.Pool(n_proc, initializer=_start_worker, initargs=(os.getpid(),))
                for rendered in pool.imap_unordered(_render_task, tasks, chunksize=chunk):
                    busy += _take(out, size, rendered, n_boxes, bar)
                pool.close()  # (done: each worker ends on its own once the queue is drained)
                pool.join()
            except BaseException:  # (a signal taken as the hold ends, too: the pool is made)
                if pool is not None:
                    pool.terminate()
                raise
    finally:
        if bar is not None:
            bar.close()
    return n_boxes, busy


def _take(
    out: Path, size: tuple[int, int], rendered: _Rendered, n_boxes: dict[str, int], bar: Any
) -> float:
    """Write ``rendered`` into ``out``, count its boxes, advance the bar; its render seconds."""
    _write_rendered(out, size, rendered)
    n_boxes[rendered.image_id] = len(rendered.boxes)
    if bar is not None:
        bar.update(1)
    return rendered.seconds


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
