"""What a dataset folder holds when it is not (yet) the VOC tree splitdet reads, and how to make
it one: the hints `splitdet data check` and `data split` add to "folder not found" and "no
annotation".

splitdet reads ``ROOT/Annotations/ID.xml`` and ``ROOT/JPEGImages/ID.EXT`` at those folders' top
level. Annotation tools lay their exports out otherwise: LabelImg saves each ``.xml`` beside its
image, many tools name the image folder ``images/``, and CVAT keeps a task's sub-folders under
both (``Annotations/line1/f0.xml``). Nothing here moves a file; it only says what to move.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from splitdet.training import voc

#: Folder names (any case) that annotation tools and exports give the images.
IMAGE_FOLDERS = ("images", "imgs", "img", "jpegimages", "photos", "frames")
#: Folder names (any case) that they give the annotations.
ANNOTATION_FOLDERS = ("annotations", "labels", "xml", "voc")
#: Files looked at, at most, per folder walked (a hint needs a count, not a census).
MAX_LOOKED_AT = 100_000


@dataclass(frozen=True)
class UnreadAnnotation:
    """An ``.xml`` file under ``ROOT`` that is an image's annotation to a labelling tool but
    that splitdet never reads: ``kind`` says where it lies ("beside", "sub-folder", "suffix"),
    ``fix`` what to do with it (a sentence to append after "; ")."""

    path: Path
    kind: str
    fix: str


def id_key(name: str) -> str:
    """A file stem as annotation tools match an image to its annotation: NFC, any case (the
    same as `voc_check_images` compares <filename>s: Windows and macOS change either)."""
    return unicodedata.normalize("NFC", name).casefold()


def unread_annotations(root: Path) -> dict[str, list[UnreadAnnotation]]:
    """``{id_key(stem): the annotations of that stem splitdet does not read}``: the ``.xml``
    files (any case) beside the images in ``ROOT/JPEGImages`` (LabelImg's default), in
    sub-folders of ``ROOT/Annotations`` (CVAT's task folders), and those at its top level
    whose suffix is not exactly ``.xml`` (``ID.XML``: the readers look for ``ID.xml``).
    `data split --write-empty` must not write an empty annotation for such an image: its
    boxes would be lost, the defective image trained as defect-free."""
    root = Path(root)
    annotations = root / "Annotations"
    found: dict[str, list[UnreadAnnotation]] = {}
    listed = [
        *((p, "beside") for p in _files(root / "JPEGImages", (".xml",))),
        *((p, "sub-folder") for p in _files(annotations, (".xml",), nested=True)),
        *((p, "suffix") for p in _files(annotations, (".xml",)) if p.suffix != ".xml"),
    ]
    for path, kind in listed:
        if kind == "beside":
            fix = f"move the .xml files beside the images into {annotations}"
        elif kind == "sub-folder":
            fix = (
                f"move them up into {annotations} (splitdet reads its top level only: an id is "
                "a file name, not a path)"
            )
        else:
            fix = f"name it {path.stem}.xml (the readers look for ID.xml)"
        found.setdefault(id_key(path.stem), []).append(UnreadAnnotation(path, kind, fix))
    return found


def _files(folder: Path, suffixes: tuple[str, ...], nested: bool = False) -> list[Path]:
    """Visible regular files in `folder` (and its sub-folders when `nested`: only those
    below the top level) whose suffix, in any case, is one of `suffixes`."""
    if not folder.is_dir():
        return []
    found = []
    walk = folder.rglob("*") if nested else folder.iterdir()
    try:
        for looked, path in enumerate(walk):
            if looked >= MAX_LOOKED_AT:
                break
            if nested and path.parent == folder:
                continue
            visible = not any(part.startswith(".") for part in path.relative_to(folder).parts)
            if visible and path.suffix.lower() in suffixes and path.is_file():
                found.append(path)
    except OSError:  # (a folder that cannot be listed: no hint from it)
        pass
    return sorted(found)


def _named_like(root: Path, names: tuple[str, ...]) -> list[Path]:
    """Sub-folders of `root` whose name, in any case, is one of `names`."""
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in names)
    except OSError:
        return []


def missing_folder_hint(root: Path, folder: str) -> str:
    """For a `root` without ``folder`` ("Annotations" or "JPEGImages"): where its files seem
    to be and what to move, as "; ..." to append to the message, or "" when nothing is found."""
    root = Path(root)
    if folder == "JPEGImages":
        wanted, names, what = voc.IMAGE_EXTENSIONS, IMAGE_FOLDERS, "images"
    else:
        wanted, names, what = (".xml",), ANNOTATION_FOLDERS, ".xml annotations"
    places = [*_named_like(root, names), root]
    if folder == "Annotations":  # LabelImg saves each .xml beside its image
        places += [p for p in _named_like(root, IMAGE_FOLDERS) if p not in places]
    for place in places:
        found = _files(place, wanted)
        if not found:
            continue
        if place == root:
            return f"; {root} holds {len(found)} {what}: move them into {root / folder}"
        if place.name.lower() in names:
            return f"; {place} holds {len(found)} {what}: rename it {root / folder}"
        return (
            f"; {place} holds {len(found)} {what} beside the images: move them into {root / folder}"
        )
    return ""


def nested_note(root: Path) -> str | None:
    """What ``ROOT/Annotations`` and ``ROOT/JPEGImages`` hold in sub-folders (read at their
    top level only), and what to do; None when they hold nothing there."""
    root = Path(root)
    parts = []
    for folder, wanted, what in (
        ("Annotations", (".xml",), ".xml annotations"),
        ("JPEGImages", voc.IMAGE_EXTENSIONS, "images"),
    ):
        found = _files(root / folder, wanted, nested=True)
        if found:
            example = found[0].relative_to(root / folder).as_posix()
            parts.append(
                f"{root / folder} holds {len(found)} {what} in sub-folders (e.g. {example})"
            )
    if not parts:
        return None
    return (
        f"{'; '.join(parts)}: splitdet reads each folder's top level only (an id is a file "
        "name, not a path), so move them up, the annotations with their images, renaming any "
        "whose names clash, and list the ids without a folder in ImageSets/Main/*.txt"
    )


def beside_images_note(root: Path) -> str | None:
    """The ``.xml`` annotations in ``ROOT/JPEGImages`` (LabelImg saves each beside its image),
    which splitdet never reads, and where to move them; None when there is none."""
    root = Path(root)
    found = _files(root / "JPEGImages", (".xml",))
    if not found:
        return None
    return (
        f"{root / 'JPEGImages'} holds {len(found)} .xml annotation(s) beside the images (e.g. "
        f"{found[0].name}), which splitdet does not read: their images train with the "
        f"annotation in {root / 'Annotations'}, or have none; move them into "
        f"{root / 'Annotations'}"
    )


def unread_files_note(root: Path) -> str | None:
    """The files of ``ROOT/JPEGImages`` no reader takes (their extension), counted by
    extension; None when there is none. ``.xml`` files are annotations, not images to convert:
    `beside_images_note` names them."""
    folder = Path(root) / "JPEGImages"
    if not folder.is_dir():
        return None
    counts: Counter[str] = Counter()
    try:
        for looked, path in enumerate(folder.iterdir()):
            if looked >= MAX_LOOKED_AT:
                break
            suffix = path.suffix.lower()
            if (
                suffix not in (*voc.IMAGE_EXTENSIONS, ".xml")
                and not path.name.startswith(".")
                and path.is_file()
            ):
                counts[suffix or "(no extension)"] += 1
    except OSError:
        return None
    if not counts:
        return None
    listed = ", ".join(f"{n} {ext}" for ext, n in counts.most_common())
    return (
        f"{folder}: {sum(counts.values())} file(s) not read ({listed}); images are read from "
        f"{', '.join(voc.IMAGE_EXTENSIONS)} files (convert the others, or remove them)"
    )
