"""What an operator meets: alerts that fire on the first event, text logs that say what
happened, a mutual-TLS refusal named as such, client examples for client addresses.

1. Every labelled counter series an alert or the troubleshooting table refers to exists at 0
   from the start (edge and cloud, scraped from real endpoints): one that first appears at 1
   is one Prometheus' increase()/rate() see no increase in, so the first quarantined image or
   dead letter after each start went unalerted.
2. `--log-format text` shows a record's fields (path, reason, code) and event name as
   key=value on its line; a message that holds them already reads as before.
3. `edge check` (and the daemon's log) name a missing or unaccepted client certificate when a
   cloud under mutual TLS closes the handshake (gRPC says only UNAVAILABLE "Socket closed").
4. A malformed --cloud is answered with an address to connect to, not 0.0.0.0.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cloud_fixtures import scrape_metrics, shared_model_dir, start_cloud_process
from PIL import Image
from test_cloud_tls import plant_pki

from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry
from splitdet.edge.store_schema import ERROR_KINDS, VERDICTS
from splitdet.shared.cli import main

pytestmark = pytest.mark.timeout(180)
TOKEN = "ops-review-token"
#: Short waits for `edge run`; production defaults are seconds.
FAST = ("--threads", "1", "--settle", "0.05", "--unreadable-grace", "0", "--poll", "0.05",
        "--retry-initial", "0.1", "--retry-max", "0.5", "--timeout", "5")  # fmt: skip
#: Codes a dead letter can carry (all but OK and the operator problems, which stay in the
#: outbox; CORRUPT_OUTBOX: a row that no longer parses) and a failed send is counted under.
DEAD_LETTER_CODES = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                     "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "ABORTED",
                     "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                     "CORRUPT_OUTBOX")  # fmt: skip
SEND_FAILURE_CODES = ("CANCELLED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                      "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION")  # fmt: skip
#: The cloud's methods, and every code one can end with but OK.
CLOUD_METHODS = ("Detect", "GetManifest")
CLOUD_FAILURE_CODES = ("FAILED_PRECONDITION", "DEADLINE_EXCEEDED", "CANCELLED",
                       "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL",
                       "UNAUTHENTICATED")  # fmt: skip
#: A text log record's first line: "2026-12-04T15:40:01.123Z LEVEL logger: ..." (UTC).
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) \S+: ")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """One export for the edge and the cloud of this module (the same fingerprint)."""
    return shared_model_dir(0)[1]


def _splitdet(*argv: str) -> list[str]:
    return [sys.executable, "-m", "splitdet.shared.cli", *argv]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


def _png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ 1. series at 0 from the start


class _Daemon:
    """`splitdet edge run` (not --once) with a metrics endpoint, its cloud a closed port."""

    def __init__(self, model_dir: Path, tmp_path: Path) -> None:
        self.ready = tmp_path / "edge.ready.json"
        self.log = tmp_path / "edge.log"
        self.command = _splitdet(
            "edge", "run", "--model", str(model_dir), "--watch", str(tmp_path / "hot"),
            "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9",
            "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--ready-file",
            str(self.ready), *FAST,
        )  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> dict[str, float]:
        """Start it; its first scrape."""
        self.ready.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

        def ready():
            assert self.process.poll() is None, self.log.read_text()
            return self.ready.exists()

        _wait_for(ready, 60, "the edge daemon to start")
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(json.loads(self.ready.read_text())["metrics_port"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                try:
                    code = self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:  # its threads' stacks into the log, then fail
                    self.process.send_signal(signal.SIGUSR1)
                    time.sleep(2)
                    pytest.fail("edge run did not stop within 30 s of SIGTERM; its log:\n"
                                + self.log.read_text()[-6000:])  # fmt: skip
                assert code == 0, self.log.read_text()
            finally:
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()


@pytest.fixture
def daemon(model_dir, tmp_path):
    (tmp_path / "hot").mkdir()
    started = _Daemon(model_dir, tmp_path)
    yield started
    started.stop()


def _edge_zero_series() -> dict[str, float]:
    """Every labelled edge counter series known in advance, at 0."""
    series = {f'splitdet_edge_images_total{{verdict="{v}"}}': 0.0 for v in VERDICTS}
    series |= {f'splitdet_edge_errors_total{{kind="{k}"}}': 0.0 for k in ERROR_KINDS}
    series |= {f'splitdet_edge_dead_letters_total{{code="{c}"}}': 0.0 for c in DEAD_LETTER_CODES}
    series |= {f'splitdet_edge_send_failures_total{{code="{c}"}}': 0.0 for c in SEND_FAILURE_CODES}
    return series


def test_edge_alert_series_exist_at_zero_from_the_start_and_after_a_restart(daemon, tmp_path):
    """The README's alerts `increase(splitdet_edge_dead_letters_total[1h]) > 0` and
    `increase(splitdet_edge_errors_total{kind="quarantine"}[1h]) > 0` see the first event:
    the series is scraped at 0 before it, and is there again at 0 after a restart."""
    quarantined = 'splitdet_edge_errors_total{kind="quarantine"}'
    first = daemon.start()
    zero = _edge_zero_series()
    assert {key: first.get(key) for key in zero} == zero
    counters = ("splitdet_edge_errors_total{", "splitdet_edge_dead_letters_total{")
    assert all(v == 0 for k, v in first.items() if k.startswith(counters))  # none but these

    (tmp_path / "hot" / "broken.png").write_bytes(b"not an image")
    _wait_for(lambda: daemon.metrics().get(quarantined) == 1.0, 30, "the quarantine counted")
    daemon.stop()

    again = daemon.start()  # a fresh process: its counters start again, at 0, not absent
    assert {key: again.get(key) for key in zero} == zero


def _cloud_config(model_dir: Path, tmp_path: Path, **settings) -> ServerConfig:
    return ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", threads=1,
                        answers_db=tmp_path / "answers.sqlite", **settings)  # fmt: skip


def test_cloud_failure_series_exist_at_zero_from_the_start(model_dir, tmp_path):
    """`rate(splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED"}[5m]) > 0` sees the first
    refusal: every method's series for every code it can end with is scraped at 0 first (and
    the unauthenticated callers' refusals, the one per-edge series known in advance)."""
    saturated = 'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}'
    refused = 'splitdet_cloud_edge_refusals_total{code="UNAUTHENTICATED",edge="unauthenticated"}'
    config = _cloud_config(model_dir, tmp_path, metrics_port=0, metrics_host="127.0.0.1",
                           token=TOKEN)  # fmt: skip
    with CloudServer(config) as server:
        first = scrape_metrics(server.metrics_port)
        assert first.get(saturated) == 0.0 and first.get(refused) == 0.0
        for method in CLOUD_METHODS:
            assert first.get(f'splitdet_cloud_requests_total{{code="OK",method="{method}"}}') == 0
            for code in CLOUD_FAILURE_CODES:
                labels = f'{{code="{code}",method="{method}"}}'
                assert first.get(f"splitdet_cloud_requests_total{labels}") == 0.0, labels
                assert first.get(f"splitdet_cloud_failures_total{labels}") == 0.0, labels
        # per-edge series stay per edge: none before an edge calls
        assert not [key for key in first if "edge_answers_total{" in key]

        wrong = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", token="wrong"))
        with wrong, pytest.raises(NeverRetry):
            wrong.manifest()
        after = scrape_metrics(server.metrics_port)
        assert after[refused] == 1.0
        labels = '{code="UNAUTHENTICATED",method="GetManifest"}'
        assert after[f"splitdet_cloud_failures_total{labels}"] == 1.0


# ------------------------------------------------------------------ 2. text logs show the fields


def test_text_log_of_edge_run_shows_the_path_reason_and_events(model_dir, tmp_path):
    """`edge run --once --log-format text`, its cloud a closed port, a corrupt image and a
    flagged one: the quarantine line names the file and the reason, the send failures their
    event and code; one line per record."""
    hot = tmp_path / "hot"
    hot.mkdir()
    (hot / "broken file.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _png(hot / "flagged.png")
    result = subprocess.run(
        _splitdet("edge", "run", "--model", str(model_dir), "--watch", str(hot),
                  "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--once",
                  "--drain-timeout", "1", "--threshold", "0", "--log-format", "text", *FAST),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    log = result.stderr
    assert result.returncode == 1, log  # the flagged image's request is still pending
    lines = log.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), log

    [quarantined] = [line for line in lines if re.search(r": quarantined\b", line)]
    path = str(hot / "broken file.png")
    assert f"path={json.dumps(path)}" in quarantined  # quoted: it holds a space
    reason = re.search(r' reason=("(?:[^"\\]|\\.)*")', quarantined)
    assert reason and json.loads(reason.group(1)).startswith(f"{path}: "), quarantined
    assert "image_id=1 " in quarantined and " to=" in quarantined

    [classified] = [line for line in lines if re.search(r": classified\b", line)]
    assert f"path={hot / 'flagged.png'}" in classified and "verdict=pending" in classified
    retries = [line for line in lines if "event=send_retry" in line]
    assert retries and all("code=UNAVAILABLE" in line for line in retries), log
    stopped = r": stopped event=stopped processed=2 outbox_depth=1 dead_letters=0$"
    assert re.search(stopped, log, re.M), log  # event= too, though the message is its name


def test_an_edge_refused_for_its_token_is_told_to_restart_once_it_is_fixed(model_dir, tmp_path):
    """The edge reads --token-file at its start only: an operator who fixed the file, as the
    auth_refused line asked, saw the edge refused on for good. The line says to restart it."""
    token_file, wrong = tmp_path / "token.txt", tmp_path / "wrong.txt"
    token_file.write_text(TOKEN + "\n")
    wrong.write_text("not-the-token\n")
    hot = tmp_path / "hot"
    hot.mkdir()
    _png(hot / "flagged.png")
    cloud = start_cloud_process(model_dir, tmp_path, "cloud", "--token-file", str(token_file))
    try:
        result = subprocess.run(
            _splitdet("edge", "run", "--model", str(model_dir), "--watch", str(hot),
                      "--db", str(tmp_path / "edge.sqlite"), "--cloud", cloud.address, "--once",
                      "--drain-timeout", "2", "--threshold", "0", "--token-file", str(wrong),
                      "--log-format", "text", *FAST),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        cloud.stop()
    refused = [line for line in result.stderr.splitlines() if "refuses our credentials" in line]
    assert refused, result.stderr
    assert "a new --token-file is read when the edge restarts (restart it)" in refused[0]


def test_text_log_of_the_cloud_shows_fields_its_messages_do_not(model_dir, tmp_path):
    """`splitdet cloud` logs text by default: its start line gains the served models' whole
    fingerprints; a refusal, whose message names the method, peer, edge and code, reads as
    before (nothing repeated); the SIGTERM line too."""
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    cloud = start_cloud_process(model_dir, tmp_path, "cloud", "--token-file", str(token_file))
    try:
        wrong = CloudClient(ClientConfig(cloud.address, token="wrong", edge_name="cam-1"))
        with wrong, pytest.raises(NeverRetry):
            wrong.manifest()
        cloud.process.send_signal(signal.SIGTERM)
        assert cloud.process.wait(timeout=30) == 0
    finally:
        cloud.stop()
    lines = cloud.log().splitlines()
    fingerprint = json.loads((model_dir / "manifest.json").read_text())["fingerprint"]
    [serving] = [line for line in lines if ": serving model " in line]
    port = re.search(r" on port (\d+) ", serving).group(1)  # (numbers written though shown)
    assert f' event=serving port={port} models=["{fingerprint}"] threads=' in serving, serving
    [refused] = [line for line in lines if "refused (UNAUTHENTICATED)" in line]
    assert refused.endswith("send metadata 'authorization: Bearer <token>' event=refused"), refused
    assert "=" not in refused.split(" refused ")[0], refused  # no string field repeated
    [draining] = [line for line in lines if "SIGTERM: draining" in line]
    assert draining.endswith("draining for up to 10.0 s event=draining grace_s=10.0"), draining


def _text(message: str, *args, **fields) -> str:
    from splitdet.shared.logs import TextLogFormatter

    record = logging.LogRecord("splitdet.edge", logging.WARNING, __file__, 1, message, args, None)
    record.fields = fields
    return TextLogFormatter().format(record)


def test_text_formatter_quotes_escapes_and_leaves_out_what_the_message_shows():
    line = _text("%s: left alone", "/data/cam/a b.json", event="file_skipped",
                 path="/data/cam/a b.json", extension=".json", note='say "hi"\nthere',
                 timings={"gate": 0.01}, served=["fp a"], image_id=10, empty="")  # fmt: skip
    assert "\n" not in line
    assert len(_text("m", path="a\u2028b\x85c").splitlines()) == 1  # what splitlines breaks at
    head, _, tail = line.partition("/data/cam/a b.json: left alone ")
    assert TEXT_LINE.match(head), line
    assert tail == ('event=file_skipped extension=.json note="say \\"hi\\"\\nthere" '
                    'timings={"gate":0.01} served="[\\"fp a\\"]" image_id=10 empty=""')  # fmt: skip
    # event= and numbers are written whatever the message shows (a parser's keys stay put)
    assert _text("retrying in 3.5 s", failures=3).endswith(" failures=3")
    assert _text("%d torch threads", 2, threads=2).endswith("2 torch threads threads=2")
    assert _text("dead letter", event="dead_letter").endswith("dead letter event=dead_letter")
    assert _text("quarantined", event="quarantined").endswith(": quarantined event=quarantined")


# ------------------------------------------------------------------ 3. mutual TLS named


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return plant_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_cloud(model_dir, pki, tmp_path_factory):
    """A cloud under mutual TLS on loopback (`splitdet cloud --tls-cert --tls-key
    --client-ca`)."""
    cert, key = pki["server"]
    config = _cloud_config(model_dir, tmp_path_factory.mktemp("mtls"), tls_cert=cert,
                           tls_key=key, client_ca=pki["ca"])  # fmt: skip
    with CloudServer(config) as server:
        yield server


def _check(capsys, model_dir: Path, server: CloudServer, *options: str) -> tuple[int, str]:
    """`splitdet edge check` against `server` in-process: (exit status, its cloud line)."""
    code = main(["edge", "check", "--model", str(model_dir), "--cloud",
                 f"127.0.0.1:{server.port}", *options])  # fmt: skip
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line[6:].startswith("cloud ")]
    return code, line


def test_edge_check_names_a_missing_client_certificate(capsys, model_dir, pki, mtls_cloud):
    code, line = _check(capsys, model_dir, mtls_cloud, "--root-certs", str(pki["ca"]))
    assert code == 1 and line.startswith("FAIL") and "UNAVAILABLE" in line, line
    assert "likely cause: the cloud requires a client certificate (mutual TLS" in line, line
    assert "give --client-cert and --client-key" in line, line

    cert, key = pki["client"]  # given them, it passes, no cause named
    code, line = _check(capsys, model_dir, mtls_cloud, "--root-certs", str(pki["ca"]),
                        "--client-cert", str(cert), "--client-key", str(key))  # fmt: skip
    assert code == 0 and line.startswith("ok") and "likely cause" not in line, line


def test_edge_check_names_a_client_certificate_the_cloud_does_not_accept(
    capsys, model_dir, pki, mtls_cloud
):
    cert, key = pki["other_client"]
    code, line = _check(capsys, model_dir, mtls_cloud, "--root-certs", str(pki["ca"]),
                        "--client-cert", str(cert), "--client-key", str(key))  # fmt: skip
    assert code == 1 and line.startswith("FAIL"), line
    assert f"likely cause: the cloud does not accept --client-cert {cert}" in line, line
    assert "--client-ca" in line, line


def test_edge_check_names_tls_to_a_plaintext_edge(capsys, model_dir, mtls_cloud):
    code, line = _check(capsys, model_dir, mtls_cloud)
    assert code == 1 and "likely cause: the cloud serves TLS" in line, line
    assert "--root-certs" in line, line


def test_edge_check_names_the_other_handshake_failures(capsys, model_dir, pki, mtls_cloud,
                                                      tmp_path):  # fmt: skip
    """An untrusted cloud certificate, one for another name, TLS to a plaintext cloud."""
    cert, key = pki["client"]
    client = ("--client-cert", str(cert), "--client-key", str(key))
    _, line = _check(capsys, model_dir, mtls_cloud, *client)  # the system's roots only
    assert "likely cause: this edge does not trust the cloud's certificate" in line, line
    assert "--root-certs" in line, line
    _, line = _check(capsys, model_dir, mtls_cloud, "--root-certs", str(pki["ca"]), *client,
                     "--server-name", "other.example")  # fmt: skip
    assert "likely cause: the cloud's certificate does not name the host" in line, line
    assert "--server-name" in line, line
    with CloudServer(_cloud_config(model_dir, tmp_path)) as plaintext:
        _, line = _check(capsys, model_dir, plaintext, "--root-certs", str(pki["ca"]))
    assert "likely cause: the cloud serves no TLS at this address" in line, line


def test_edge_run_logs_the_likely_cause_of_a_refused_handshake(model_dir, pki, mtls_cloud,
                                                               tmp_path):  # fmt: skip
    """The daemon's start-up probe and each failed send say it too (JSON log fields)."""
    hot = tmp_path / "hot"
    hot.mkdir()
    _png(hot / "flagged.png")
    result = subprocess.run(
        _splitdet("edge", "run", "--model", str(model_dir), "--watch", str(hot),
                  "--db", str(tmp_path / "edge.sqlite"), "--cloud",
                  f"127.0.0.1:{mtls_cloud.port}", "--root-certs", str(pki["ca"]), "--once",
                  "--drain-timeout", "1", "--threshold", "0", *FAST),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    causes = {r["event"]: r.get("likely_cause", "") for r in records
              if r.get("event") in ("cloud_unreachable", "send_retry")}  # fmt: skip
    assert set(causes) == {"cloud_unreachable", "send_retry"}, result.stderr
    for cause in causes.values():
        assert "requires a client certificate" in cause and "--client-cert" in cause, causes


# ------------------------------------------------------------------ 4. client address examples


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if ": error: " in line]
    return line


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":50051", "[::1]"])
def test_a_malformed_cloud_address_gets_an_address_to_connect_to(capsys, model_dir, tmp_path,
                                                                  address):  # fmt: skip
    hot = tmp_path / "hot"
    hot.mkdir()
    image = _png(hot / "a.png")
    commands = {
        "edge run": ["edge", "run", "--model", str(model_dir), "--watch", str(hot), "--db",
                     str(tmp_path / "edge.sqlite"), "--once", "--log-format", "text"],
        "edge check": ["edge", "check", "--model", str(model_dir)],
        "predict": ["predict", str(image), "--model", str(model_dir), "--no-progress"],
        "loadtest": ["loadtest", str(image), "--model", str(model_dir)],
    }  # fmt: skip
    for name, argv in commands.items():
        line = _error(capsys, [*argv, "--cloud", address])
        assert f"--cloud {address!r}: " in line, (name, line)
        assert "cloud.example:50051" in line and "0.0.0.0" not in line, (name, line)
    assert not (tmp_path / "edge.sqlite").exists()
    # the cloud's --listen is an address to listen on: its example stays 0.0.0.0
    line = _error(capsys, ["cloud", "--model", str(tmp_path / "none"), "--listen", address])
    assert "0.0.0.0" in line and "cloud.example" not in line, line


def test_a_connection_dropped_is_not_blamed_on_tls_alone():
    """A load balancer with no cloud behind it closes the connection as a mutual-TLS cloud
    refusing the edge does: the cause says so. A call dropped mid-way (a cloud killed while
    answering, "Stream removed") is no handshake at all: no cause."""
    import grpc

    from splitdet.edge.client import ClientConfig, CloudError, likely_cause

    plain = ClientConfig("127.0.0.1:50051")
    closed = CloudError(
        grpc.StatusCode.UNAVAILABLE, "failed to connect: ipv4:127.0.0.1:50051: Socket closed"
    )
    assert "load balancer or proxy" in likely_cause(plain, closed)
    dropped = CloudError(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")
    assert likely_cause(plain, dropped) is None
