"""Parsing a VOC annotation file's XML: the size limit, refusing a DTD or entity declaration, and
the element readers (text, number, 0/1 flag) whose `VocError` names the file.

Part of `splitdet.training.voc`, which re-exports `MAX_ANNOTATION_BYTES`; standard library only.
"""

from __future__ import annotations

import math
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.parsers import expat

from splitdet.training.voc_names import normalisation_note
from splitdet.training.voc_types import VocError

#: Annotation files larger than this are refused (a VOC annotation is a few KB).
MAX_ANNOTATION_BYTES = 4 * 1024 * 1024


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
    try:
        _refuse_doctype(data)
        root = ET.fromstring(data)
    except _Doctype:
        raise VocError(
            f"{path}: a document type (DTD) or entity declaration is not allowed in a VOC "
            "annotation"
        ) from None
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise VocError(f"{path}: malformed XML: {exc}") from exc
    if root.tag != "annotation":
        raise VocError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    return root


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


def _flag(path: Path, elem: ET.Element, tag: str, where: str) -> bool:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return False
    raw = child.text.strip().lower()
    if raw in ("0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise VocError(f"{path}: <{tag}> in {where} must be 0 or 1, got {raw!r}")
