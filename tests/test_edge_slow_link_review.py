"""The edge's keepalive on a slow uplink, and its plaintext-token warning (a network review).

On a slow or lossy uplink the edge's own keepalive cut every upload longer than about 40 s
(`UNAVAILABLE: Stream removed (ping timeout)`), whatever --timeout said: a ping is queued behind
the request's bytes and was given 10 s to be answered (gRPC also made that the socket's
TCP_USER_TIMEOUT). Now a ping gets as long as a call may take, and `--keepalive` sets (or turns
off) the pings on every command that talks to the cloud. The warning about a token sent
without TLS had no `event` field for log pipelines to grep.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
from cloud_fixtures import FreezableProxy, make_sample, shared_model_dir, start_loopback_server

from splitdet.edge.client import ClientConfig, CloudClient, channel_options
from splitdet.edge.cloud_args import CONNECTION_OPTIONS, client_config, connection_options_given
from splitdet.shared.cli import TOKEN_ENV, CommandError, build_parser
from splitdet.shared.messages import build_request

pytestmark = pytest.mark.timeout(120)

#: Every command that talks to the cloud, with the arguments it requires besides --cloud.
CLOUD_COMMANDS = {
    "edge run": ["edge", "run", "--model", "m", "--watch", "w", "--db", "d.sqlite"],
    "edge check": ["edge", "check", "--model", "m"],
    "predict": ["predict", "images", "--model", "m"],
    "loadtest": ["loadtest", "images", "--model", "m"],
    "eval": ["eval", "--data", "d", "--model", "m"],
}


def _options(command: str, *extra: str) -> dict:
    """The channel options gRPC receives for `command` --cloud ... `extra`."""
    argv = [*CLOUD_COMMANDS[command], "--cloud", "127.0.0.1:50051", *extra]
    return dict(channel_options(client_config(build_parser().parse_args(argv))))


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.mark.parametrize("command", sorted(CLOUD_COMMANDS))
def test_a_ping_waits_as_long_as_a_call_may_take(command):
    """The ping timeout (and so gRPC's TCP_USER_TIMEOUT) was 10 s whatever --timeout said."""
    options = _options(command, "--timeout", "120")
    assert options["grpc.keepalive_timeout_ms"] == 120_000
    assert options["grpc.http2.ping_timeout_ms"] == 120_000
    assert options["grpc.keepalive_time_ms"] == 30_000  # idle connections still pinged
    default = _options(command)  # --timeout's default, 60 s
    assert default["grpc.http2.ping_timeout_ms"] == default["grpc.keepalive_timeout_ms"] == 60_000


@pytest.mark.parametrize("command", sorted(CLOUD_COMMANDS))
def test_keepalive_sets_or_turns_off_the_pings(command):
    assert _options(command, "--keepalive", "45")["grpc.keepalive_time_ms"] == 45_000
    off = _options(command, "--keepalive", "0", "--timeout", "90")
    # no keepalive pings, no TCP_USER_TIMEOUT; gRPC's own probes' pings get the deadline still
    assert not any(name.startswith("grpc.keepalive") for name in off), off
    assert off["grpc.http2.ping_timeout_ms"] == 90_000


@pytest.mark.parametrize("value", ["5", "-1", "nan", "inf", "86401"])
def test_keepalive_out_of_range_is_refused(value):
    argv = [*CLOUD_COMMANDS["edge run"], "--cloud", "127.0.0.1:50051", "--keepalive", value]
    with pytest.raises(CommandError, match=r"--keepalive .*must be 0 \(no pings\) or .*10, 86400"):
        client_config(build_parser().parse_args(argv))


def test_keepalive_without_cloud_is_named():
    """It means nothing without --cloud: refused as the other connection options are."""
    assert "keepalive" in CONNECTION_OPTIONS
    args = build_parser().parse_args([*CLOUD_COMMANDS["predict"], "--keepalive", "20"])
    assert connection_options_given(args) == ["--keepalive"]
    with pytest.raises(CommandError, match="--keepalive: for --cloud only"):
        client_config(args, alone="the cloud half runs here")


class ThrottledProxy:
    """A TCP proxy on loopback passing the client's bytes to the server at `rate` bytes/s (a
    slow uplink: what the client sends waits in the socket buffers), the answers at once."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port, self.rate = target_port, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target_port))
                self.sockets += [near, far]
                for source, sink, rate in ((near, far, self.rate), (far, near, None)):
                    threading.Thread(
                        target=self._pass, args=(source, sink, rate), daemon=True
                    ).start()

    @staticmethod
    def _pass(source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1024 if rate else 65536):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_an_upload_slower_than_the_old_ping_timeout_is_delivered(tmp_path):
    """~0.34 MB at 25 kB/s: ~14 s. A ping sent a second in waits behind the request's bytes;
    it was given 10 s (UNAVAILABLE: ping timeout after ~11 s, on every retry alike), and now
    gets the call's 60 s deadline. (keepalive_time_s=1 stands in for the 30 s a slower link
    reaches: the ping is queued behind the upload either way.)"""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=1, codec="int8", image_hw=(480, 600))
    request = build_request(sample.encoded, sample.image, "slow-1", manifest.fingerprint)
    assert request.ByteSize() > 300_000
    server = start_loopback_server(tmp_path)
    proxy = ThrottledProxy(server.port, rate=25_000)
    try:
        config = ClientConfig(f"127.0.0.1:{proxy.port}", timeout_s=60, keepalive_time_s=1)
        with CloudClient(config) as client:
            answer = client.send_request(request)
        assert answer.request_id == "slow-1"
    finally:
        proxy.close()
        server.stop(0)


def test_a_silently_dropped_idle_connection_is_still_replaced(tmp_path):
    """The keepalive's job kept: a connection a firewall drops silently is given up after the
    keepalive time plus the ping's wait (here the calls' 2 s deadline) and the next call
    opens a new one."""
    server = start_loopback_server(tmp_path)
    proxy = FreezableProxy(server.port)
    try:
        config = ClientConfig(
            f"127.0.0.1:{proxy.port}", timeout_s=2, manifest_timeout_s=2, keepalive_time_s=1
        )
        assert config.ping_timeout_s == 2
        with CloudClient(config) as client:
            assert client.health() == "SERVING"
            proxy.cut()
            time.sleep(5)  # a ping after 1 s, unanswered, given up 2 s later
            assert client.health(timeout=5) == "SERVING"
    finally:
        proxy.close()
        server.stop(0)


def test_the_plaintext_token_warning_carries_its_event(caplog):
    from support import free_port

    address = f"127.0.0.1:{free_port()}"
    with caplog.at_level("WARNING", logger="splitdet.edge"):
        CloudClient(ClientConfig(address, token="s3cret")).close()
    [record] = [r for r in caplog.records if "without TLS" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.fields["event"] == "token_without_tls"
    assert record.fields["target"] == address


def test_the_clouds_pings_wait_as_long_as_a_request_may_take_to_arrive(tmp_path):
    """The same on the cloud's side: its own pings (keepalive, and gRPC's bandwidth probes
    sent while a request arrives) were given 60 s, so an upload allowed a longer --max-receive
    was cut at 60 s on a slow link, the edge's answer queued behind its own bytes (measured at
    15 kB/s). The wait is now never shorter than --max-receive."""
    from splitdet.cloud.channel_options import grpc_options
    from splitdet.cloud.server_config import ServerConfig

    slow = dict(grpc_options(ServerConfig(model_dir=tmp_path, max_receive_s=300.0)))
    assert slow["grpc.http2.ping_timeout_ms"] == slow["grpc.keepalive_timeout_ms"] == 300_000
    default = dict(grpc_options(ServerConfig(model_dir=tmp_path)))
    assert default["grpc.http2.ping_timeout_ms"] == 60_000  # (gRPC's own, as before)
