"""Parsing a VOC annotation file's XML: the size limit, refusing a DTD or entity declaration, and
the element readers (text, number, 0/1 flag, a box's corners) whose `VocError` names the file.

Part of `splitdet.training.voc`, which re-exports `MAX_ANNOTATION_BYTES`; standard library only.
"""

from __future__ import annotations

import codecs
import math
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.parsers import expat

from splitdet.training.voc_names import normalisation_note
from splitdet.training.voc_types import VocError

#: Annotation files larger than this are refused (a VOC annotation is a few KB).
MAX_ANNOTATION_BYTES = 4 * 1024 * 1024


#: The encodings expat reads itself, under the names it knows them by (any case): a
#: declaration naming another (``utf8``, as ``ElementTree.write(encoding="utf8")`` writes it;
#: ``GBK``, ``Shift_JIS``, ``windows-1252``) is decoded by Python's codec of that name first.
_EXPAT_ENCODINGS = ("utf-8", "utf-16", "iso-8859-1", "us-ascii")
#: An XML declaration's encoding, in an ASCII-compatible file (UTF-16 needs none of this).
_DECLARED = re.compile(
    rb"""^(?:\xef\xbb\xbf)?<\?xml[^>]*?\sencoding\s*=\s*(["'])([A-Za-z][A-Za-z0-9._-]*)\1"""
)


def xml_utf8(data: bytes, errors: str = "strict") -> bytes:
    """``data``, an XML document, as expat reads it: unchanged when it declares no encoding or
    one expat knows (UTF-8, UTF-16, ISO-8859-1, US-ASCII), else decoded by Python's codec of the
    declared name (``utf8``, ``GBK``, ``GB2312``, ``Shift_JIS``, ``cp1252``...) and re-encoded as
    UTF-8 with the declaration saying so. Expat refuses multi-byte encodings and reads
    ``utf8`` (no hyphen) byte by byte: a non-ASCII class name was "not well-formed".
    Unchanged too when the name is no codec's (expat then says "unknown encoding").
    UnicodeDecodeError (a ValueError) when the bytes are not in the declared encoding."""
    found = _DECLARED.match(data)
    if found is None:
        return data
    name = found.group(2).decode("ascii")
    if name.lower() in _EXPAT_ENCODINGS:
        return data
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        return data
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if bom and codec != "utf-8":  # contradicting itself: expat says which way
        return data
    text = data[bom:].decode(codec, errors)
    start, end = (i - bom for i in found.span(2))
    if not text.startswith(data[bom : bom + end].decode("ascii")):  # not ASCII-based: UTF-32
        return data
    return (text[:start] + "utf-8" + text[end:]).encode("utf-8")


def _encoding_hint(data: bytes) -> str:
    """What to do about a parse error in ``data``: "" unless it is no UTF-8, declares no
    encoding and expat read it as UTF-8 (a script's or an editor's ANSI file: Latin-1,
    cp1252, GBK)."""
    if _DECLARED.match(data) or data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return ""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"; its bytes are not UTF-8 (byte {exc.start}: 0x{data[exc.start]:02x}) and it "
            'declares no encoding: save it as UTF-8, or begin it with <?xml version="1.0" '
            'encoding="..."?> naming the encoding it is written in'
        )
    return ""


class _Doctype(Exception):
    """A document type declaration met while parsing an annotation."""


def _refuse_doctype(data: bytes) -> None:
    """Raise `_Doctype` when ``data`` declares a document type with content (an internal
    subset, where entities are declared, or an external DTD), in whatever encoding it is
    written; ET.ParseError when it is malformed XML. A bare ``<!DOCTYPE annotation>`` passes.

    ElementTree never fetches external entities, and expat bounds entity amplification; VOC
    annotations have no DTD at all, so one is refused outright, before ElementTree reads it.
    """

    def doctype(
        _name: str, system_id: str | None, _public_id: str | None, has_internal_subset: int
    ) -> None:
        if system_id or has_internal_subset:  # a bare <!DOCTYPE annotation> declares nothing
            raise _Doctype

    def entity(*_args: object) -> None:
        raise _Doctype

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ET.ParseError(str(exc)) from None


def _parse_xml(path: Path) -> ET.Element:
    try:
        info = path.stat()
    except FileNotFoundError:
        twin = normalisation_note(path.parent, path.name)
        raise VocError(f"{path}: annotation file not found{twin}") from None
    except OSError as exc:
        raise VocError(f"{path}: cannot read annotation: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read for ever
        raise VocError(f"{path}: cannot read annotation: not a regular file")
    size = info.st_size
    if size > MAX_ANNOTATION_BYTES:
        raise VocError(
            f"{path}: annotation is {size} bytes, larger than the {MAX_ANNOTATION_BYTES} "
            "allowed for a VOC annotation"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:  # a directory of that name, no permission
        raise VocError(f"{path}: cannot read annotation: {exc.strerror or exc}") from None
    if not data.removeprefix(codecs.BOM_UTF8).strip():  # expat: "no element found"
        raise VocError(_empty_problem(path, len(data)))
    try:
        data = xml_utf8(data)
    except UnicodeDecodeError as exc:
        raise VocError(
            f"{path}: malformed XML: its bytes are not in the {exc.encoding} encoding its "
            f"declaration names (byte {exc.start}: 0x{exc.object[exc.start]:02x}): correct the "
            'encoding="..." of its <?xml?> declaration to the one it is written in, or '
            "save it as UTF-8"
        ) from None
    try:
        _refuse_doctype(data)
        root = ET.fromstring(data)
    except _Doctype:
        raise VocError(
            f"{path}: a document type (DTD) or entity declaration is not allowed in a VOC "
            "annotation"
        ) from None
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise VocError(f"{path}: malformed XML: {exc}{_encoding_hint(data)}") from exc
    if root.tag != "annotation":
        raise VocError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    return root


def _empty_problem(path: Path, size: int) -> str:
    """The problem line of an annotation file holding nothing (0 bytes, or white space only,
    as a tool that crashed or a script touching a file per image leaves), and the fix."""
    held = "0 bytes" if size == 0 else f"{size} bytes of white space, no XML"
    return (
        f"{path}: the annotation file is empty ({held}); an image without defects needs an "
        "<annotation> with no <object>: delete the empty file and `splitdet data split "
        "--write-empty` writes one (add --add when split files exist); if its image has "
        "defects, export its annotation again from the annotation tool"
    )


def _text(path: Path, elem: ET.Element, tag: str, where: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise VocError(f"{path}: missing <{tag}> in {where}")
    return child.text.strip()


def _number(path: Path, elem: ET.Element, tag: str, where: str) -> float:
    raw = _text(path, elem, tag, where)
    try:
        value = float(raw)
    except ValueError:
        raise VocError(f"{path}: <{tag}> in {where} is not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise VocError(f"{path}: <{tag}> in {where} is not finite: {raw!r}")
    return value


#: What a 0/1 flag (<difficult>) reads as false besides a number equal to 0 (any case): empty,
#: and "Unspecified", which makesense.ai writes in every object's <difficult>.
FLAG_FALSE = ("", "unspecified", "false", "no")
#: What it reads as true besides a number equal to 1 (any case).
FLAG_TRUE = ("true", "yes")


def _flag(path: Path, elem: ET.Element, tag: str, where: str) -> bool:
    """A 0/1 flag of ``elem`` (VOC's <difficult>): False when missing or in `FLAG_FALSE`, a
    number equal to 0 or 1 ("0.0", "1.0", as tools writing floats give) as such, else a
    `VocError` naming the file. (<truncated>, <occluded> and <pose> are not read at all.)"""
    child = elem.find(tag)
    raw = "" if child is None or child.text is None else child.text.strip().lower()
    if raw in FLAG_FALSE:
        return False
    if raw in FLAG_TRUE:
        return True
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value in (0.0, 1.0):
        return value == 1.0
    raise VocError(f"{path}: <{tag}> in {where} must be 0 or 1, got {raw!r}")


#: The shapes other than a box an <object> may hold (polygon and mask exports, keypoints).
_SHAPES = ("polygon", "segmentation", "points", "polyline", "mask", "keypoints")


def _box(path: Path, obj: ET.Element, where: str) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of an <object>'s <bndbox>, as written (VOC's 1-based pixels)."""
    bnd = obj.find("bndbox")
    if bnd is None:
        shape = next((c.tag for c in obj if c.tag in _SHAPES), None)
        if shape is not None:  # (LabelMe-style or a tool's polygon export in VOC clothes)
            raise VocError(
                f"{path}: {where} is a <{shape}>, not a box: splitdet trains on boxes "
                "(<bndbox>); export the annotations as rectangles (bounding boxes), or draw "
                "this object as one"
            )
        raise VocError(
            f"{path}: missing <bndbox> in {where}: each <object> needs one (<xmin>, <ymin>, "
            "<xmax>, <ymax>); export the annotation again, or remove the object"
        )
    xmin = _number(path, bnd, "xmin", where)
    ymin = _number(path, bnd, "ymin", where)
    xmax = _number(path, bnd, "xmax", where)
    ymax = _number(path, bnd, "ymax", where)
    return xmin, ymin, xmax, ymax
