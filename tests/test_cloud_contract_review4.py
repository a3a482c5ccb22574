"""A third-party edge client's review of the published contract, each finding against a real
cloud on loopback (ports 53000-53099).

1. The cloud took an ImageMeta whose resized size does not follow from its original size for
   the served model (a client rounding instead of truncating, or sending any size), and
   answered OK with shifted or stretched boxes. Now it is INVALID_ARGUMENT naming both sizes,
   by the request's own model when several are served; splitdet's own edge is never refused.
2. RESOURCE_EXHAUSTED meant both "busy, retry later" and "too large, never", told apart only by
   the message's text. The cloud's own refusals now carry a `splitdet-reason` trailer, which
   the edge's `classify` prefers (the text is the fallback: an older cloud, gRPC's own bound).
3. `authorization: bearer <right token>` (the scheme in lower case, which RFC 7235 allows) was
   refused as a wrong token; a bare token without a scheme too. Now the scheme is compared in
   any case, and a missing scheme is said to be missing.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cloud_fixtures import DETECT, make_sample, shared_model_dir

from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import MIB, ServerConfig
from splitdet.cloud.tokens import AcceptedTokens
from splitdet.edge import client_errors
from splitdet.edge.client_errors import NeverRetry, RetryLater, classify, reason_of
from splitdet.edge.preprocess import resized_size
from splitdet.shared.codec import encode, expected_level_shapes
from splitdet.shared.detection import ImageMeta
from splitdet.shared.messages import build_request
from splitdet.shared.spec import padded_size
from splitdet.shared.wire import detection_pb2 as pb

from support import wait_for

pytestmark = pytest.mark.timeout(180)  # (the first test builds the shared export)

#: This review's TCP ports on loopback.
PORTS = range(53000, 53100)
MANIFEST = "/splitdet.v1.Detection/GetManifest"
TOKEN = "s3cret-Token-42"


def _free_port() -> int:
    """A port of PORTS nothing listens on now."""
    for port in PORTS:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                probe.bind(("127.0.0.1", port))
                return port
    raise RuntimeError(f"no free port in {PORTS}")


@contextlib.contextmanager
def _cloud(
    tmp_path: Path, more: tuple[Path, ...] = (), **settings: object
) -> Iterator[tuple[CloudServer, grpc.Channel]]:
    """A CloudServer serving `shared_model_dir(0)` (and `more`) on a port of PORTS, and a
    channel to it; both closed after."""
    _, model_dir, _ = shared_model_dir(0)
    config = ServerConfig(
        model_dir=model_dir, more_model_dirs=more, listen=f"127.0.0.1:{_free_port()}",
        threads=1, answers_db=tmp_path / "answers.sqlite", **settings,
    )  # fmt: skip
    server = CloudServer(config).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop(0)


def _call(channel: grpc.Channel, method: str, raw: bytes, **kwargs: object) -> grpc.RpcError:
    """The error a raw call of `method` ends with (it must fail)."""
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(method)(raw, timeout=30, **kwargs)
    return refused.value


def _detect_ok(channel: grpc.Channel, raw: bytes) -> pb.DetectResponse:
    return pb.DetectResponse.FromString(channel.unary_unary(DETECT)(raw, timeout=30))


def _random_levels(model, resized_hw: tuple[int, int]) -> list:
    """Int8 levels of random features, of the shapes a request of `resized_hw` carries."""
    shapes = expected_level_shapes(model.config.split_spec, padded_size(*resized_hw))
    rng = np.random.default_rng(3)
    return encode({name: rng.random(shape, np.float32) for name, shape in shapes.items()})


# ---------------------------------------------------------------- 1. resized must follow


def test_a_rounded_resized_size_is_refused_naming_both_sizes(tmp_path):
    """231x173 resizes to 288x215 (288 / 231 = 1.2468: 215.69, truncated) for the served
    model (min_size 224, max_size 288). A client that rounds sends 288x216: same padded
    size, same tensors, and the cloud answered OK with every box shifted. Now refused."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=2, image_hw=(231, 173))
    assert sample.image.resized_hw == (288, 215) == resized_size(231, 173, 224, 288)
    rounded = ImageMeta((231, 173), (288, 216), "rounding-client")
    with _cloud(tmp_path) as (_, channel):
        right = build_request(sample.encoded, sample.image, "right", manifest.fingerprint)
        assert _detect_ok(channel, right.SerializeToString()).request_id == "right"
        wrong = build_request(sample.encoded, rounded, "rounded", manifest.fingerprint)
        refused = _call(channel, DETECT, wrong.SerializeToString())
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    message = refused.details()
    assert "resized image size 288x216 does not follow from original image size 231x173" in (
        message
    )
    assert "min_size 224, max_size 288" in message and "expected 288x215" in message, message


def test_a_resized_size_of_another_shape_is_refused(tmp_path):
    """Original 1000x256 sent as resized 128x128 with levels of that size: answered with boxes
    stretched over the whole height. Now refused: it resizes to 288x73."""
    model, _, manifest = shared_model_dir(0)
    image = ImageMeta((1000, 256), (128, 128), "stretched")
    raw = build_request(_random_levels(model, (128, 128)), image, "stretched",
                        manifest.fingerprint).SerializeToString()  # fmt: skip
    with _cloud(tmp_path) as (_, channel):
        refused = _call(channel, DETECT, raw)
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "128x128 does not follow from original image size 1000x256" in refused.details()
    assert "expected 288x73" in refused.details(), refused.details()


def test_the_check_uses_the_requests_model_when_two_are_served(
    tmp_path, tiny_model, tiny_model_dir
):
    """`--model A --model B` with other input sizes (A: 224/288, B: 224/320): a request for B
    is held to B's resize, not the default's."""
    from splitdet.shared.manifest import read_manifest

    b_fingerprint = read_manifest(tiny_model_dir).fingerprint
    b_sample = make_sample(tiny_model, seed=3, image_hw=(231, 173))
    assert b_sample.image.resized_hw == (299, 224)  # A's would be 288x215
    a_sizes = ImageMeta((231, 173), (288, 215), "a-sizes")
    with _cloud(tmp_path, more=(tiny_model_dir,)) as (_, channel):
        b_raw = build_request(b_sample.encoded, b_sample.image, "b", b_fingerprint)
        assert _detect_ok(channel, b_raw.SerializeToString()).model_fingerprint == b_fingerprint
        wrong = build_request(_random_levels(tiny_model, (288, 215)), a_sizes, "b-with-a-sizes",
                              b_fingerprint)  # fmt: skip
        refused = _call(channel, DETECT, wrong.SerializeToString())
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "min_size 224, max_size 320" in refused.details()
    assert "expected 299x224" in refused.details(), refused.details()


@pytest.mark.parametrize("original", [(231, 173), (240, 300), (1000, 256), (7, 2000), (2448, 2048)])
def test_splitdet_s_own_sizes_are_never_refused(tmp_path, original):
    """What torchvision's resize gives (the edge's, `resized_size`, is the same) is taken,
    also for an image as elongated as the model allows at all."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=4, image_hw=original)
    assert sample.image.resized_hw == resized_size(*original, 224, 288)
    raw = build_request(sample.encoded, sample.image, "own", manifest.fingerprint)
    with _cloud(tmp_path) as (_, channel):
        assert _detect_ok(channel, raw.SerializeToString()).request_id == "own"


def test_an_image_too_elongated_for_the_model_is_refused(tmp_path):
    """1x2000 would resize to a side of 0 px (the edge refuses such an image itself)."""
    model, _, manifest = shared_model_dir(0)
    image = ImageMeta((1, 2000), (1, 288), "sliver")
    raw = build_request(_random_levels(model, (1, 288)), image, "sliver", manifest.fingerprint)
    with _cloud(tmp_path) as (_, channel):
        refused = _call(channel, DETECT, raw.SerializeToString())
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "original image size 1x2000 is too elongated" in refused.details(), refused.details()


# ----------------------------------------------------------------- 2. the reason trailer


def _reason(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(client_errors.REASON_KEY)


def test_a_busy_refusal_carries_busy_and_is_retried(tmp_path):
    """The one slot held, no queue: the next call is refused RESOURCE_EXHAUSTED with the
    reason `busy`, which the edge retries whatever the message says."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=5)
    raw = build_request(sample.encoded, sample.image, "held", manifest.fingerprint)
    other = build_request(sample.encoded, sample.image, "busy", manifest.fingerprint)
    with _cloud(tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=50.0) as (server, ch):
        holder = ch.unary_unary(DETECT).future(raw.SerializeToString(), timeout=55)
        try:
            in_flight = "splitdet_cloud_in_flight"
            wait_for(lambda: server.metrics.registry.get_sample_value(in_flight) == 1, 30,
                     "the slow call holding the slot")  # fmt: skip
            refused = _call(ch, DETECT, other.SerializeToString())
        finally:
            holder.cancel()  # (the debug delay ends with its caller)
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(refused) == "busy"
    error = classify(refused.code(), refused.details(), refused.trailing_metadata())
    assert isinstance(error, RetryLater)


def test_an_oversize_request_carries_too_large_and_is_never_retried(tmp_path):
    """Over --max-message-mib (but under gRPC's own, larger bound): `too-large`."""
    with _cloud(tmp_path, max_message_bytes=MIB) as (_, channel):
        refused = _call(channel, DETECT, b"\0" * (MIB + 1))
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(refused) == "too-large"
    error = classify(refused.code(), refused.details(), refused.trailing_metadata())
    assert isinstance(error, NeverRetry)


def test_the_other_refusals_carry_their_reasons(tmp_path):
    """A model not served, a malformed request, a missing token: each its own reason."""
    model, _, _ = shared_model_dir(0)
    sample = make_sample(model, seed=6)
    unknown = build_request(sample.encoded, sample.image, "unknown", "0" * 64)
    with _cloud(tmp_path) as (_, channel):
        not_served = _call(channel, DETECT, unknown.SerializeToString())
        malformed = _call(channel, DETECT, b"\xff")
    with _cloud(tmp_path, token=TOKEN) as (_, channel):
        no_token = _call(channel, MANIFEST, b"")
    assert (not_served.code(), _reason(not_served)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "unknown-model",
    )  # fmt: skip
    assert (malformed.code(), _reason(malformed)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "invalid-request",
    )  # fmt: skip
    assert (no_token.code(), _reason(no_token)) == (
        grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
    )  # fmt: skip
    for error in (not_served, malformed, no_token):
        assert isinstance(classify(error.code(), error.details(), error.trailing_metadata()),
                          NeverRetry)  # fmt: skip


def test_classify_prefers_the_reason_and_falls_back_to_the_text():
    """The trailer decides whatever the message says; without one (an older cloud, gRPC's
    own "Received message larger than max"), or with a reason this edge does not know, the
    text and the code decide as before."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    says_large = "request of 9 bytes is larger than max message size 8"
    assert isinstance(classify(code, says_large, [(client_errors.REASON_KEY, "busy")]),
                      RetryLater)  # fmt: skip
    assert isinstance(classify(code, "server busy", [(client_errors.REASON_KEY, "too-large")]),
                      NeverRetry)  # fmt: skip
    grpc_own = "SERVER: Received message larger than max (300000000 vs. 268435456)"
    assert isinstance(classify(code, grpc_own), NeverRetry)
    assert isinstance(classify(code, grpc_own, ()), NeverRetry)
    assert isinstance(classify(code, "server busy"), RetryLater)
    newer = [(client_errors.REASON_KEY, "some-newer-reason"), ("other", "x")]
    assert reason_of(newer) is None
    assert isinstance(classify(code, "server busy", newer), RetryLater)
    assert isinstance(classify(code, says_large, newer), NeverRetry)


# ----------------------------------------------------------------- 3. the bearer scheme


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_bearer_scheme_is_taken_in_any_case(tmp_path, scheme):
    """RFC 7235: the auth scheme is case-insensitive. `bearer <right token>` was refused as
    "wrong bearer token"."""
    with _cloud(tmp_path, token=TOKEN) as (_, channel):
        answer = channel.unary_unary(MANIFEST)(
            b"", timeout=30, metadata=(("authorization", f"{scheme} {TOKEN}"),)
        )
    assert pb.ManifestResponse.FromString(answer).manifest_json


def test_one_token_is_one_answers_scope_whatever_the_schemes_case(tmp_path):
    """The scope hashed the whole metadata value: the same request sent with `bearer TOKEN`
    after `Bearer TOKEN` ran the heads again (cached false) and was stored twice."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=2, image_hw=(231, 173))
    request = build_request(sample.encoded, sample.image, "scoped", manifest.fingerprint)
    raw = request.SerializeToString()
    with _cloud(tmp_path, token=TOKEN) as (_, channel):
        answers = [
            pb.DetectResponse.FromString(channel.unary_unary(DETECT)(
                raw, timeout=30, metadata=(("authorization", f"{scheme} {TOKEN}"),)))
            for scheme in ("Bearer", "bearer", "BEARER")
        ]  # fmt: skip
    assert [answer.cached for answer in answers] == [False, True, True]
    assert answers[1].boxes == answers[0].boxes


def test_a_bare_token_is_told_its_scheme_is_missing_and_never_echoed(tmp_path, caplog):
    """A token sent without `Bearer ` is told the scheme is missing, not that the token is
    wrong; neither the message nor the log holds the token. A wrong token is still wrong."""
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    with _cloud(tmp_path, token=TOKEN) as (_, channel):
        bare = _call(channel, MANIFEST, b"", metadata=(("authorization", TOKEN),))
        other = _call(channel, MANIFEST, b"", metadata=(("authorization", f"Basic {TOKEN}"),))
        wrong = _call(channel, MANIFEST, b"", metadata=(("authorization", "bearer nope"),))
    for refused in (bare, other):
        assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "authorization metadata must be `Bearer <token>`" in refused.details()
        assert "wrong" not in refused.details() and TOKEN not in refused.details()
    assert wrong.details().startswith("wrong bearer token"), wrong.details()
    assert TOKEN not in caplog.text


def test_accepted_tokens_compare_the_scheme_in_any_case_and_the_token_exactly():
    tokens = AcceptedTokens(TOKEN)
    assert tokens.accepts(f"Bearer {TOKEN}") and tokens.accepts(f"bearer {TOKEN}")
    assert AcceptedTokens(f" {TOKEN}").accepts(f"Bearer  {TOKEN}")  # (as sent: not stripped)
    assert not tokens.accepts(f"Bearer {TOKEN.lower()}")  # the token itself is exact
    assert not tokens.accepts(TOKEN) and not tokens.accepts("Bearer") and not tokens.accepts("")
    assert not tokens.accepts(f"Basic {TOKEN}") and not tokens.accepts(f"Bearer{TOKEN}")
