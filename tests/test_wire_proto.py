"""The wire contract: generated code is current, requests survive the round trip, the client's
channel and failure rules, and the idempotency store."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from splitdet.cloud.idempotency import IdempotencyStore, StoredAnswer
from splitdet.edge.client import (
    ClientConfig,
    ImageMeta,
    NeverRetry,
    RetryLater,
    build_request,
    channel_options,
    channel_target,
    classify,
)
from splitdet.shared.codec import encode

REPO = Path(__file__).resolve().parents[1]
WIRE = REPO / "shared" / "wire"


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_proto():
    files = _generator().generate()
    assert set(files) == {p.name for p in WIRE.glob("*.py*")}, "run `make proto`"
    for name, text in files.items():
        assert (WIRE / name).read_text() == text, f"shared/wire/{name} is stale: run `make proto`"


def test_generated_code_is_marked_and_imports_from_the_wire_package():
    for path in WIRE.glob("detection_pb2*"):
        assert "Do not edit" in path.read_text().splitlines()[1], path
    grpc_module = (WIRE / "detection_pb2_grpc.py").read_text()
    assert "from splitdet.shared.wire import detection_pb2" in grpc_module
    assert "from splitdet.v1" not in grpc_module


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch):
    generator = _generator()
    for name, text in generator.generate().items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(generator, "WIRE_DIR", tmp_path)
    assert generator.main(["--check"]) == 0
    (tmp_path / "detection_pb2.py").write_text("# edited by hand\n")
    assert generator.main(["--check"]) == 1


def test_request_round_trip_keeps_every_field():
    import numpy as np

    from splitdet.cloud.request_wire import call_from_proto
    from splitdet.shared.wire import detection_pb2 as pb

    rng = np.random.default_rng(0)
    levels = {"0": rng.standard_normal((4, 8, 8), dtype=np.float32)}
    for codec in ("fp32", "fp16", "int8"):
        encoded = encode(levels, codec=codec)
        image = ImageMeta((480, 640), (224, 298), "cam-1/img-7.png")
        raw = build_request(encoded, image, "req-1", "f" * 64).SerializeToString()
        call = call_from_proto(pb.DetectRequest.FromString(raw))
        assert call.request_id == "req-1" and call.fingerprint == "f" * 64
        assert call.image.original_hw == (480, 640) and call.image.resized_hw == (224, 298)
        assert call.image.source == "cam-1/img-7.png"
        assert list(call.tensors) == encoded  # scales and zero points survive as doubles


@pytest.mark.parametrize(
    ("addresses", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("cloud.example:443", "cloud.example:443"),
        ("127.0.0.1:1, 127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
        ("dns:///cloud.example:50051", "dns:///cloud.example:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
    ],
)
def test_channel_target(addresses, target):
    assert channel_target(addresses) == target


@pytest.mark.parametrize("addresses", ["", "a.example:1,b.example:2", "127.0.0.1:1,[::1]:2", "x"])
def test_channel_target_refuses(addresses):
    with pytest.raises(ValueError):
        channel_target(addresses)


def test_channel_options_bound_messages_and_balance_round_robin():
    options = dict(channel_options(ClientConfig("127.0.0.1:1,127.0.0.1:2", max_message_bytes=7)))
    assert options["grpc.max_send_message_length"] == 7
    assert options["grpc.max_receive_message_length"] == 7
    assert '"round_robin"' in options["grpc.service_config"]
    assert options["grpc.keepalive_time_ms"] > 0


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", RetryLater),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", RetryLater),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy", RetryLater),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max (9 vs. 4)", NeverRetry),
        # only a RESOURCE_EXHAUSTED size refusal never fits: an outage whose text quotes one
        # (a proxy's, a load balancer's) is still an outage
        (grpc.StatusCode.UNAVAILABLE, "upstream: message larger than max (9 vs. 4)", RetryLater),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad shape", NeverRetry),
        (grpc.StatusCode.FAILED_PRECONDITION, "fingerprint", NeverRetry),
        (grpc.StatusCode.UNAUTHENTICATED, "token", NeverRetry),
        (grpc.StatusCode.INTERNAL, "bug", NeverRetry),
        (grpc.StatusCode.UNKNOWN, "?", NeverRetry),
    ],
)
def test_failure_classification(code, message, kind):
    error = classify(code, message)
    assert type(error) is kind and error.code is code and error.message == message
    assert error.retry is (kind is RetryLater)


def test_idempotency_store_is_durable_and_bounded(tmp_path):
    path = tmp_path / "answers.sqlite"
    store = IdempotencyStore(path, capacity=3)
    for i in range(5):
        store.put(f"id-{i}", StoredAnswer("fp", f"digest-{i}", f"answer-{i}".encode()))
    store.put("id-4", StoredAnswer("fp", "digest-4", b"answer-4"))  # replacing keeps one row
    store.close()
    reopened = IdempotencyStore(path, capacity=3)
    assert len(reopened) <= 3
    assert reopened.get("id-0") is None and reopened.get("id-1") is None  # oldest evicted
    assert reopened.get("id-4") == StoredAnswer("fp", "digest-4", b"answer-4")
    assert reopened.get("id-3").payload == b"answer-3"
    reopened.close()


_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "torchvision")):
                raise ImportError(f"torch is blocked in this test: {name}")
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)


def test_client_and_cloud_cli_load_without_torch():
    code = _BLOCK_TORCH + textwrap.dedent(
        """
        import splitdet.edge.client, splitdet.cloud.cli_cloud
        from splitdet.shared.cli import main
        try:
            main(["cloud", "--help"])
        except SystemExit as exit:
            assert exit.code == 0
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "splitdet cloud --model" in help_text  # an example
    assert "--max-message-mib" in help_text and "(default: 256;" in help_text  # the stated bound
