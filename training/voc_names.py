"""File names and image ids of a VOC dataset: names that differ only in their Unicode
normalisation (a dataset copied from a Mac), what an image id may hold to stand in a split file,
and the bare name of an annotation's ``<filename>``.

Part of `splitdet.training.voc`, which re-exports the public names; standard library only.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Collection
from pathlib import Path


@functools.lru_cache(maxsize=8)
def _stems_by_nfc(folder: str, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    """``{NFC form of a stem: the names of that stem}`` of the files in ``folder`` whose stem
    is not ASCII, as listed when its mtime was ``mtime_ns`` (a new mtime lists it again)."""
    index: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        stem = Path(name).stem
        if not stem.isascii():
            index.setdefault(unicodedata.normalize("NFC", stem), []).append(name)
    return {key: tuple(names) for key, names in index.items()}


def normalisation_twin(
    folder: Path, name: str, suffixes: Collection[str] | None = None
) -> Path | None:
    """The file in ``folder`` whose name equals ``name`` once both are NFC-normalised but is
    not ``name`` itself: a dataset copied from a Mac, whose file system writes names NFD
    (``e`` + a combining accent), while annotations and split files name them NFC (one ``é``).
    With ``suffixes`` (lower-case), ``name`` is a stem and a file of that stem with one of the
    suffixes in any case matches. None when there is none (always for an ASCII name). The
    folder is listed once while it stays unchanged, not once per name looked for."""
    if name.isascii():  # an ASCII name has no other normalisation form
        return None
    try:
        index = _stems_by_nfc(str(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return None
    stem = name if suffixes is not None else Path(name).stem
    wanted = unicodedata.normalize("NFC", name)
    for own in index.get(unicodedata.normalize("NFC", stem), ()):
        path = Path(folder) / own
        if suffixes is not None:
            matches = path.stem != name and path.suffix.lower() in suffixes
        else:
            matches = own != name and unicodedata.normalize("NFC", own) == wanted
        if matches and path.is_file():  # (listed within the mtime's resolution: may be gone)
            return path
    return None


def _form(name: str) -> str:
    """The Unicode normalisation form ``name`` is in: "NFC", "NFD" or "mixed"."""
    for form in ("NFC", "NFD"):
        if unicodedata.is_normalized(form, name):
            return form
    return "mixed"


def normalisation_note(
    folder: Path,
    name: str,
    suffixes: Collection[str] | None = None,
    looked_for_by: Path | None = None,
) -> str:
    """What a "not found" message about ``name`` in ``folder`` appends when a file whose
    name differs from it only in its Unicode normalisation exists (`normalisation_twin`):
    "; FILE exists, whose name differs only in ...: rename ... to its NFC form"; "" when none
    does. ``looked_for_by``: the file whose name ``name`` comes from (the annotation looking
    for its image, the image looking for its annotation), the one to rename when the file
    found is in NFC and it is not."""
    twin = normalisation_twin(folder, name, suffixes)
    if twin is None:
        return ""
    differs = (
        f"; {twin} exists, whose name differs only in its Unicode normalisation "
        f"({_form(twin.name)} there, {_form(name)} here; macOS writes names NFD)"
    )
    if _form(twin.name) != "NFC":
        return f"{differs}: rename it to its NFC form"
    if looked_for_by is not None and _form(looked_for_by.name) != "NFC":
        return f"{differs}: rename {looked_for_by} to its NFC form"
    return f"{differs}: write the name here in NFC, as the file's is"


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot stand in a split file (None when it can): a split file holds
    one id per line, the first token, ``#`` starting a comment, no path separators."""
    if not image_id or image_id in (".", ".."):
        return f"invalid image id {image_id!r}"
    if any(c.isspace() for c in image_id):
        return f"image id {image_id!r} holds white space"
    if "/" in image_id or "\\" in image_id:
        return f"image id {image_id!r} holds a path separator"
    if image_id.startswith("#"):
        return f"image id {image_id!r} starts with '#', which a split file reads as a comment"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"image id {image_id!r} is not valid UTF-8 (rename the file)"
    return None


def bare_filename(filename: str | None) -> str | None:
    """An annotation's <filename> without the folders some tools write before it (``images/``,
    ``C:\\shots\\``); None for none."""
    if not filename:
        return None
    return re.split(r"[\\/]", filename)[-1] or None
