"""What a dataset folder holds when it is not (yet) the VOC tree splitdet reads, and how to make
it one: the hints `splitdet data check` and `data split` add to "folder not found" and "no
annotation".

splitdet reads ``ROOT/Annotations/ID.xml`` and ``ROOT/JPEGImages/ID.EXT`` at those folders' top
level. Annotation tools lay their exports out otherwise: LabelImg saves each ``.xml`` beside its
image, many tools name the image folder ``images/``, and CVAT keeps a task's sub-folders under
both (``Annotations/line1/f0.xml``). Nothing here moves a file; it only says what to move.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from splitdet.training import voc

#: Folder names (any case) that annotation tools and exports give the images.
IMAGE_FOLDERS = ("images", "imgs", "img", "jpegimages", "photos", "frames")
#: Folder names (any case) that they give the annotations.
ANNOTATION_FOLDERS = ("annotations", "labels", "xml", "voc")
#: Files looked at, at most, per folder walked (a hint needs a count, not a census).
MAX_LOOKED_AT = 100_000


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


def unread_files_note(root: Path) -> str | None:
    """The files of ``ROOT/JPEGImages`` no reader takes (their extension), counted by
    extension; None when there is none."""
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
                suffix not in voc.IMAGE_EXTENSIONS
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
