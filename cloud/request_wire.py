"""A DetectRequest's way in and a DetectResponse's way out: the wire-level bounds checked
before a request is parsed (`check_request_wire`: the parser and the conversion to Python turn a
few wire bytes into many; an empty tensor is 2 bytes on the wire, hundreds in memory), the
parsing, and the conversion between protobuf and the core's DetectCall / DetectResult. A
malformed protobuf is an InvalidRequest naming the problem rather than gRPC's generic INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from splitdet.cloud.core import MAX_REQUEST_ID_CHARS, DetectCall, DetectResult, InvalidRequest
from splitdet.shared.messages import image_from_proto, tensors_from_proto
from splitdet.shared.wire import detection_pb2 as pb

#: Bounds on a DetectRequest's wire form, checked before it is parsed. Generous: a valid request
#: has 5 tensors of rank 3 with one scale and zero point per channel (256) and ~40 fields; beyond
#: these bounds only a hostile or broken sender goes, and the codec names smaller excesses.
MAX_WIRE_FIELDS = 1 << 14  # fields of the request and its tensors together, packed or not
MAX_TENSORS = 16
MAX_SHAPE_VALUES = 16  # per tensor
MAX_PARAM_VALUES = 1 << 14  # per tensor, each of scale and zero_point
#: Longest `image.source`, UTF-8 bytes: a path or file name, for logs only (a longer one was
#: parsed, copied and held three times over: 200 MiB of it took 1.8 GB).
MAX_SOURCE_BYTES = 4096
#: Longest request_id and model_fingerprint, UTF-8 bytes, refused before they are copied: an
#: id is at most MAX_REQUEST_ID_CHARS characters (4 bytes each at most), a fingerprint 64.
MAX_KEY_BYTES = 4 * MAX_REQUEST_ID_CHARS
#: Bytes of the fields this server does not know (a newer edge's, or a known number with
#: another wire type), the whole request's together: protobuf keeps them with the parsed
#: message, so they are bounded as the known fields are.
MAX_UNKNOWN_BYTES = 64 << 10
#: Longest GetManifestRequest, bytes: it holds one fingerprint (66 bytes), and more (unknown
#: fields, a long text) would be parsed and kept.
MAX_MANIFEST_REQUEST_BYTES = 4096


def call_from_proto(request: pb.DetectRequest) -> DetectCall:
    """A DetectRequest as the core's DetectCall (no validation: the core does that)."""
    return DetectCall(
        request_id=request.request_id,
        fingerprint=request.model_fingerprint,
        image=image_from_proto(request.image),
        tensors=tensors_from_proto(request),
    )


def result_to_proto(result: DetectResult) -> pb.DetectResponse:
    """The core's DetectResult as a DetectResponse."""
    t = result.timings
    return pb.DetectResponse(
        request_id=result.request_id,
        model_fingerprint=result.fingerprint,
        boxes=[
            pb.Box(
                x1=d.box[0],
                y1=d.box[1],
                x2=d.box[2],
                y2=d.box[3],
                score=d.score,
                label=d.label,
                class_name=d.class_name,
            )
            for d in result.detections
        ],
        timings=pb.ServerTimings(
            decode_s=t.decode_s, rpn_s=t.rpn_s, roi_s=t.roi_s, total_s=t.total_s
        ),
        cached=result.cached,
    )


_M = TypeVar("_M", bound=Message)


def parse_message(message_type: type[_M], raw: bytes) -> _M:
    """`raw` parsed as a `message_type`.

    Raises:
        InvalidRequest: `raw` is not that protobuf message.
    """
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(
            f"request is not a valid {message_type.DESCRIPTOR.full_name} protobuf ({exc})"
        ) from None


# Field numbers in proto/splitdet/v1/detection.proto.
_REQUEST_ID, _REQUEST_FINGERPRINT, _REQUEST_IMAGE, _REQUEST_TENSORS = 1, 2, 3, 4
_TENSOR_SHAPE, _TENSOR_SCALE, _TENSOR_ZERO_POINT = 2, 5, 6
_IMAGE_SOURCE = 5
#: Wire type of each protobuf field type that is not a varint (0): 1 fixed64, 2
#: length-delimited, 5 fixed32.
_WIRE_OF_TYPE = {
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
}


def _known_fields(message: type[Message]) -> frozenset[tuple[int, int]]:
    """(field number, wire type) of every field `message` declares, a repeated scalar's packed
    form (2) too: any other is unknown to protobuf, which keeps its bytes (MAX_UNKNOWN_BYTES)."""
    known = set()
    for field in message.DESCRIPTOR.fields:
        wire = _WIRE_OF_TYPE.get(field.type, 0)
        known.add((field.number, wire))
        if field.is_repeated:
            known.add((field.number, 2))
    return frozenset(known)


_KNOWN_REQUEST = _known_fields(pb.DetectRequest)
_KNOWN_IMAGE = _known_fields(pb.ImageMeta)
_KNOWN_TENSOR = _known_fields(pb.EncodedTensor)
#: Tensor field -> (its name, most values it may hold).
_TENSOR_BOUNDS = {
    _TENSOR_SHAPE: ("shape", MAX_SHAPE_VALUES),
    _TENSOR_SCALE: ("scale", MAX_PARAM_VALUES),
    _TENSOR_ZERO_POINT: ("zero_point", MAX_PARAM_VALUES),
}


def check_request_wire(raw: bytes) -> tuple[str, str]:
    """Refuse a serialized DetectRequest whose repeated fields are beyond the MAX_* bounds,
    whose texts are longer than theirs (`image.source`: MAX_SOURCE_BYTES; request_id and
    model_fingerprint: MAX_KEY_BYTES) or whose unknown fields hold more than
    MAX_UNKNOWN_BYTES; return its (request_id, model_fingerprint), read on the way (the last
    occurrence wins, as in protobuf), so that a call can be checked before it is parsed.

    Walks the request's fields and those of its image and tensors without parsing or copying
    anything (other fields, `data` included, are skipped by their length), so that the parser
    never sees a million empty tensors, a shape of millions of dimensions or a source of
    hundreds of MB.

    Raises:
        InvalidRequest: a bound is exceeded, the bytes are not protobuf wire format, or a key
            is not UTF-8 text.
    """
    budget = [MAX_WIRE_FIELDS]
    tensors = 0
    unknown = [0]  # bytes of unknown fields so far
    keys = {_REQUEST_ID: (0, 0), _REQUEST_FINGERPRINT: (0, 0)}
    for number, wire, start, end in _wire_fields(raw, 0, len(raw), budget):
        _count_unknown(number, wire, start, end, _KNOWN_REQUEST, "request", unknown)
        if number in keys and wire == 2:
            if end - start > MAX_KEY_BYTES:
                what = "request_id" if number == _REQUEST_ID else "model_fingerprint"
                raise InvalidRequest(
                    f"{what} is {end - start} bytes, more than the {MAX_KEY_BYTES} allowed "
                    f"(a request_id is 1..{MAX_REQUEST_ID_CHARS} characters, a fingerprint 64)"
                )
            keys[number] = (start, end)
        if number == _REQUEST_IMAGE and wire == 2:
            _check_image(raw, start, end, budget, unknown)
        if number != _REQUEST_TENSORS or wire != 2:
            continue
        tensors += 1
        if tensors > MAX_TENSORS:
            raise InvalidRequest(f"request has more than {MAX_TENSORS} tensors")
        counts = dict.fromkeys(_TENSOR_BOUNDS, 0)
        for field, kind, first, last in _wire_fields(raw, start, end, budget):
            _count_unknown(field, kind, first, last, _KNOWN_TENSOR, "tensor", unknown)
            if field == _TENSOR_SHAPE and kind == 2:  # packed varints of 1..10 bytes each
                size = last - first
                if size > 10 * MAX_SHAPE_VALUES:
                    counts[field] += size  # too long for the bound whatever the values
                else:
                    counts[field] += sum(byte < 0x80 for byte in raw[first:last])  # value ends
            elif field in (_TENSOR_SCALE, _TENSOR_ZERO_POINT) and kind == 2:  # packed doubles
                counts[field] += (last - first) // 8
            elif field in counts:
                counts[field] += 1
        for field, (what, bound) in _TENSOR_BOUNDS.items():
            if counts[field] > bound:
                raise InvalidRequest(f"tensor {tensors - 1}: {what} has more than {bound} values")
    if budget[0] < 0:
        raise InvalidRequest(f"request has more than {MAX_WIRE_FIELDS} protobuf fields")
    (id_start, id_end), (fp_start, fp_end) = keys[_REQUEST_ID], keys[_REQUEST_FINGERPRINT]
    try:
        return raw[id_start:id_end].decode("utf-8"), raw[fp_start:fp_end].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("request_id or model_fingerprint is not UTF-8 text") from None


def check_manifest_request_wire(raw: bytes) -> None:
    """Refuse a serialized GetManifestRequest longer than MAX_MANIFEST_REQUEST_BYTES before it
    is parsed.

    Raises:
        InvalidRequest: it is longer.
    """
    if len(raw) > MAX_MANIFEST_REQUEST_BYTES:
        raise InvalidRequest(
            f"GetManifest request of {len(raw)} bytes is longer than the "
            f"{MAX_MANIFEST_REQUEST_BYTES} allowed (it holds one model fingerprint)"
        )


def _check_image(raw: bytes, start: int, end: int, budget: list[int], unknown: list[int]) -> None:
    """Refuse an ImageMeta (raw[start:end]) whose `source` is longer than MAX_SOURCE_BYTES
    (each occurrence: protobuf keeps the last, but parses every one) or whose unknown fields
    take the request's past MAX_UNKNOWN_BYTES."""
    for field, kind, first, last in _wire_fields(raw, start, end, budget):
        _count_unknown(field, kind, first, last, _KNOWN_IMAGE, "image", unknown)
        if field == _IMAGE_SOURCE and kind == 2 and last - first > MAX_SOURCE_BYTES:
            raise InvalidRequest(
                f"image.source is {last - first} bytes, more than the {MAX_SOURCE_BYTES} allowed "
                "(it names where the image came from, for logs only: send a path or file name)"
            )


def _count_unknown(
    number: int,
    wire: int,
    start: int,
    end: int,
    known: frozenset[tuple[int, int]],
    where: str,
    unknown: list[int],
) -> None:
    """Add a field's bytes to `unknown[0]` when (`number`, `wire`) is not one of `known`;
    refuse the request once they pass MAX_UNKNOWN_BYTES."""
    if (number, wire) in known:
        return
    unknown[0] += end - start
    if unknown[0] > MAX_UNKNOWN_BYTES:
        raise InvalidRequest(
            f"request has more than {MAX_UNKNOWN_BYTES} bytes of fields this server does not "
            f"know ({where} field {number}, wire type {wire}, is {end - start} bytes): a "
            "splitdet edge of a newer version, or not a splitdet DetectRequest"
        )


def _wire_fields(
    raw: bytes, pos: int, end: int, budget: list[int]
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in raw[pos:end].

    Fields inside (deprecated) groups are skipped; a group closed at this depth is yielded as
    one field of wire type 3 (its value: the group's fields and end key). Every field spends one
    unit of `budget[0]`; the walk stops when it is spent (the caller refuses the request).
    """
    depth = 0
    group = (0, 0)  # (number, start) of the group open at depth 0
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            return
        key, pos = _varint(raw, pos, end)
        number, wire = key >> 3, key & 7
        start = pos
        if wire == 0:
            _, pos = _varint(raw, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, start = _varint(raw, pos, end)
            pos = start + length
        elif wire == 5:
            pos += 4
        elif wire == 3:
            if depth == 0:
                group = (number, start)
            depth += 1
            continue
        elif wire == 4 and depth > 0:
            depth -= 1
            if depth == 0:  # a whole group, its fields skipped: one unknown field
                yield group[0], 3, group[1], pos
            continue
        else:
            raise _malformed(f"wire type {wire} at byte {start}")
        if number == 0 or pos > end:
            raise _malformed(f"field {number} at byte {start} is invalid or truncated")
        if depth == 0:
            yield number, wire, start, pos


def _varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            break
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _malformed(f"truncated or overlong varint before byte {pos}")


def _malformed(problem: str) -> InvalidRequest:
    return InvalidRequest(
        f"request is not a valid {pb.DetectRequest.DESCRIPTOR.full_name} ({problem})"
    )
