"""What a dataset folder holds when it is not (yet) the VOC tree splitdet reads, and how to make
it one: the hints `splitdet data check` and `data split` add to "folder not found" and "no
annotation".

splitdet reads ``ROOT/Annotations/ID.xml`` and ``ROOT/JPEGImages/ID.EXT`` at those folders' top
level. Annotation tools lay their exports out otherwise: LabelImg saves each ``.xml`` beside its
image, many tools name the image folder ``images/``, and CVAT keeps a task's sub-folders under
both (``Annotations/line1/f0.xml``), and Roboflow's "Pascal VOC" export has a folder per split
(``train/``, ``valid/``, ``test/``), each holding its images and their ``.xml`` side by side.
Nothing here moves a file; it only says what to move.
"""

from __future__ import annotations

import io
import os
import shlex
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from splitdet.training import voc
from splitdet.training.voc_annotations import JPEG_ALIASES
from splitdet.training.voc_xml import xml_utf8

#: Folder names (any case) that annotation tools and exports give the images.
IMAGE_FOLDERS = ("images", "imgs", "img", "jpegimages", "photos", "frames")
#: Folder names (any case) that they give the annotations.
ANNOTATION_FOLDERS = ("annotations", "labels", "xml", "voc")
#: Files looked at, at most, per folder walked for a hint (a hint needs a count, not a
#: census; `unread_annotations`, which guards against lost boxes, looks at every file).
MAX_LOOKED_AT = 100_000
#: The root element of a VOC annotation (`voc_xml` refuses any other).
ANNOTATION_ROOT = "annotation"
#: Folder names (any case) that exports laying out a folder per split (Roboflow's "Pascal
#: VOC") give them, each holding its images and their annotations side by side.
SPLIT_FOLDERS = ("train", "valid", "val", "test")


@dataclass(frozen=True)
class UnreadAnnotation:
    """An ``.xml`` file under ``ROOT`` that is an image's annotation to a labelling tool but
    that splitdet never reads: ``kind`` says where it lies ("beside", "sub-folder", "suffix"),
    ``fix`` what to do with it (a sentence to append after "; "). Kind "case": an annotation
    read, whose name differs only in case from its image's, so that it finds no image and the
    image seems to have no annotation."""

    path: Path
    kind: str
    fix: str


def id_key(name: str) -> str:
    """A file stem as annotation tools match an image to its annotation: NFC, any case (the
    same as `voc_check_images` compares <filename>s: Windows and macOS change either)."""
    return unicodedata.normalize("NFC", name).casefold()


def unread_annotations(root: Path) -> dict[str, list[UnreadAnnotation]]:
    """``{id_key(stem): the annotations of that stem splitdet does not read}``: the ``.xml``
    files (any case) whose root element is <annotation> (`is_annotation`: a camera's
    ``settings.xml`` is none) beside the images in ``ROOT/JPEGImages`` (LabelImg's default),
    in sub-folders of ``ROOT/Annotations`` (CVAT's task folders), those at its top level
    whose suffix is not exactly ``.xml`` (``ID.XML``: the readers look for ``ID.xml``), and
    those whose name differs only in case from an image's (`_case_twins`).
    `data split --write-empty` must not write an empty annotation for such an image: its
    boxes would be lost, the defective image trained as defect-free. So every file is looked
    at, without `MAX_LOOKED_AT` (one directory entry each, and the first tag of each ``.xml``:
    linear in the files, about 1 s per 100,000)."""
    root = Path(root)
    annotations = root / "Annotations"
    found: dict[str, list[UnreadAnnotation]] = {}
    top = _all_files(annotations, (".xml",))
    twins = _case_twins(root, [p for p in top if p.suffix == ".xml"])
    listed = [
        *((p, "beside") for p in _all_files(root / "JPEGImages", (".xml",))),
        *((p, "sub-folder") for p in _all_files(annotations, (".xml",), nested=True)),
        *((p, "suffix") for p in top if p.suffix != ".xml"),
        *((p, "case") for p in twins),
    ]
    for path, kind in listed:
        if not is_annotation(path):
            continue
        target = annotations / f"{path.stem}.xml"
        if kind == "case":
            fix = (
                f"its name differs only in case from {twins[path].name}'s, so that splitdet "
                "finds no image for it: rename one of the two"
            )
        elif kind == "beside":
            fix = (
                f"move it to {target} (the readers look for Annotations/ID.xml, suffix lower-case)"
            )
        elif kind == "sub-folder":
            fix = (
                f"move it up to {target} (splitdet reads the top level of {annotations} only: "
                "an id is a file name, not a path)"
            )
        else:
            fix = f"name it {path.stem}.xml (the readers look for ID.xml)"
        found.setdefault(id_key(path.stem), []).append(UnreadAnnotation(path, kind, fix))
    return found


def _case_twins(root: Path, annotations: list[Path]) -> dict[Path, Path]:
    """``{annotation: its image}`` of the ``annotations`` (``ROOT/Annotations/ID.xml``) that
    have no image of their id in ``ROOT/JPEGImages`` but one whose id differs only in case
    (``Gasket_00000.xml``, ``gasket_00000.jpg``): on a case-sensitive file system the reader
    finds no image for the one, and the other seems to have no annotation."""
    images: dict[str, list[Path]] = {}
    for image in _all_files(root / "JPEGImages", voc.IMAGE_EXTENSIONS):
        images.setdefault(image.stem.casefold(), []).append(image)
    twins = {}
    for path in annotations:
        same = images.get(path.stem.casefold(), [])
        if same and all(image.stem != path.stem for image in same):
            twins[path] = same[0]
    return twins


def is_annotation(path: Path) -> bool:
    """Whether the XML file at ``path`` is an annotation: its first element is <annotation>,
    read without the rest of the file (a camera's ``<camera>`` settings, a sidecar's
    ``<CameraMetadata>`` are none). False for a file that is malformed before its first
    element or declares an encoding no codec reads (an unknown one: no tool reads it as an
    annotation); one in an encoding expat reads only through Python's codec (``utf8``, GBK,
    Shift_JIS: `voc_xml.xml_utf8`, as annotations are read) is read so. True for one that
    cannot be opened (it may be one: better a refusal than lost boxes)."""
    try:
        with open(path, "rb") as file:
            for _, element in ET.iterparse(file, events=("start",)):
                return element.tag == ANNOTATION_ROOT
    except (ET.ParseError, LookupError, ValueError):  # (an encoding unknown, or multi-byte)
        pass
    except OSError:
        return True
    try:  # (its head alone: the first element is all that counts)
        with open(path, "rb") as file:
            head = xml_utf8(file.read(_HEAD_BYTES), errors="replace")
        for _, element in ET.iterparse(io.BytesIO(head), events=("start",)):
            return element.tag == ANNOTATION_ROOT
    except (ET.ParseError, LookupError, ValueError):
        return False
    except OSError:
        return True
    return False


#: How much of an .xml file `is_annotation` decodes when expat cannot read its encoding.
_HEAD_BYTES = 64 * 1024


def _files(folder: Path, suffixes: tuple[str, ...], nested: bool = False) -> list[Path]:
    """Visible regular files in `folder` (and its sub-folders when `nested`: only those
    below the top level) whose suffix, in any case, is one of `suffixes`; of the first
    `MAX_LOOKED_AT` entries looked at (for a hint: a count, not a census)."""
    return _all_files(folder, suffixes, nested, limit=MAX_LOOKED_AT)


def _all_files(
    folder: Path, suffixes: tuple[str, ...], nested: bool = False, limit: int | None = None
) -> list[Path]:
    """`_files` of every entry (or of the first `limit`), sorted. Hidden entries (a name
    starting with ".") and symbolic links to folders are not walked into; a folder that
    cannot be listed gives none."""
    found = []
    for looked, (path, depth) in enumerate(_walk(Path(folder), nested)):
        if limit is not None and looked >= limit:
            break
        if (depth > 0 or not nested) and path.suffix.lower() in suffixes:
            found.append(path)
    return sorted(found)


def _walk(folder: Path, nested: bool, depth: int = 0) -> Iterator[tuple[Path, int]]:
    """(path, depth below `folder`) of the visible regular files in `folder`, and in its
    visible sub-folders when `nested`: each folder's files before its sub-folders'."""
    folders = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_file():
                        yield Path(entry.path), depth
                    elif nested and entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                except OSError:  # (a file gone, or not to be looked at: not counted)
                    continue
    except OSError:  # (a folder that cannot be listed: no hint from it)
        return
    for sub in sorted(folders):
        yield from _walk(Path(sub), nested, depth + 1)


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
    return split_folders_hint(root) if folder == "Annotations" else ""


def split_folders_hint(root: Path) -> str:
    """For a ``root`` laid out a folder per split (`SPLIT_FOLDERS`, Roboflow's "Pascal VOC"
    export: ``train/``, ``valid/``, ``test/``), each holding images and ``.xml`` files side by
    side: "; ..." saying so and how to make a VOC dataset of it; "" for any other folder."""
    root = Path(root)
    splits = sorted(
        (
            place
            for place in _named_like(root, SPLIT_FOLDERS)
            if _files(place, (".xml",)) and _files(place, voc.IMAGE_EXTENSIONS)
        ),
        key=lambda place: SPLIT_FOLDERS.index(place.name.lower()),
    )
    if not splits:
        return ""
    names = ", ".join(f"{p.name}/" for p in splits)
    quoted = " ".join(shlex.quote(str(p)) for p in splits)
    return (
        f"; {root} is laid out a folder per split ({names}: Roboflow's Pascal VOC export), "
        "each holding its images and their .xml side by side: move every .xml into "
        f"{root / 'Annotations'} and every image into {root / 'JPEGImages'}, then `splitdet "
        f"data split {shlex.quote(str(root))} --write-empty` divides them anew; or make each "
        "folder a dataset of its own (FOLDER/Annotations, FOLDER/JPEGImages, `splitdet data "
        f"split FOLDER`) and join them with `splitdet data merge {quoted} --out NEW`"
    )


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
    which splitdet never reads, and where to move them; None when there is none. Only files
    whose root element is <annotation> (`is_annotation`): a camera's ``settings.xml`` moved
    into Annotations would fail `data check`."""
    root = Path(root)
    found = [p for p in _files(root / "JPEGImages", (".xml",)) if is_annotation(p)]
    if not found:
        return None
    return (
        f"{root / 'JPEGImages'} holds {len(found)} .xml annotation(s) beside the images (e.g. "
        f"{found[0].name}), which splitdet does not read: their images train with the "
        f"annotation in {root / 'Annotations'}, or have none; move each to "
        f"{root / 'Annotations' / 'ID.xml'} (the suffix in lower case)"
    )


def unread_files_note(root: Path) -> str | None:
    """The files of ``ROOT/JPEGImages`` no reader takes (their extension), counted by
    extension; None when there is none. ``.xml`` files are not images to convert either:
    `beside_images_note` names the annotations among them."""
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
    jpegs = [ext for ext in JPEG_ALIASES if ext in counts]
    renamed = f"; {' and '.join(jpegs)} files are JPEGs: rename them .jpg" if jpegs else ""
    return (
        f"{folder}: {sum(counts.values())} file(s) not read ({listed}); images are read from "
        f"{', '.join(voc.IMAGE_EXTENSIONS)} files (convert the others, or remove them){renamed}"
    )
