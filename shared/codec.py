"""The feature codec: FPN levels to compressed bytes on the edge, and back on the cloud.

The edge sends every FPN level of a defective image as an `EncodedTensor`: the level's name and
float32 shape `[C, h, w]`, the codec, the dtype of the stored values, per-channel quantisation
parameters (int8 only), and one zstd frame holding the stored values in C order, little-endian.

Codecs:
    fp32  the float32 values as they are (lossless).
    fp16  rounded to float16 (lossless for values that are exactly float16-representable).
    int8  per-channel affine (channel = axis 0), stored as uint8:
          ``x ~= q * scale[c] + zero_point[c]``, with ``zero_point[c]`` the channel minimum and
          ``scale[c]`` its range / 255; rounded to nearest, so the error is at most half a step.

`decode` treats every field as hostile (it runs on the cloud on bytes from the network): it checks
names, shapes, dtypes, quantisation parameters and the zstd frame's header, structure and window
against what the metadata implies before allocating anything, then decompresses through a bounded
read of exactly the expected byte count. Every refusal is a `CodecError` naming the tensor.

numpy and zstandard only: the edge has no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from splitdet.shared.spec import LEVEL_NAMES, SplitSpec

#: What zstd says when it cannot allocate its window ("Allocation error : not enough memory"):
#: a MemoryError (the cloud answers RESOURCE_EXHAUSTED, the edge retries), never a corrupt
#: frame (INVALID_ARGUMENT: a good request made a dead letter).
_ZSTD_OUT_OF_MEMORY = "not enough memory"

#: Codec names, in order of decreasing fidelity.
CODECS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: The stored dtype each codec implies (name on the wire, numpy dtype of the stored bytes).
STORED_DTYPE: dict[str, str] = {"fp32": "float32", "fp16": "float16", "int8": "uint8"}
_NUMPY_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
}
#: zstd levels `encode` accepts: the negative "fast" levels and 1..19. Ultra levels (20..22) are
#: refused because their windows (up to 128 MiB) exceed what `decode` accepts.
ZSTD_LEVELS = range(-7, 20)
#: Largest zstd window `decode` accepts, in bytes (level 19 uses 8 MiB).
MAX_WINDOW_SIZE = 1 << 24
#: Default bound on the float32 bytes one `decode` call may produce (an 800x960 input with 256
#: FPN channels is about 66 MB; the `paper` preset's 2048x2448 inputs need 411 MiB).
DEFAULT_MAX_TOTAL_BYTES = 512 << 20
#: Largest rank and largest single dimension a decoded shape may have.
MAX_RANK = 4
MAX_DIM = 1 << 20

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_F32 = np.finfo(np.float32)
_CHUNK_ELEMENTS = 1 << 18  # values quantised per step: the float temporaries stay in cache


class CodecError(ValueError):
    """An encoded tensor is malformed, inconsistent or hostile; the message names it."""


_Fail = Callable[[str], CodecError]  # builds a CodecError naming the tensor being checked
_SHOW_CHARS = 60  # longest repr of a hostile value in a message (it travels in a gRPC trailer)


def _show(value: object) -> str:
    """repr(value), cut to _SHOW_CHARS: refusal messages stay short whatever was sent."""
    text = repr(value)
    if len(text) <= _SHOW_CHARS:
        return text
    size = f", length {len(value)}" if isinstance(value, str | tuple | list) else ""
    return f"{text[:_SHOW_CHARS]}… (cut{size})"


@dataclass(frozen=True)
class EncodedTensor:
    """One FPN level as it crosses the wire.

    Attributes:
        name: level name ("0", "1", "2", "3", "pool").
        shape: shape of the original float32 array, e.g. (C, h, w).
        codec: one of CODECS.
        dtype: dtype of the stored values ("float32", "float16" or "uint8").
        scale: per-channel step (int8: one per index of axis 0; empty otherwise).
        zero_point: per-channel value of code 0 (int8: one per index of axis 0; empty otherwise).
        data: one zstd frame, content size in its header, of the stored values in C order.
    """

    name: str
    shape: tuple[int, ...]
    codec: str
    dtype: str
    scale: tuple[float, ...]
    zero_point: tuple[float, ...]
    data: bytes


# --------------------------------------------------------------------------------------- encode


def encode(
    tensors: Mapping[str, np.ndarray], codec: str = "int8", level: int = 3
) -> list[EncodedTensor]:
    """Encode float32 arrays (e.g. FPN levels, each [C, h, w]) for the wire.

    Args:
        tensors: name -> finite float32 array of rank >= 1; int8 quantises per index of axis 0.
        codec: one of CODECS.
        level: zstd compression level, in ZSTD_LEVELS.

    Returns:
        One EncodedTensor per input, in the mapping's order.

    Raises:
        ValueError: unknown codec or level, a non-float32, empty or non-finite array, or (fp16)
            values outside float16's range.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if isinstance(level, bool) or not isinstance(level, int) or level not in ZSTD_LEVELS:
        raise ValueError(f"zstd level must be an int in [{ZSTD_LEVELS[0]}, {ZSTD_LEVELS[-1]}]")
    # Single-threaded on purpose. Measured on 2 cores (800x960, 256 channels, level 3): zstd
    # threads only speed up level "0" (int8 61 -> 54 ms, fp16 107 -> 75 ms wall, with more CPU),
    # and the edge's inference wants those cores.
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    out = []
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            dtype = getattr(array, "dtype", type(array).__name__)
            raise ValueError(f"tensor {name!r}: expected a float32 numpy array, got {dtype}")
        if array.ndim < 1 or array.size == 0:
            raise ValueError(
                f"tensor {name!r}: expected a non-empty array, got shape {array.shape}"
            )
        array = np.ascontiguousarray(array)
        scale: tuple[float, ...] = ()
        zero_point: tuple[float, ...] = ()
        if codec == "int8":
            stored, scale_arr, zero_arr = _quantise_int8(name, array)
            scale, zero_point = tuple(scale_arr.tolist()), tuple(zero_arr.tolist())
        else:
            if not np.isfinite(array).all():
                raise ValueError(f"tensor {name!r}: contains NaN or Inf")
            if codec == "fp16":
                with np.errstate(over="ignore"):
                    stored = array.astype("<f2")
                if not np.isfinite(stored).all():
                    raise ValueError(f"tensor {name!r}: values exceed float16's range (65504)")
            else:
                stored = array.astype("<f4", copy=False)
        data = compressor.compress(memoryview(stored.reshape(-1)).cast("B"))
        out.append(
            EncodedTensor(
                name=name,
                shape=tuple(int(d) for d in array.shape),
                codec=codec,
                dtype=STORED_DTYPE[codec],
                scale=scale,
                zero_point=zero_point,
                data=data,
            )
        )
    return out


def _quantise_int8(name: str, array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel affine uint8 quantisation of `array` (channel = axis 0).

    Returns (codes with array's shape, float32 scale [C], float32 zero_point [C]).
    """
    channels = array.shape[0]
    flat = array.reshape(channels, -1)
    low, high = flat.min(axis=1), flat.max(axis=1)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError(f"tensor {name!r}: contains NaN or Inf")
    span = high.astype(np.float64) - low.astype(np.float64)
    # A constant channel gets step 1 (every code is 0, decoding gives the constant back); a tiny
    # span gets the smallest normal float32 step so 1 / scale stays finite.
    scale = np.where(span > 0, np.maximum(span / 255.0, float(_F32.tiny)), 1.0).astype(np.float32)
    # x - low overflows float32 only for spans beyond float32's max: then work in float64.
    work = np.float64 if (span > float(_F32.max)).any() else np.float32
    inverse = (1.0 / scale.astype(np.float64)).astype(work)[:, None]
    low_w = low.astype(work)[:, None]
    codes = np.empty(flat.shape, dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // flat.shape[1])
    for start in range(0, channels, step):
        part = slice(start, start + step)
        t = np.subtract(flat[part], low_w[part], dtype=work)
        t *= inverse[part]
        np.rint(t, out=t)
        np.clip(t, 0, 255, out=t)
        codes[part] = t
    return codes.reshape(array.shape), scale, low.astype(np.float32)


def encoded_size(encoded: Sequence[EncodedTensor]) -> int:
    """Bytes on the wire of the `data` fields (compressed payload, metadata not counted)."""
    return sum(len(t.data) for t in encoded)


def expected_level_shapes(
    spec: SplitSpec, padded_hw: tuple[int, int], levels: Sequence[str] = LEVEL_NAMES
) -> dict[str, tuple[int, ...]]:
    """Expected (C, h, w) of each of `levels` for a padded input of `padded_hw` pixels (H, W).

    Suitable as `decode(..., expected_shapes=...)`; delegates to `SplitSpec.level_shape`.
    """
    return {name: spec.level_shape(name, padded_hw) for name in levels}


# --------------------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class _Checked:
    """An encoded tensor whose metadata and frame header passed every check."""

    tensor: EncodedTensor
    shape: tuple[int, ...]
    stored: np.dtype
    nbytes: int  # stored (decompressed) bytes
    scale: np.ndarray  # float64 [C] (int8) or empty
    zero_point: np.ndarray


def decode(
    encoded: Sequence[EncodedTensor],
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> dict[str, np.ndarray]:
    """Decode tensors from the wire (untrusted) into float32 arrays.

    Every tensor's metadata and zstd frame header is checked before anything is decompressed;
    decompression reads exactly the expected byte count through a bounded reader.

    Args:
        encoded: the tensors as received.
        expected_shapes: name -> exact float32 shape; when given, the names must be exactly these
            (see `expected_level_shapes`).
        max_total_bytes: bound on the float32 bytes of all decoded arrays together.

    Returns:
        name -> float32 array of the tensor's shape.

    Raises:
        CodecError: anything malformed, inconsistent, oversized or non-finite; the message names
            the tensor and the problem.
    """
    if isinstance(encoded, EncodedTensor) or not isinstance(encoded, Sequence):
        raise CodecError("expected a sequence of EncodedTensor")
    checked: list[_Checked] = []
    seen: set[str] = set()
    total = 0
    for index, tensor in enumerate(encoded):
        if not isinstance(tensor, EncodedTensor):
            raise CodecError(
                f"item {index}: expected an EncodedTensor, got {type(tensor).__name__}"
            )
        name = tensor.name
        if not isinstance(name, str) or not name or len(name) > 64:
            raise CodecError(f"item {index}: invalid tensor name {_show(name)}")
        if name in seen:
            raise CodecError(f"tensor {name!r}: duplicate name")
        seen.add(name)
        if expected_shapes is not None and name not in expected_shapes:
            raise CodecError(f"tensor {name!r}: unknown name; expected {sorted(expected_shapes)}")
        item = _check(tensor, None if expected_shapes is None else expected_shapes[name])
        total += math.prod(item.shape) * 4
        if total > max_total_bytes:
            raise CodecError(
                f"tensor {name!r}: total decoded size exceeds the {max_total_bytes}-byte bound"
            )
        checked.append(item)
    if expected_shapes is not None:
        missing = [name for name in expected_shapes if name not in seen]
        if missing:
            raise CodecError(f"missing tensors {missing}")
    return {item.tensor.name: _decode_checked(item) for item in checked}


def _check(tensor: EncodedTensor, expected: tuple[int, ...] | None) -> _Checked:
    """Validate one tensor's metadata and frame header; allocates nothing data-sized."""
    name = tensor.name

    def fail(problem: str) -> CodecError:
        return CodecError(f"tensor {name!r}: {problem}")

    if tensor.codec not in CODECS:
        raise fail(f"unknown codec {_show(tensor.codec)}; expected one of {CODECS}")
    if tensor.dtype != STORED_DTYPE[tensor.codec]:
        raise fail(
            f"dtype {_show(tensor.dtype)} does not match codec {tensor.codec!r} "
            f"(expected {STORED_DTYPE[tensor.codec]!r})"
        )
    shape = tensor.shape
    if (
        not isinstance(shape, tuple | list)
        or not 1 <= len(shape) <= MAX_RANK
        or not all(type(d) is int and 0 < d <= MAX_DIM for d in shape)
    ):
        raise fail(f"invalid shape {_show(shape)} (rank 1..{MAX_RANK}, dims 1..{MAX_DIM})")
    shape = tuple(shape)
    if expected is not None and shape != tuple(expected):
        raise fail(f"shape {shape} does not match the expected shape {tuple(expected)}")

    channels = shape[0] if tensor.codec == "int8" else 0
    scale = _params(tensor.scale, channels, "scale", fail)
    zero_point = _params(tensor.zero_point, channels, "zero_point", fail)
    if channels and not (scale > 0).all():
        raise fail("scale must be positive")

    stored = _NUMPY_DTYPE[tensor.dtype]
    nbytes = math.prod(shape) * stored.itemsize
    data = tensor.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise fail(f"data must be bytes, got {type(data).__name__}")
    _check_frame(bytes(data) if isinstance(data, memoryview) else data, nbytes, fail)
    return _Checked(tensor, shape, stored, nbytes, scale, zero_point)


def _params(values: object, count: int, what: str, fail: _Fail) -> np.ndarray:
    """Parse a scale / zero_point tuple: exactly `count` finite floats (as float64)."""
    try:
        length = len(values)  # type: ignore[arg-type]
    except TypeError:
        raise fail(f"{what} must be a sequence of floats") from None
    if length != count:
        raise fail(f"{what} has {length} values, expected {count}")
    try:
        array = np.asarray(values, dtype=np.float64).reshape(count)
    except (TypeError, ValueError):
        raise fail(f"{what} must be a sequence of floats") from None
    if not np.isfinite(array).all():
        raise fail(f"{what} contains NaN or Inf")
    return array


def _check_frame(data: bytes | bytearray, nbytes: int, fail: _Fail) -> None:
    """Check that `data` is exactly one zstd frame whose header declares `nbytes` of content.

    Walks the block headers (no decompression) so truncation and trailing bytes are found before
    any allocation.
    """
    if len(data) < 6 or data[:4] != _ZSTD_MAGIC:
        raise fail("data is not a zstd frame (bad magic)")
    try:
        header_size = zstandard.frame_header_size(data)
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise fail(f"invalid zstd frame header: {exc}") from None
    content = params.content_size
    if content in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR, -1):
        raise fail("zstd frame header has no content size")
    if content != nbytes:
        raise fail(f"zstd frame content size {content} != {nbytes} bytes implied by shape/dtype")
    if params.window_size > MAX_WINDOW_SIZE:
        raise fail(f"zstd window {params.window_size} exceeds the {MAX_WINDOW_SIZE}-byte bound")
    if params.dict_id:
        raise fail("zstd frame needs a dictionary")
    pos = header_size
    while True:
        if pos + 3 > len(data):
            raise fail("zstd frame is truncated")
        block = int.from_bytes(data[pos : pos + 3], "little")
        last, kind, size = block & 1, (block >> 1) & 3, block >> 3
        if kind == 3:
            raise fail("zstd frame has a reserved block type")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    pos += 4 if params.has_checksum else 0
    if pos > len(data):
        raise fail("zstd frame is truncated")
    if pos < len(data):
        raise fail(f"{len(data) - pos} bytes of trailing data after the zstd frame")


def _decode_checked(item: _Checked) -> np.ndarray:
    """Decompress exactly `item.nbytes` and turn the stored values into float32."""
    name, codec = item.tensor.name, item.tensor.codec
    buffer = bytearray(item.nbytes)
    view = memoryview(buffer)
    got = 0
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE)
    try:
        with decompressor.stream_reader(item.tensor.data, read_across_frames=False) as reader:
            while got < item.nbytes:
                n = reader.readinto(view[got:])
                if n <= 0:
                    break
                got += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        if _ZSTD_OUT_OF_MEMORY in str(exc).lower():  # the machine's, not the frame's
            raise MemoryError(f"tensor {name!r}: zstd could not allocate: {exc}") from exc
        raise CodecError(f"tensor {name!r}: corrupt zstd frame: {exc}") from None
    if got < item.nbytes:
        raise CodecError(f"tensor {name!r}: zstd frame is truncated ({got} of {item.nbytes} bytes)")
    if extra:
        raise CodecError(f"tensor {name!r}: zstd frame holds more than its declared content size")

    stored = np.frombuffer(buffer, dtype=item.stored).reshape(item.shape)
    if codec == "int8":
        return _dequantise(name, stored, item.scale, item.zero_point)
    if not np.isfinite(stored).all():
        raise CodecError(f"tensor {name!r}: decoded values contain NaN or Inf")
    return stored.astype(np.float32, copy=codec != "fp32")


def _dequantise(
    name: str, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray
) -> np.ndarray:
    """uint8 codes [C, ...] -> float32 via a per-channel 256-entry table (one rounding)."""
    with np.errstate(over="ignore"):
        table = (zero_point[:, None] + np.arange(256)[None, :] * scale[:, None]).astype(np.float32)
    if not np.isfinite(table).all():
        raise CodecError(f"tensor {name!r}: scale/zero_point overflow float32")
    flat = codes.reshape(codes.shape[0], -1)
    out = np.empty(flat.shape, dtype=np.float32)
    for c in range(flat.shape[0]):
        np.take(table[c], flat[c], out=out[c])
    return out.reshape(codes.shape)
