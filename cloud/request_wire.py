"""A DetectRequest's way in and a DetectResponse's way out: the wire-level bounds checked
before a request is parsed (`check_request_wire`: the parser and the conversion to Python turn a
few wire bytes into many; an empty tensor is 2 bytes on the wire, hundreds in memory), the
parsing, and the conversion between protobuf and the core's DetectCall / DetectResult. A
malformed protobuf is an InvalidRequest naming the problem rather than gRPC's generic INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from splitdet.cloud.core import DetectCall, DetectResult, InvalidRequest
from splitdet.shared.messages import image_from_proto, tensors_from_proto
from splitdet.shared.wire import detection_pb2 as pb

#: Bounds on a DetectRequest's wire form, checked before it is parsed. Generous: a valid request
#: has 5 tensors of rank 3 with one scale and zero point per channel (256) and ~40 fields; beyond
#: these bounds only a hostile or broken sender goes, and the codec names smaller excesses.
MAX_WIRE_FIELDS = 1 << 14  # fields of the request and its tensors together, packed or not
MAX_TENSORS = 16
MAX_SHAPE_VALUES = 16  # per tensor
MAX_PARAM_VALUES = 1 << 14  # per tensor, each of scale and zero_point


def call_from_proto(request: pb.DetectRequest) -> DetectCall:
    """A DetectRequest as the core's DetectCall (no validation: the core does that)."""
    return DetectCall(
        request_id=request.request_id,
        fingerprint=request.model_fingerprint,
        image=image_from_proto(request.image),
        tensors=tensors_from_proto(request),
    )


def call_from_bytes(raw: bytes) -> DetectCall:
    """A serialized DetectRequest as the core's DetectCall: wire bounds checked, then parsed.

    Raises:
        InvalidRequest: beyond the wire bounds (`check_request_wire`) or not a DetectRequest.
    """
    check_request_wire(raw)
    return call_from_proto(parse_message(pb.DetectRequest, raw))


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
_REQUEST_ID, _REQUEST_FINGERPRINT, _REQUEST_TENSORS = 1, 2, 4
_TENSOR_SHAPE, _TENSOR_SCALE, _TENSOR_ZERO_POINT = 2, 5, 6
#: Tensor field -> (its name, most values it may hold).
_TENSOR_BOUNDS = {
    _TENSOR_SHAPE: ("shape", MAX_SHAPE_VALUES),
    _TENSOR_SCALE: ("scale", MAX_PARAM_VALUES),
    _TENSOR_ZERO_POINT: ("zero_point", MAX_PARAM_VALUES),
}


def check_request_wire(raw: bytes) -> tuple[str, str]:
    """Refuse a serialized DetectRequest whose repeated fields are beyond the MAX_* bounds;
    return its (request_id, model_fingerprint), read on the way (the last occurrence wins,
    as in protobuf), so that a call can be checked before it is parsed.

    Walks the request's fields and those of its tensors without parsing or copying anything
    (other fields, `data` included, are skipped by their length), so that the parser never sees
    a million empty tensors or a shape of millions of dimensions.

    Raises:
        InvalidRequest: a bound is exceeded, the bytes are not protobuf wire format, or a key
            is not UTF-8 text.
    """
    budget = [MAX_WIRE_FIELDS]
    tensors = 0
    keys = {_REQUEST_ID: b"", _REQUEST_FINGERPRINT: b""}
    for number, wire, start, end in _wire_fields(raw, 0, len(raw), budget):
        if number in keys and wire == 2:
            keys[number] = raw[start:end]
        if number != _REQUEST_TENSORS or wire != 2:
            continue
        tensors += 1
        if tensors > MAX_TENSORS:
            raise InvalidRequest(f"request has more than {MAX_TENSORS} tensors")
        counts = dict.fromkeys(_TENSOR_BOUNDS, 0)
        for field, kind, first, last in _wire_fields(raw, start, end, budget):
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
    try:
        return keys[_REQUEST_ID].decode("utf-8"), keys[_REQUEST_FINGERPRINT].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("request_id or model_fingerprint is not UTF-8 text") from None


def _wire_fields(
    raw: bytes, pos: int, end: int, budget: list[int]
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in raw[pos:end].

    Fields inside (deprecated) groups are skipped. Every field spends one unit of `budget[0]`;
    the walk stops when it is spent (the caller refuses the request).
    """
    depth = 0
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
            depth += 1
            continue
        elif wire == 4 and depth > 0:
            depth -= 1
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
