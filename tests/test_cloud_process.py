"""`splitdet cloud` as a real process over loopback (acceptance 2, 4, 5, 6).

- a table of bad requests, each with its status code; the server's peak memory stays bounded
  and health stays SERVING;
- SIGTERM during a slow call: the call completes, new calls are refused, health reports
  NOT_SERVING, the process exits 0 within the grace period;
- two servers, one client: calls spread over both, and survive one being killed;
- a repeated request id, also after a restart, returns the same boxes without running the heads.

Every process is killed in teardown if a test leaves it running.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest
import zstandard
from cloud_fixtures import (
    DETECT,
    make_sample,
    shared_model_dir,
    start_cloud_process,
    start_cloud_processes,
    terminate,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitdet.edge.client import (
    ClientConfig,
    CloudClient,
    RetryLater,
    build_request,
)

pytestmark = pytest.mark.timeout(180)
MIB = 1 << 20
#: The message bound the bad-request server runs with (--max-message-mib).
BOUND_MIB = 4


@pytest.fixture(scope="module")
def model():
    model, model_dir, manifest = shared_model_dir(0)
    return model, model_dir, manifest, make_sample(model, seed=1)


@pytest.fixture
def processes():
    """Collects started servers and kills whatever is still running at teardown."""
    started = []
    yield started
    for server in started:
        server.stop()


def _client(*servers, **settings) -> CloudClient:
    addresses = ",".join(server.address for server in servers)
    return CloudClient(ClientConfig(addresses, manifest_timeout_s=10, timeout_s=30, **settings))


# ------------------------------------------------------------------------ the bad requests


def _zstd_stream(total: int, content_size: bool) -> bytes:
    """A zstd frame of `total` zero bytes, compressed without ever holding them all."""
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=content_size)
    chunk = bytes(MIB)
    out = compressor.compressobj(size=total if content_size else -1)
    parts = [out.compress(chunk) for _ in range(total // MIB)]
    return b"".join([*parts, out.flush()])


def _declare_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite a frame made without a content size to declare `size` bytes (4-byte field)."""
    descriptor = frame[4]
    assert descriptor & 0xE0 == 0 and descriptor & 0x03 == 0, "expected no FCS, no dict id"
    # header: magic, descriptor, window byte, then the FCS field we insert
    return (
        frame[:4] + bytes([descriptor | 0x80]) + frame[5:6] + size.to_bytes(4, "little") + frame[6:]
    )


def _forged_header(content_size: int) -> bytes:
    """A frame whose header claims `content_size` bytes and holds one empty raw block."""
    descriptor = 0xC0 | 0x20  # 8-byte content size, single segment
    return (
        b"\x28\xb5\x2f\xfd"
        + bytes([descriptor])
        + content_size.to_bytes(8, "little")
        + b"\x01\x00\x00"
    )


def _bad_requests(sample, fingerprint: str) -> dict[str, tuple[bytes, grpc.StatusCode]]:
    """name -> (serialized request, expected status code)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    good = {t.name: t for t in sample.encoded}

    def request(*, levels=None, fingerprint=fingerprint, image=sample.image, rid="bad"):
        tensors = list(good.values()) if levels is None else levels
        return build_request(tensors, image, rid, fingerprint).SerializeToString()

    def replace(level: str, **changes) -> list:
        return [dataclasses.replace(t, **changes) if t.name == level else t for t in good.values()]

    level0 = good["0"]
    c, h, w = level0.shape
    stored_bytes = c * h * w  # int8 codes
    nan_values = np.zeros((c, h, w), np.float32)
    nan_values[0, 0, 0] = np.nan
    nan_frame = zstandard.ZstdCompressor(write_content_size=True).compress(nan_values.tobytes())
    bomb = _zstd_stream(256 * MIB, content_size=True)
    assert len(bomb) < 16 * 1024, "the bomb should be ~8 KB"
    unsized_bomb = _zstd_stream(256 * MIB, content_size=False)
    whole = request()
    return {
        "garbage bytes": (bytes(range(255, -1, -1)) * 4, invalid),
        "truncated protobuf": (whole[: len(whole) // 2], invalid),
        "wrong level name": (request(levels=replace("pool", name="p6")), invalid),
        "missing level": (request(levels=[t for t in good.values() if t.name != "1"]), invalid),
        "duplicate level": (request(levels=[*good.values(), good["3"]]), invalid),
        "wrong shape": (request(levels=replace("0", shape=(c, w, h))), invalid),
        "wrong channels": (request(levels=replace("0", shape=(c * 2, h, w // 2))), invalid),
        "dtype not the codec's": (request(levels=replace("0", dtype="float32")), invalid),
        "unknown dtype": (request(levels=replace("0", codec="fp32", dtype="float64")), invalid),
        "unknown codec": (request(levels=replace("0", codec="bf16")), invalid),
        "zstd bomb 8 KB -> 256 MB": (request(levels=replace("0", data=bomb)), invalid),
        "zstd bomb, no content size": (request(levels=replace("0", data=unsized_bomb)), invalid),
        "zstd bomb, declared small": (
            request(levels=replace("0", data=_declare_content_size(unsized_bomb, stored_bytes))),
            invalid,
        ),
        "forged 8 GiB content size": (
            request(levels=replace("0", data=_forged_header(8 << 30))),
            invalid,
        ),
        "not zstd": (request(levels=replace("0", data=b"\x00" * stored_bytes)), invalid),
        "NaN scale": (
            request(levels=replace("0", scale=(float("nan"), *level0.scale[1:]))),
            invalid,
        ),
        "negative scale": (request(levels=replace("0", scale=(-1.0,) * c)), invalid),
        "NaN values": (
            request(
                levels=replace(
                    "0", codec="fp32", dtype="float32", scale=(), zero_point=(), data=nan_frame
                )
            ),
            invalid,
        ),
        "empty request id": (request(rid=""), invalid),
        "image sizes missing": (
            request(image=dataclasses.replace(sample.image, resized_hw=(0, 0))),
            invalid,
        ),
        "resized size beyond the decode bound": (
            request(image=dataclasses.replace(sample.image, resized_hw=(8000, 8000))),
            invalid,
        ),
        "wrong fingerprint": (request(fingerprint="0" * 64), grpc.StatusCode.FAILED_PRECONDITION),
        "message over the bound": (
            request(levels=replace("0", data=bytes(BOUND_MIB * MIB + 1))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    }


def test_bad_requests_get_the_right_status_and_memory_stays_bounded(model, tmp_path, processes):
    _, model_dir, manifest, sample = model
    server = start_cloud_process(
        model_dir, tmp_path, "bad", "--max-message-mib", str(BOUND_MIB), "--max-decoded-mib", "64"
    )
    processes.append(server)
    with _client(server) as client:
        assert len(client.detect(sample.encoded, sample.image, "warm", manifest.fingerprint).boxes)
        peak_before = server.rss_peak_bytes()
        cases = _bad_requests(sample, manifest.fingerprint)
        outcomes = {}
        with grpc.insecure_channel(server.address) as channel:
            send = channel.unary_unary(DETECT)  # raw bytes: no serializer
            for name, (raw, _) in cases.items():
                try:
                    send(raw, timeout=30)
                    outcomes[name] = (grpc.StatusCode.OK, "")
                except grpc.RpcError as error:
                    outcomes[name] = (error.code(), error.details())
        peak_after = server.rss_peak_bytes()
        wrong = {
            name: outcome for name, outcome in outcomes.items() if outcome[0] != cases[name][1]
        }
        assert not wrong, wrong
        for name, (_, message) in outcomes.items():
            assert message, f"{name}: the status carries no message"
        assert "zstd" in outcomes["forged 8 GiB content size"][1]
        assert "fingerprint" in outcomes["wrong fingerprint"][1]
        # nothing allocated what a bomb or a forged header asked for
        assert peak_after - peak_before < 48 * MIB, (peak_before, peak_after)
        assert client.health() == "SERVING"
        assert client.health("splitdet.v1.Detection") == "SERVING"
        again = client.detect(sample.encoded, sample.image, "after", manifest.fingerprint)
        assert len(again.boxes) == len(sample.reference["boxes"])
    metrics = server.metrics()
    invalid = metrics['splitdet_cloud_failures_total{code="INVALID_ARGUMENT",method="Detect"}']
    assert invalid == sum(code is grpc.StatusCode.INVALID_ARGUMENT for _, code in cases.values())


# --------------------------------------------------------------------------------- SIGTERM


def test_sigterm_during_a_slow_call(model, tmp_path, processes):
    _, model_dir, manifest, sample = model
    grace = 30.0  # (ample: the server exits once its one call is done, long before)
    server = start_cloud_process(
        model_dir, tmp_path, "term", "--debug-delay", "2", "--grace", str(grace)
    )
    processes.append(server)
    client = _client(server)
    statuses: list[str] = []
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60
        )

        def follow() -> None:
            try:
                for update in watch:
                    statuses.append(
                        health_pb2.HealthCheckResponse.ServingStatus.Name(update.status)
                    )
            except grpc.RpcError as exc:  # (ended with OK by the stop: none)
                statuses.append(f"ended {exc.code().name}")

        follower = threading.Thread(target=follow)
        follower.start()
        results: list = []
        slow = threading.Thread(
            target=lambda: results.append(
                client.detect(sample.encoded, sample.image, "slow", manifest.fingerprint)
            )
        )
        slow.start()
        deadline = time.monotonic() + 10
        while server.metrics().get("splitdet_cloud_in_flight", 0) < 1:
            assert time.monotonic() < deadline, "the slow call never started"
            time.sleep(0.02)
        terminate(server.process)
        signalled = time.monotonic()
        while "NOT_SERVING" not in statuses:
            assert time.monotonic() - signalled < 15, statuses
            time.sleep(0.02)
        follower.join(5)  # the stop ends the watch (open, it held the stop for its grace)
        assert not follower.is_alive(), "the watch was left open by the stop"
        with pytest.raises(RetryLater) as refused:
            client.detect(sample.encoded, sample.image, "new", manifest.fingerprint, timeout=5)
        assert refused.value.code is grpc.StatusCode.UNAVAILABLE
        slow.join(15)
        code = server.process.wait(timeout=grace + 5)
        exited = time.monotonic() - signalled
    client.close()
    assert statuses[0] == "SERVING" and statuses[-1] == "NOT_SERVING"
    assert len(results) == 1 and len(results[0].boxes) == len(sample.reference["boxes"])
    assert code == 0, server.log()
    assert exited < grace, exited


# ------------------------------------------------------------------- balancing and failover


def _requests(server) -> float:
    return server.metrics().get('splitdet_cloud_requests_total{code="OK",method="Detect"}', 0.0)


def test_two_servers_share_calls_and_survive_one_dying(model, tmp_path, processes):
    _, model_dir, manifest, sample = model
    servers = start_cloud_processes(model_dir, tmp_path, ["a", "b"])
    processes.extend(servers)
    first, second = servers
    with _client(first, second) as client:
        for i in range(10):
            client.detect(sample.encoded, sample.image, f"spread-{i}", manifest.fingerprint)
        counts = [_requests(first), _requests(second)]
        assert sum(counts) == 10 and min(counts) >= 3, counts
        first.process.kill()
        first.process.wait(10)
        time.sleep(0.3)  # the client sees the connection close
        for i in range(10):
            result = client.detect(sample.encoded, sample.image, f"after-{i}", manifest.fingerprint)
            assert len(result.boxes) == len(sample.reference["boxes"])
        assert _requests(second) == counts[1] + 10


# --------------------------------------------------------------------- idempotency, restart


def test_repeated_request_id_after_restart_is_not_recomputed(model, tmp_path, processes):
    _, model_dir, manifest, sample = model
    heads, hits = "splitdet_cloud_heads_runs_total", "splitdet_cloud_cache_hits_total"
    server = start_cloud_process(model_dir, tmp_path, "durable")
    processes.append(server)
    with _client(server) as client:
        first = client.detect(sample.encoded, sample.image, "once", manifest.fingerprint)
        again = client.detect(sample.encoded, sample.image, "once", manifest.fingerprint)
    assert not first.cached and again.cached
    assert server.metrics()[heads] == 1 and server.metrics()[hits] == 1
    terminate(server.process)
    assert server.process.wait(30) == 0

    restarted = start_cloud_process(model_dir, tmp_path, "durable")  # same answers database
    processes.append(restarted)
    with _client(restarted) as client:
        after = client.detect(sample.encoded, sample.image, "once", manifest.fingerprint)
    assert after.cached
    np.testing.assert_array_equal(after.boxes, first.boxes)
    np.testing.assert_array_equal(after.scores, first.scores)
    np.testing.assert_array_equal(after.labels, first.labels)
    assert restarted.metrics()[heads] == 0 and restarted.metrics()[hits] == 1
