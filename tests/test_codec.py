"""Tests for the feature codec: round trips, int8 error bounds, and hostile bytes on decode."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zstandard

from splitdet.shared import codec
from splitdet.shared.codec import CodecError, EncodedTensor, decode, encode
from splitdet.shared.spec import LEVEL_NAMES, SplitSpec

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SPEC = SplitSpec(fpn_channels=8)
PADDED = (64, 96)
MAX_RSS_MB = 200


def _levels(seed: int = 0) -> dict[str, np.ndarray]:
    """Small random FPN levels (8 channels, 64x96 padded input), ReLU'd like real features."""
    rng = np.random.default_rng(seed)
    shapes = codec.expected_level_shapes(SPEC, PADDED)
    return {n: np.maximum(rng.normal(size=s), 0).astype(np.float32) for n, s in shapes.items()}


def _valid(codec_name: str = "int8") -> tuple[list[EncodedTensor], dict[str, tuple[int, ...]]]:
    return encode(_levels(), codec_name), codec.expected_level_shapes(SPEC, PADDED)


def _raw_frame(content_size: int, payload: bytes, window_log: int = 20) -> bytes:
    """A hand-made zstd frame: header declaring `content_size` (8-byte field), one raw block."""
    header = codec._ZSTD_MAGIC + bytes([0xC0, (window_log - 10) << 3])
    header += content_size.to_bytes(8, "little")
    block = (1 | (len(payload) << 3)).to_bytes(3, "little")
    return header + block + payload


def _zeros_frame(total: int, content_size: int | None) -> bytes:
    """`total` zero bytes compressed in 1 MiB pieces (never holds `total` bytes in memory)."""
    sink = io.BytesIO()
    size = -1 if content_size is None else content_size
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=content_size is not None)
    writer = compressor.stream_writer(sink, size=size, closefd=False)
    chunk = bytes(1 << 20)
    for _ in range(total >> 20):
        writer.write(chunk)
    writer.close()
    return sink.getvalue()


def _replace(encoded: list[EncodedTensor], name: str, /, **changes) -> list[EncodedTensor]:
    return [dataclasses.replace(t, **changes) if t.name == name else t for t in encoded]


# ---------------------------------------------------------------------------------- round trips


def test_fp32_is_bit_exact_for_any_finite_values():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**32, size=(4, 33, 17), dtype=np.uint32)
    values = bits.view(np.float32)
    values[~np.isfinite(values)] = -0.0  # any finite pattern, incl. subnormals and -0.0
    values[0, 0, :3] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny / 8, 1e-45]
    out = decode(encode({"x": values}, "fp32"))["x"]
    assert out.dtype == np.float32 and out.shape == values.shape
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))


def test_fp16_is_bit_exact_on_fp16_representable_input():
    rng = np.random.default_rng(2)
    half = rng.integers(0, 2**16, size=(6, 20, 11), dtype=np.uint16).view(np.float16)
    values = np.where(np.isfinite(half), half, np.float16(0)).astype(np.float32)
    [enc] = encode({"x": values}, "fp16")
    assert enc.dtype == "float16" and enc.scale == () and enc.zero_point == ()
    out = decode([enc])["x"]
    np.testing.assert_array_equal(out.view(np.uint32), values.view(np.uint32))


def test_levels_round_trip_with_expected_shapes():
    levels = _levels(3)
    for name in codec.CODECS:
        encoded = encode(levels, name, level=1)
        assert [t.name for t in encoded] == list(LEVEL_NAMES)
        assert codec.encoded_size(encoded) == sum(len(t.data) for t in encoded)
        out = decode(encoded, codec.expected_level_shapes(SPEC, PADDED))
        assert list(out) == list(LEVEL_NAMES)
        for level, array in out.items():
            assert array.dtype == np.float32 and array.shape == levels[level].shape
            atol = 0.0 if name == "fp32" else 0.05
            np.testing.assert_allclose(array, levels[level], rtol=1e-3, atol=atol)


def _int8_channels() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 31, 7)).astype(np.float32)
    x[1] = 3.25  # constant
    x[2] = -7.0  # constant, negative
    x[3] *= 1e30  # huge range
    x[4] = -np.abs(x[4]) * 1000  # all negative
    x[5] = 1e6 + rng.uniform(0, 0.1, size=x[5].shape)  # tiny range far from zero
    x[6] = rng.uniform(-1, 1, size=x[6].shape) * np.finfo(np.float32).max  # span overflows f32
    x[7] *= 1e-42  # subnormal
    x[8] = 0.0
    x[8, 0, 0] = 1.0  # one spike
    return {
        "adversarial": x,
        "random": rng.normal(size=(16, 40, 50)).astype(np.float32)
        * rng.uniform(0.01, 100, (16, 1, 1)).astype(np.float32),
        "relu": np.maximum(rng.normal(size=(5, 64, 3)), 0).astype(np.float32),
        "rank1": rng.normal(size=(300,)).astype(np.float32),
    }


@pytest.mark.parametrize("case", sorted(_int8_channels()))
def test_int8_error_is_at_most_half_a_step_per_channel(case):
    x = _int8_channels()[case]
    [enc] = encode({case: x}, "int8")
    assert enc.dtype == "uint8" and len(enc.scale) == len(enc.zero_point) == x.shape[0]
    out = decode([enc])[case]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    scale = np.asarray(enc.scale, dtype=np.float64)
    assert (scale > 0).all()
    err = np.abs(out.astype(np.float64) - x.astype(np.float64)).reshape(x.shape[0], -1)
    # Half a step, plus float32 rounding of the decoded value.
    slack = np.spacing(np.abs(x)).reshape(x.shape[0], -1).astype(np.float64)
    bound = scale[:, None] * (0.5 + 1e-4) + slack
    worst = int(np.argmax((err - bound).max(axis=1)))
    assert (err <= bound).all(), f"channel {worst}: error {err[worst].max()} > {bound[worst].max()}"
    for c in range(x.shape[0]):
        if x.ndim > 1 and (x[c] == x[c].flat[0]).all():
            np.testing.assert_array_equal(out[c], x[c])  # constant channels are exact


@pytest.mark.parametrize(
    ("tensors", "kwargs", "problem"),
    [
        ({"x": np.zeros((2, 3), np.float64)}, {}, "float32"),
        ({"x": [[1.0]]}, {}, "float32"),
        ({"x": np.array([[1.0, np.nan]], np.float32)}, {}, "NaN or Inf"),
        ({"x": np.array([[1.0, np.inf]], np.float32)}, {"codec": "fp32"}, "NaN or Inf"),
        ({"x": np.array([[1.0, np.nan]], np.float32)}, {"codec": "fp16"}, "NaN or Inf"),
        ({"x": np.array([[1e6]], np.float32)}, {"codec": "fp16"}, "float16"),
        ({"x": np.zeros((0, 3), np.float32)}, {}, "non-empty"),
        ({"x": np.ones((2, 3), np.float32)}, {"codec": "int4"}, "unknown codec"),
        ({"x": np.ones((2, 3), np.float32)}, {"level": 22}, "level"),
    ],
)
def test_encode_refuses_bad_input(tensors, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        encode(tensors, **kwargs)


def test_expected_level_shapes_reuses_the_spec():
    spec = SplitSpec()
    shapes = codec.expected_level_shapes(spec, (800, 960))
    assert shapes == {n: spec.level_shape(n, (800, 960)) for n in LEVEL_NAMES}
    assert shapes["0"] == (256, 200, 240) and shapes["pool"] == (256, 13, 15)


def test_encoded_frames_declare_their_content_size():
    for t in encode(_levels(), "fp16"):
        assert zstandard.frame_content_size(t.data) == int(np.prod(t.shape)) * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "other"  # type: ignore[misc]


# ------------------------------------------------------------------------------ hostile decodes
# Each builder returns (encoded, expected_shapes). The cases run in a subprocess that reports the
# CodecError message and its peak RSS.

EIGHT_GIB = 8 << 30
BOMB_BYTES = 256 << 20


def _forged_8gib():
    encoded, shapes = _valid()
    return _replace(encoded, "0", data=_raw_frame(EIGHT_GIB, b"\0" * 16)), shapes


def _forged_8gib_matching_shape():
    """Shape, dtype and header agree on 8 GiB: only the total-bytes bound stands in the way."""
    forged = EncodedTensor("x", (2048, 1024, 1024), "fp32", "float32", (), (), b"")
    return [dataclasses.replace(forged, data=_raw_frame(EIGHT_GIB, b"\0" * 16))], None


def _bomb_declared_small():
    encoded, shapes = _valid()
    return _replace(encoded, "pool", data=_zeros_frame(BOMB_BYTES, BOMB_BYTES)), shapes


def _bomb_without_content_size():
    encoded, shapes = _valid()
    return _replace(encoded, "pool", data=_zeros_frame(BOMB_BYTES, None)), shapes


def _bomb_lying_header():
    """A 256 MB bomb whose header content size was rewritten to the declared (small) size."""
    encoded, shapes = _valid()
    pool = next(t for t in encoded if t.name == "pool")
    frame = bytearray(_zeros_frame(BOMB_BYTES, BOMB_BYTES))
    assert frame[4] >> 5 == 0b100  # 4-byte content size, after a window descriptor, no dict id
    frame[6:10] = int(np.prod(pool.shape)).to_bytes(4, "little")
    return _replace(encoded, "pool", data=bytes(frame)), shapes


def _truncated():
    encoded, shapes = _valid()
    level0 = next(t for t in encoded if t.name == "0")
    return _replace(encoded, "0", data=level0.data[:-10]), shapes


def _trailing_garbage():
    encoded, shapes = _valid()
    level0 = next(t for t in encoded if t.name == "0")
    return _replace(encoded, "0", data=level0.data + b"garbage!"), shapes


def _trailing_frame():
    encoded, shapes = _valid()
    level0 = next(t for t in encoded if t.name == "0")
    return _replace(encoded, "0", data=level0.data + zstandard.compress(b"x" * 64)), shapes


def _corrupt_block():
    encoded, shapes = _valid("fp16")
    level0 = next(t for t in encoded if t.name == "0")
    data = bytearray(level0.data)
    for i in range(12, len(data) - 4, 7):
        data[i] ^= 0x5A
    return _replace(encoded, "0", data=bytes(data)), shapes


def _bad_magic():
    encoded, shapes = _valid()
    return _replace(encoded, "1", data=b"\x00" * 64), shapes


def _window_too_large():
    forged = EncodedTensor("x", (1, 4), "fp32", "float32", (), (), _raw_frame(16, b"\0" * 16, 31))
    return [forged], None


def _decoded_nan():
    encoded, shapes = _valid("fp32")
    level3 = next(t for t in encoded if t.name == "3")
    values = np.zeros(level3.shape, np.float32)
    values[2, 1, 1] = np.nan
    return _replace(encoded, "3", data=zstandard.compress(values.tobytes())), shapes


def _decoded_inf_fp16():
    encoded, shapes = _valid("fp16")
    level3 = next(t for t in encoded if t.name == "3")
    values = np.zeros(level3.shape, np.float16)
    values[0, 0, 0] = np.inf
    return _replace(encoded, "3", data=zstandard.compress(values.tobytes())), shapes


def _with(level: str, /, **changes):
    def build():
        encoded, shapes = _valid()
        return _replace(encoded, level, **changes), shapes

    return build


def _without(name: str):
    def build():
        encoded, shapes = _valid()
        return [t for t in encoded if t.name != name], shapes

    return build


def _duplicate():
    encoded, shapes = _valid()
    return [*encoded, encoded[0]], shapes


def _scale_overflow():
    encoded, shapes = _valid()
    pool = next(t for t in encoded if t.name == "pool")
    return _replace(encoded, "pool", scale=(1e37,) * len(pool.scale)), shapes


C = SPEC.fpn_channels
HOSTILE = {
    "forged_8gib_header": (_forged_8gib, r"'0'.*content size 8589934592 !="),
    "forged_8gib_matching_shape": (_forged_8gib_matching_shape, r"'x'.*total decoded size"),
    "bomb_declared_small": (_bomb_declared_small, r"'pool'.*content size 268435456 !="),
    "bomb_without_content_size": (_bomb_without_content_size, r"'pool'.*no content size"),
    "bomb_lying_header": (_bomb_lying_header, r"'pool'.*(corrupt|more than)"),
    "truncated": (_truncated, r"'0'.*truncated"),
    "trailing_garbage": (_trailing_garbage, r"'0'.*trailing"),
    "trailing_frame": (_trailing_frame, r"'0'.*trailing"),
    "corrupt_block": (_corrupt_block, r"'0'.*(corrupt|truncated|trailing|reserved)"),
    "bad_magic": (_bad_magic, r"'1'.*not a zstd frame"),
    "window_too_large": (_window_too_large, r"'x'.*window"),
    "decoded_nan": (_decoded_nan, r"'3'.*NaN or Inf"),
    "decoded_inf_fp16": (_decoded_inf_fp16, r"'3'.*NaN or Inf"),
    "wrong_shape": (_with("2", shape=(C, 16, 6)), r"'2'.*expected shape"),
    "zero_dim": (_with("2", shape=(C, 0, 6)), r"'2'.*invalid shape"),
    "negative_dim": (_with("2", shape=(C, -4, 6)), r"'2'.*invalid shape"),
    "absurd_rank": (_with("2", shape=(1,) * 9), r"'2'.*invalid shape"),
    "absurd_dim": (_with("2", shape=(C, 1 << 40, 1)), r"'2'.*invalid shape"),
    "wrong_dtype": (_with("1", dtype="float32"), r"'1'.*dtype 'float32'"),
    "unknown_codec": (_with("1", codec="int3"), r"'1'.*unknown codec"),
    "nan_scale": (_with("3", scale=(float("nan"),) * C), r"'3'.*scale contains NaN"),
    "inf_scale": (_with("3", scale=(float("inf"),) * C), r"'3'.*scale contains NaN or Inf"),
    "zero_scale": (_with("3", scale=(0.0,) * C), r"'3'.*scale must be positive"),
    "negative_scale": (_with("3", scale=(-1.0,) * C), r"'3'.*scale must be positive"),
    "short_scale": (_with("3", scale=(1.0,) * (C - 1)), r"'3'.*scale has 7 values"),
    "inf_zero_point": (_with("3", zero_point=(float("inf"),) * C), r"'3'.*zero_point contains"),
    "scale_overflow": (_scale_overflow, r"'pool'.*overflow"),
    "missing_level": (_without("1"), r"missing tensors \['1'\]"),
    "unknown_level": (_with("1", name="p6"), r"'p6'.*unknown name"),
    "duplicate_level": (_duplicate, r"'0'.*duplicate"),
}

_RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import test_codec
    from splitdet.shared.codec import CodecError, decode
    build, _ = test_codec.HOSTILE[sys.argv[2]]
    encoded, shapes = build()
    try:
        decode(encoded, shapes)
        message = None
    except CodecError as exc:
        message = str(exc)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent (pytest, with
    # torch loaded when the whole suite runs), VmHWM belongs to this process's own memory map.
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    rss_mb = hwm_kb / 1024
    print(json.dumps({"message": message, "rss_mb": rss_mb}))
    """
)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_refused_in_bounded_memory(case):
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, TESTS_DIR, case],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["message"] is not None, f"{case}: decode accepted hostile input"
    assert re.search(HOSTILE[case][1], report["message"]), report["message"]
    assert report["rss_mb"] < MAX_RSS_MB, f"{case}: peak RSS {report['rss_mb']:.0f} MB"


def test_hostile_frames_really_are_hostile():
    """The forged and bomb frames claim what the cases say, so the refusals are meaningful."""
    [forged], _ = _forged_8gib_matching_shape()
    assert zstandard.frame_content_size(forged.data) == EIGHT_GIB
    [forged_small], _ = _window_too_large()
    assert zstandard.get_frame_parameters(forged_small.data).window_size == 1 << 31
    encoded, _ = _forged_8gib()
    assert zstandard.frame_content_size(encoded[0].data) == EIGHT_GIB

    encoded, _ = _bomb_declared_small()
    bomb = next(t for t in encoded if t.name == "pool").data
    assert len(bomb) < 64 << 10 and zstandard.frame_content_size(bomb) == BOMB_BYTES
    inflated = sum(len(c) for c in zstandard.ZstdDecompressor().read_to_iter(bomb))
    assert inflated == BOMB_BYTES
    # The lying bomb is the same frame with only its content size field rewritten to the small
    # declared size (libzstd would notice only after inflating past it).
    encoded, shapes = _bomb_lying_header()
    liar = next(t for t in encoded if t.name == "pool").data
    assert zstandard.frame_content_size(liar) == int(np.prod(shapes["pool"]))
    assert liar[:6] == bomb[:6] and liar[10:] == bomb[10:]


def test_decode_refuses_total_above_the_bound():
    encoded, shapes = _valid("fp32")
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    assert decode(encoded, shapes, max_total_bytes=total).keys() == shapes.keys()
    with pytest.raises(CodecError, match="total decoded size"):
        decode(encoded, shapes, max_total_bytes=total - 1)


def test_decode_refuses_things_that_are_not_tensors():
    with pytest.raises(CodecError, match="sequence"):
        decode(encode(_levels())[0])  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="EncodedTensor"):
        decode([{"name": "0"}])  # type: ignore[list-item]
    encoded, _ = _valid()
    with pytest.raises(CodecError, match=r"'0'.*data must be bytes"):
        decode(_replace(encoded, "0", data="text"))
    with pytest.raises(CodecError, match="scale must be a sequence"):
        decode(_replace(encoded, "0", scale=("a",) * C))


def test_codec_imports_without_torch():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import splitdet.shared.codec, splitdet.shared.spec
        assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_zstd_short_of_memory_is_a_memory_error_not_a_corrupt_frame(monkeypatch):
    """A review: zstd that cannot allocate its window (under an address-space limit it says
    "Allocation error : not enough memory") was reported as a corrupt frame, which the cloud
    answers INVALID_ARGUMENT and the edge makes a dead letter of a good request. It is a
    MemoryError now (the cloud's shortage: RESOURCE_EXHAUSTED, retried); a frame really
    corrupt stays a CodecError."""
    levels = {"p2": np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)}
    encoded = encode(levels, codec="int8")
    said = ["zstd decompress error: Allocation error : not enough memory"]

    class Failing:  # (zstd's decompressor, failing as `said` says)
        def __init__(self, *args, **kwargs) -> None:
            pass

        def stream_reader(self, *args, **kwargs):
            raise zstandard.ZstdError(said[0])

    monkeypatch.setattr(zstandard, "ZstdDecompressor", Failing)
    with pytest.raises(MemoryError, match="could not allocate"):
        decode(encoded)
    said[0] = "zstd decompress error: Corrupted block detected"
    with pytest.raises(CodecError, match="corrupt zstd frame"):
        decode(encoded)
