"""Property-based fuzzing of the cloud's untrusted-input path.

Starts from VALID requests (the codec's own `encode` on small random levels of the spec's shapes)
and mutates fields: shapes, codec and dtype names, quantisation parameters, zstd frames, level
names, image sizes, request id, fingerprint, and the serialized protobuf itself. The contract:

    codec.decode               returns arrays of exactly the expected shapes, float32 and finite,
                               or raises CodecError; never allocates for a size it was only told
    DetectionServicer.Detect   answers a DetectResponse, or refuses with INVALID_ARGUMENT or
                               FAILED_PRECONDITION in a short message; nothing else

Requests go through the servicer's own Detect (`_detect`), as a gRPC server calls it with a
call's bytes: the wire bounds, the model and id checks, the parsing, the core's checks and its
detect, in production's order, over a DetectionCore whose heads only record what reached them.

Bounded and reproducible (derandomized). For a longer exploratory run:
    SPLITDET_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_wire_fuzz.py
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tracemalloc

import grpc
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitdet.cloud.call_status import MAX_STATUS_CHARS, status_for
from splitdet.cloud.core import MAX_ORIGINAL_SIDE, MAX_RESIZED_SIDE, DetectionCore, InvalidRequest
from splitdet.cloud.idempotency import IdempotencyStore
from splitdet.cloud.metrics import ServerMetrics
from splitdet.cloud.request_wire import call_from_proto
from splitdet.cloud.servicer import DetectionServicer
from splitdet.edge.preprocess import resized_size
from splitdet.shared import codec
from splitdet.shared.codec import CodecError, EncodedTensor, decode, encode
from splitdet.shared.config import ModelConfig
from splitdet.shared.detection import ImageMeta
from splitdet.shared.manifest import Manifest
from splitdet.shared.messages import build_request
from splitdet.shared.spec import LEVEL_NAMES, SplitSpec, padded_size
from splitdet.shared.wire import detection_pb2 as pb

from support import pb_field, pb_varint

EXAMPLES = int(os.environ.get("SPLITDET_FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPEC = SplitSpec(fpn_channels=4)
C = SPEC.fpn_channels
FINGERPRINT = "f" * 64
#: Small enough that a fuzzed request is cheap; large enough for every valid base request.
MAX_DECODED = 1 << 20
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
UINT32 = st.integers(0, (1 << 32) - 1)
#: Text protobuf can carry (valid UTF-8: no lone surrogates).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
#: Text an attacker may send where a short name belongs (status messages must stay short).
LONG_TEXT = st.sampled_from(["x" * 100_000, "é" * 5000, "\n" * 3000])
NAME = st.one_of(TEXT, LONG_TEXT)
#: Longest refusal message accepted: it travels in a gRPC trailer (clients take 8 KiB by default)
#: and into the server's log.
MAX_MESSAGE_CHARS = MAX_STATUS_CHARS


# ------------------------------------------------------------------------------- valid bases


@st.composite
def valid_levels(
    draw: st.DrawFn, resized: tuple[int, int] | None = None
) -> tuple[list[EncodedTensor], tuple[int, int]]:
    """A valid encoding of the five levels for `resized` (None: a random small resized size),
    and that size."""
    if resized is None:
        resized = (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
    shapes = codec.expected_level_shapes(SPEC, padded_size(*resized))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([1.0, 1e-30, 1e4, 3e38]))
    name = draw(st.sampled_from(codec.CODECS))
    if name == "fp16":
        magnitude = min(magnitude, 1e4)
    arrays = {
        n: (np.maximum(rng.uniform(-1, 1, size=s), 0) * magnitude).astype(np.float32)
        for n, s in shapes.items()
    }
    return encode(arrays, name, level=draw(st.sampled_from([-3, 1, 3]))), resized


# ---------------------------------------------------------------------------------- mutations


def _frame_header(content_size: int, window_log: int = 20, checksum: bool = False) -> bytes:
    """A zstd frame header with an 8-byte content size field and a window descriptor."""
    descriptor = 0xC0 | (0x04 if checksum else 0)
    return (
        codec._ZSTD_MAGIC
        + bytes([descriptor, (window_log - 10) << 3])
        + ((content_size % (1 << 64)).to_bytes(8, "little"))
    )


@st.composite
def mutated_data(draw: st.DrawFn, data: bytes, nbytes: int) -> bytes:
    """`data` (a valid frame of `nbytes` content) damaged in one of many ways."""
    small = min(nbytes, 1 << 16)  # content for the re-made frames (the claim may be huge)
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "append",
                "concat",
                "empty",
                "random",
                "magic_random",
                "huge_header",
                "header_only",
                "raw_block",
                "rle_block",
                "no_content_size",
                "checksum",
                "overwrite",
                "skippable",
            ]
        )
    )
    data = data or _frame_header(nbytes)  # damage something frame-like
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "concat":
        return data + draw(st.sampled_from([data, zstandard.compress(b"x" * 16), b""]))
    if kind == "empty":
        return b""
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "magic_random":
        return codec._ZSTD_MAGIC + draw(st.binary(max_size=64))
    if kind == "huge_header":
        size = draw(st.sampled_from([nbytes, 8 << 30, (1 << 64) - 1, nbytes + 1, nbytes - 1]))
        window = draw(st.integers(10, 41))
        return _frame_header(max(size, 0), window) + draw(st.binary(max_size=32))
    if kind == "header_only":
        return _frame_header(nbytes)
    if kind == "raw_block":
        # A well-formed header and one raw block whose size field says anything at all.
        size = draw(st.integers(0, (1 << 21) - 1))
        last = draw(st.integers(0, 1))
        payload = draw(st.binary(max_size=64))
        return _frame_header(nbytes) + (last | (size << 3)).to_bytes(3, "little") + payload
    if kind == "rle_block":
        # RLE blocks: one byte of payload repeated `size` times (a cheap way to claim content).
        blocks = b""
        for i in range(draw(st.integers(1, 4))):
            size = draw(st.integers(0, (1 << 21) - 1))
            last = int(i == 3 or draw(st.booleans()))
            blocks += (last | (1 << 1) | (size << 3)).to_bytes(3, "little") + b"\x01"
            if last:
                break
        return _frame_header(nbytes) + blocks
    if kind == "no_content_size":
        compressor = zstandard.ZstdCompressor(write_content_size=False)
        return compressor.compress(bytes(small))
    if kind == "checksum":
        compressor = zstandard.ZstdCompressor(write_checksum=True)
        out = bytearray(compressor.compress(bytes(small)))
        if draw(st.booleans()):
            out[-1] ^= 0xFF  # wrong checksum
        return bytes(out)
    if kind == "overwrite":
        out = bytearray(data)
        start = draw(st.integers(0, len(out) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        out[start : start + len(chunk)] = chunk
        return bytes(out)
    # skippable frame before the real one
    return b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip" + data


SHAPE_DIM = st.one_of(
    st.integers(-3, 300),
    INT64,
    st.sampled_from([codec.MAX_DIM, codec.MAX_DIM + 1, 1 << 31, 1 << 32, 1 << 62]),
)
FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-300, 1e300, 3.5e38, -3.5e38, 1.0]),
)


@st.composite
def mutated_tensor(draw: st.DrawFn, tensor: EncodedTensor) -> EncodedTensor:
    """`tensor` with one field damaged."""
    field = draw(
        st.sampled_from(
            ["shape", "shape_off_by_one", "codec", "dtype", "codec_pair", "scale", "zero_point",
             "param_value", "data", "name"]
        )
    )  # fmt: skip
    if field == "shape":
        dims = st.one_of(st.lists(SHAPE_DIM, max_size=6), st.just([1] * 10_000))
        return dataclasses.replace(tensor, shape=tuple(draw(dims)))
    if field == "shape_off_by_one" and tensor.shape:
        shape = list(tensor.shape)
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.sampled_from([shape[i] + 1, shape[i] - 1, shape[i] * 2, 0]))
        return dataclasses.replace(tensor, shape=tuple(shape))
    if field == "codec":
        return dataclasses.replace(
            tensor, codec=draw(st.one_of(NAME, st.sampled_from(codec.CODECS)))
        )
    if field == "dtype":
        dtypes = st.sampled_from(["float32", "float16", "uint8", "int8", "float64", ""])
        return dataclasses.replace(tensor, dtype=draw(st.one_of(NAME, dtypes)))
    if field == "codec_pair":  # consistent codec and dtype, but not what the data holds
        name = draw(st.sampled_from(codec.CODECS))
        return dataclasses.replace(tensor, codec=name, dtype=codec.STORED_DTYPE[name])
    if field in ("scale", "zero_point"):
        length = draw(st.one_of(st.sampled_from([0, C - 1, C, C + 1]), st.integers(0, 40)))
        values = tuple(draw(st.lists(FLOAT, min_size=length, max_size=length)))
        return dataclasses.replace(tensor, **{field: values})
    if field == "param_value" and tensor.scale and tensor.zero_point:
        which = draw(st.sampled_from(["scale", "zero_point"]))
        values = list(getattr(tensor, which))
        values[draw(st.integers(0, len(values) - 1))] = draw(FLOAT)
        return dataclasses.replace(tensor, **{which: tuple(values)})
    if field == "name":
        names = st.sampled_from([*LEVEL_NAMES, "", "p6", "0 ", "x" * 65])
        return dataclasses.replace(tensor, name=draw(st.one_of(names, NAME)))
    itemsize = np.dtype(codec.STORED_DTYPE.get(tensor.codec, "float32")).itemsize
    nbytes = max(1, math.prod(tensor.shape) * itemsize)
    return dataclasses.replace(tensor, data=draw(mutated_data(tensor.data, nbytes)))


@st.composite
def mutated_levels(draw: st.DrawFn, encoded: list[EncodedTensor]) -> list[EncodedTensor]:
    """The level list with 0..3 damaged tensors and perhaps levels dropped, repeated or swapped."""
    out = list(encoded)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(out) - 1))
        out[i] = draw(mutated_tensor(out[i]))
    action = draw(
        st.sampled_from(["none", "none", "drop", "duplicate", "swap_data", "shuffle", "many"])
    )
    if action == "drop" and out:
        del out[draw(st.integers(0, len(out) - 1))]
    elif action == "duplicate" and out:
        out.append(out[draw(st.integers(0, len(out) - 1))])
    elif action == "swap_data" and len(out) > 1:
        i, j = draw(st.lists(st.integers(0, len(out) - 1), min_size=2, max_size=2, unique=True))
        out[i], out[j] = (
            dataclasses.replace(out[i], data=out[j].data),
            dataclasses.replace(out[j], data=out[i].data),
        )
    elif action == "shuffle":
        out = draw(st.permutations(out))
    elif action == "many":  # more tensors than levels, empty or copies
        empty = EncodedTensor("", (), "", "", (), (), b"")
        extra = draw(st.sampled_from([empty, *out])) if out else empty
        out += [extra] * draw(st.integers(1, 40))
    return out


# --------------------------------------------------------------------------------- the codec


def _check_decoded(out: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> None:
    assert list(out) == [n for n in out if n in shapes] and set(out) == set(shapes)
    for name, array in out.items():
        assert array.dtype == np.float32, name
        assert array.shape == tuple(shapes[name]), (name, array.shape, shapes[name])
        assert np.isfinite(array).all(), f"{name}: accepted values that are not finite"


def _decode_traced(
    mutated: list[EncodedTensor], shapes: dict | None, bound: int
) -> tuple[dict | None, int]:
    """decode() under tracemalloc: (its output, or None if refused in short words; peak bytes)."""
    tracemalloc.start()
    try:
        out = decode(mutated, shapes, max_total_bytes=bound)
    except CodecError as exc:
        assert 0 < len(str(exc)) <= MAX_MESSAGE_CHARS, str(exc)[:2000]
        out = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return out, peak


@FUZZ
@given(st.data())
def test_decode_refuses_or_returns_the_expected_shapes(data: st.DataObject) -> None:
    encoded, resized = data.draw(valid_levels())
    shapes = codec.expected_level_shapes(SPEC, padded_size(*resized))
    mutated = data.draw(mutated_levels(encoded))
    out, peak = _decode_traced(mutated, shapes, MAX_DECODED)
    # nothing sized by a claim: at most the true output (float32) and its stored bytes, twice
    expected = sum(math.prod(s) for s in shapes.values()) * 4
    assert peak < 4 * expected + (1 << 20), f"peak {peak} bytes for {expected} bytes of output"
    if out is not None:
        _check_decoded(out, shapes)


@FUZZ
@given(st.data())
def test_decode_without_expected_shapes_trusts_nothing(data: st.DataObject) -> None:
    """No expected shapes: the claimed shapes rule, so the byte bound alone limits memory."""
    encoded, _ = data.draw(valid_levels())
    mutated = data.draw(mutated_levels(encoded))
    bound = 1 << 18
    out, peak = _decode_traced(mutated, None, bound)
    assert peak < 4 * bound + (1 << 20), f"peak {peak} bytes for a {bound}-byte bound"
    if out is not None:
        _check_decoded(out, {t.name: tuple(t.shape) for t in mutated})


@FUZZ
@given(valid_levels())
def test_unmutated_levels_decode(base: tuple[list[EncodedTensor], tuple[int, int]]) -> None:
    """The bases are valid: the refusals above are not just of inputs that never had a chance."""
    encoded, resized = base
    shapes = codec.expected_level_shapes(SPEC, padded_size(*resized))
    _check_decoded(decode(encoded, shapes, max_total_bytes=MAX_DECODED), shapes)


# --------------------------------------------------------------- request -> DetectionCore


class _RecordingHeads:
    """Stands in for the RPN + ROI heads: records what reached them, answers no boxes."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, tuple[int, ...]], tuple, tuple]] = []
        self.features: dict[str, np.ndarray] = {}  # the last call's

    def detect(self, features, image_sizes, original_sizes, timings=None):
        for name, tensor in features.items():
            assert torch.isfinite(tensor).all(), f"{name}: non-finite features reached the heads"
        shapes = {name: tuple(t.shape[1:]) for name, t in features.items()}
        self.calls.append((shapes, tuple(image_sizes), tuple(original_sizes)))
        self.features = {name: t[0].numpy().copy() for name, t in features.items()}
        empty = torch.zeros(0)
        return [{"boxes": torch.zeros(0, 4), "scores": empty, "labels": empty.long()}]


class _Refused(Exception):
    """What `_Context.abort` raises: the status a refused call ends with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class _Context:
    """A Detect call's grpc.ServicerContext as the servicer reads it: a loopback caller with
    no metadata and no deadline, still connected; `abort` raises `_Refused`."""

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Refused(code, details)


def _servicer(channels: int = C) -> tuple[DetectionServicer, _RecordingHeads]:
    """The servicer a `splitdet cloud` runs, over a core serving one model of `channels` FPN
    channels and 96 px inputs (FINGERPRINT), with an answers store, its heads recording."""
    heads = _RecordingHeads()
    config = ModelConfig(class_names=("scratch",), fpn_channels=channels, min_size=96,
                         max_size=96)  # fmt: skip
    manifest = Manifest(config, 0.5, "int8", {}, FINGERPRINT)
    store = IdempotencyStore(":memory:", 1000)
    core = DetectionCore(heads, manifest, store, max_decoded_bytes=MAX_DECODED)  # type: ignore[arg-type]
    return DetectionServicer(core, ServerMetrics((FINGERPRINT,)), max_concurrent=1), heads


SIDE = st.one_of(
    st.integers(0, 100),
    UINT32,
    st.sampled_from(
        [MAX_RESIZED_SIDE, MAX_RESIZED_SIDE + 1, MAX_ORIGINAL_SIDE, MAX_ORIGINAL_SIDE + 1]
    ),
)
REQUEST_ID = st.one_of(
    st.uuids().map(str),
    TEXT,
    LONG_TEXT,
    st.sampled_from(["", " ", "\n", "a\x00b", "é" * 128, "é" * 129, "\u200b"]),
)


@st.composite
def valid_request(draw: st.DrawFn) -> pb.DetectRequest:
    """A request the served model (96 px inputs) takes: its resized size is the one its
    original size resizes to (the cloud refuses any other)."""
    short = draw(st.integers(1, 2000))
    original = (short, draw(st.integers(short, min(2000, short * 96))))
    if draw(st.booleans()):
        original = original[::-1]
    resized = resized_size(*original, 96, 96)
    encoded, _ = draw(valid_levels(resized))
    image = ImageMeta(original_hw=original, resized_hw=resized, source="fuzz")
    return build_request(encoded, image, draw(st.uuids()).hex, FINGERPRINT)


@st.composite
def mutated_request(draw: st.DrawFn) -> pb.DetectRequest:
    request = draw(valid_request())
    encoded, _ = _tensors_of(request)
    fields = draw(
        st.lists(
            st.sampled_from(["tensors", "image", "request_id", "fingerprint", "source"]),
            min_size=1,
            max_size=3,
        )
    )
    image = ImageMeta(
        (request.image.original_height, request.image.original_width),
        (request.image.resized_height, request.image.resized_width),
        request.image.source,
    )
    request_id, fingerprint = request.request_id, request.model_fingerprint
    for field in fields:
        if field == "tensors":
            encoded = draw(mutated_levels(encoded))
        elif field == "image":
            which = draw(st.sampled_from(["original", "resized", "both", "bigger"]))
            original, resized = image.original_hw, image.resized_hw
            if which in ("original", "both"):
                original = (draw(SIDE), draw(SIDE))
            if which in ("resized", "both"):
                resized = (draw(SIDE), draw(SIDE))
            if which == "bigger":  # resized larger than the original
                original = (max(1, resized[0] // 4), max(1, resized[1] // 7))
            image = ImageMeta(original, resized, image.source)
        elif field == "request_id":
            request_id = draw(REQUEST_ID)
        elif field == "fingerprint":
            fingerprint = draw(st.one_of(NAME, st.just(FINGERPRINT[:-1] + "0")))
        else:
            image = ImageMeta(image.original_hw, image.resized_hw, draw(NAME))
    return build_request(encoded, image, request_id, fingerprint)


def _tensors_of(request: pb.DetectRequest) -> tuple[list[EncodedTensor], ImageMeta]:
    call = call_from_proto(request)
    return list(call.tensors), call.image


#: The statuses a malformed request may end with: INVALID_ARGUMENT (InvalidRequest, the
#: codec's CodecError) and FAILED_PRECONDITION (FingerprintMismatch: a model not served).
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def _serve(servicer: DetectionServicer, raw: bytes) -> pb.DetectResponse | None:
    """The servicer's answer to a Detect call of `raw`; None for a documented refusal."""
    try:
        return pb.DetectResponse.FromString(servicer.Detect(raw, _Context()))
    except _Refused as refused:
        assert refused.code in REFUSALS, str(refused)[:2000]
        assert 0 < len(refused.details) <= MAX_MESSAGE_CHARS, refused.details[:2000]
        return None


def _check_served(
    result: pb.DetectResponse | None, heads: _RecordingHeads, request: pb.DetectRequest
) -> None:
    if result is None or result.cached:
        return
    shapes, image_sizes, original_sizes = heads.calls[-1]
    resized = (request.image.resized_height, request.image.resized_width)
    assert image_sizes == (resized,)
    assert original_sizes == ((request.image.original_height, request.image.original_width),)
    assert shapes == codec.expected_level_shapes(SPEC, padded_size(*resized))
    assert result.model_fingerprint == FINGERPRINT and result.request_id == request.request_id


@FUZZ
@given(mutated_request())
def test_servicer_refuses_mutated_requests_cleanly(request: pb.DetectRequest) -> None:
    servicer, heads = _servicer()
    result = _serve(servicer, request.SerializeToString())
    _check_served(result, heads, request)


_WIRE_TAILS = {
    "empty tensors": pb_field(4, b"") * 2000,
    "long packed shape": pb_field(4, pb_field(2, b"\x01" * 5000)),
    "long unpacked shape": pb_field(4, b"\x10\x01" * 100),
    "long packed scale": pb_field(4, pb_field(5, bytes(8 * 20_000))),
    "unknown varints": b"\x78\x00" * 10_000,
    "unknown in a tensor": pb_field(4, b"\x78\x00" * 20_000),
    "nested groups": pb_varint(15 << 3 | 3) * 200 + pb_varint(15 << 3 | 4) * 200,
    "a group as the tensors": pb_varint(4 << 3 | 3) + pb_varint(4 << 3 | 4),
    "image again": pb_field(3, b"\x08\x01"),
    "bad wire type": b"\x7f",
    "truncated length": b"\x22\xff\xff\xff\x0f",
    "overlong varint": b"\x08" + b"\xff" * 11,
}


@FUZZ
@given(valid_request(), st.data())
def test_servicer_refuses_damaged_protobuf_bytes_cleanly(
    request: pb.DetectRequest, data: st.DataObject
) -> None:
    raw = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "splice", "append"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if how == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            del raw[i : i + data.draw(st.integers(1, 64))]
        elif how == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif how == "splice":
            raw[i:i] = raw[: data.draw(st.integers(0, 64))]
        else:  # fields a valid request never has: repeated, unknown, grouped, many empty tensors
            tail = data.draw(st.sampled_from(sorted(_WIRE_TAILS)))
            raw += _WIRE_TAILS[tail] * data.draw(st.integers(1, 3))
    servicer, heads = _servicer()
    result = _serve(servicer, bytes(raw))
    if result is not None:
        _check_served(result, heads, pb.DetectRequest.FromString(bytes(raw)))


@FUZZ
@given(valid_request())
def test_servicer_serves_unmutated_requests(request: pb.DetectRequest) -> None:
    servicer, heads = _servicer()
    result = _serve(servicer, request.SerializeToString())
    assert result is not None and not result.cached
    _check_served(result, heads, request)
    again = _serve(servicer, request.SerializeToString())
    assert again is not None and again.cached


# ------------------------------------------------------------------ regressions of findings


def _valid_request_bytes(channels: int = C) -> tuple[pb.DetectRequest, list[EncodedTensor]]:
    spec = SplitSpec(fpn_channels=channels)
    rng = np.random.default_rng(0)
    shapes = codec.expected_level_shapes(spec, (32, 96))
    encoded = encode({n: rng.random(s, dtype=np.float32) for n, s in shapes.items()}, "int8")
    image = ImageMeta(original_hw=(40, 120), resized_hw=(32, 96), source="regression")
    return build_request(encoded, image, "regression", FINGERPRINT), encoded


WIRE_BOMBS = {
    # name: (appended to a valid request, what the refusal names); each parsed to ~100x its size
    "a million empty tensors": (pb_field(4, b"") * (1 << 20), "more than 16 tensors"),
    "a shape of 3 million dimensions": (
        pb_field(4, pb_field(1, b"0") + pb_field(2, b"\x01" * (3 << 20))),
        "shape has more than 16 values",
    ),
    "an unpacked shape of 17 dimensions": (pb_field(4, b"\x10\x01" * 17), "shape has more"),
    "a scale of a million values": (pb_field(4, pb_field(5, bytes(8 << 20))), "scale has more"),
    "a zero_point of 16385 unpacked values": (
        pb_field(4, (b"\x31" + bytes(8)) * 16_385),
        "protobuf fields",
    ),
    "a million unknown fields": (b"\x78\x00" * (1 << 20), "protobuf fields"),
    "groups nested 10000 deep": (
        pb_varint(15 << 3 | 3) * 10_000 + pb_varint(15 << 3 | 4) * 10_000,
        "protobuf fields",
    ),
    "wire type 7": (b"\x7f", "wire type 7"),
    "a length beyond the end": (b"\x22\xff\xff\xff\x0f", "truncated"),
    "an 11-byte varint": (b"\x08" + b"\xff" * 11, "varint"),
}


@pytest.mark.parametrize("case", sorted(WIRE_BOMBS))
def test_wire_bombs_are_refused_before_parsing(case):
    request, _ = _valid_request_bytes()
    tail, named = WIRE_BOMBS[case]
    raw = request.SerializeToString() + tail
    servicer, heads = _servicer()
    with pytest.raises(_Refused, match=named) as refused:
        servicer.Detect(raw, _Context())
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT and not heads.calls
    assert len(refused.value.details) <= MAX_STATUS_CHARS


_BOMB_RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
from test_wire_fuzz import WIRE_BOMBS, _Context, _Refused, _servicer, _valid_request_bytes

raw = _valid_request_bytes()[0].SerializeToString() + WIRE_BOMBS[sys.argv[2]][0]
servicer, _ = _servicer()

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

before = peak_mib()
try:
    servicer.Detect(raw, _Context())
except _Refused:
    pass
print(peak_mib() - before)
"""


@pytest.mark.parametrize("case", ["a million empty tensors", "a shape of 3 million dimensions"])
def test_wire_bombs_do_not_inflate_memory(case):
    """Without the wire bounds the million empty tensors (2 MiB) took ~550 MiB to parse and
    convert, the 3 MiB shape ~70 MiB; at the server's 256 MiB message bound, tens of GiB."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", _BOMB_RUNNER, tests_dir, case],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 24, f"{case}: peak memory grew by {growth_mib:.0f} MiB"


def _unpacked(request: pb.DetectRequest, encoded: list[EncodedTensor]) -> bytes:
    """`request` serialized with every repeated scalar unpacked (valid protobuf, rarely sent)."""
    raw = pb_field(1, request.request_id.encode()) + pb_field(2, request.model_fingerprint.encode())
    raw += pb_field(3, request.image.SerializeToString())
    for t in encoded:
        body = pb_field(1, t.name.encode())
        body += b"".join(b"\x10" + pb_varint(d) for d in t.shape)
        body += pb_field(3, t.codec.encode()) + pb_field(4, t.dtype.encode())
        body += b"".join(b"\x29" + np.float64(v).tobytes() for v in t.scale)
        body += b"".join(b"\x31" + np.float64(v).tobytes() for v in t.zero_point)
        raw += pb_field(4, body + pb_field(7, t.data))
    return raw


def test_wire_bounds_pass_valid_requests_packed_or_not():
    """256 channels (torchvision's FPN width), unpacked: the bounds leave valid protobuf alone,
    and the heads get the levels the edge encoded either way."""
    request, encoded = _valid_request_bytes(channels=256)
    unpacked = _unpacked(request, encoded)
    assert pb.DetectRequest.FromString(unpacked) == request
    sent = decode(encoded)
    for raw in (request.SerializeToString(), unpacked):
        servicer, heads = _servicer(channels=256)
        answer = _serve(servicer, raw)
        assert answer is not None and not answer.cached
        assert set(heads.features) == set(sent)
        for name, array in sent.items():
            np.testing.assert_array_equal(heads.features[name], array, err_msg=name)


LONG = {
    "name": "é" * 50_000,
    "codec": "x" * 100_000,
    "dtype": "\n" * 100_000,
    "shape": (1,) * 100_000,
}


@pytest.mark.parametrize("field", sorted(LONG))
def test_refusals_of_long_values_are_short(field):
    """A 100 kB codec name was echoed whole: gRPC could not send the status (the client saw
    RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit', a retryable code)."""
    _, encoded = _valid_request_bytes()
    encoded[1] = dataclasses.replace(encoded[1], **{field: LONG[field]})
    with pytest.raises(CodecError, match=field if field != "name" else "tensor name") as refused:
        decode(encoded)
    assert len(str(refused.value)) <= 200, str(refused.value)[:300]


def test_status_messages_are_cut_to_the_bound():
    code, message = status_for(InvalidRequest("tensor 'x': " + "é" * 100_000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) <= MAX_STATUS_CHARS and message.startswith("tensor 'x': éé")
    code, message = status_for(RuntimeError("y" * 100_000))
    assert code is grpc.StatusCode.INTERNAL and len(message) <= MAX_STATUS_CHARS
