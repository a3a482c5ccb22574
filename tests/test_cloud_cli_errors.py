"""`splitdet cloud` refuses what it cannot serve in one line naming the option (exit status 2), and
before it loads the model: a --listen port past 65535 (gRPC served 99999 on port 34463), numbers
out of range (--threads 0 silently meant every core, --grace inf a traceback on SIGTERM), TLS
files gRPC would refuse with only "cannot listen", a --ready-file or --answers-db that cannot be.
Also: a busy port is named as busy, and SIGTERM while loading exits 0 without serving."""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_cloud_tls import ThrowawayCA

from splitdet.cloud.cli_cloud import check_tls_files
from splitdet.cloud.server_config import ServerConfig
from splitdet.shared.cli import CommandError, main, split_host_port

pytestmark = pytest.mark.timeout(120)


def _refused(capsys, argv: list[str], *needles: str) -> str:
    """Run `splitdet cloud ARGV` in-process; assert exit 2 and one line holding every needle."""
    assert main(["cloud", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("splitdet cloud: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.fixture
def no_model(tmp_path) -> list[str]:
    """Options naming a model directory that does not exist: an option checked before the model
    loads is reported instead of the missing manifest."""
    return ["--model", str(tmp_path / "no-model"), "--answers-db", str(tmp_path / "a.sqlite")]


# ------------------------------------------------------------------------------ --listen


@pytest.mark.parametrize(
    "listen, problem",
    [
        ("127.0.0.1:99999", "0-65535, got '99999'"),
        ("127.0.0.1:-1", "0-65535, got '-1'"),
        ("127.0.0.1:http", "0-65535, got 'http'"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "no port"),
        (":50051", "no host"),
        ("::1:50051", "brackets"),
        ("[::1:50051", "unclosed"),
        ("[::1]", "no port"),
        ("256.0.0.1:50051", "not an IPv4 address"),
        ("cloud host:50051", "not a host name"),
    ],
)
def test_bad_listen_address_is_refused_before_loading(capsys, no_model, listen, problem):
    line = _refused(capsys, [*no_model, "--listen", listen], f"--listen {listen!r}", problem)
    assert "manifest" not in line


def test_split_host_port_accepts_what_grpc_binds():
    assert split_host_port("0.0.0.0:50051", "--listen") == ("0.0.0.0", 50051)
    assert split_host_port(" localhost:0 ", "--listen") == ("localhost", 0)
    assert split_host_port("[::1]:0", "--listen") == ("::1", 0)
    assert split_host_port("[fe80::1%eth0]:443", "--x") == ("fe80::1%eth0", 443)
    with pytest.raises(CommandError, match="1-65535"):
        split_host_port("10.0.0.5:0", "--cloud", port_zero=False)


def test_port_past_65535_is_not_served(tiny_model_dir, tmp_path):
    """The reported bug: gRPC took 99999 modulo 65536 and served on port 34463."""
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "splitdet.shared.cli", "cloud", "--model", str(tiny_model_dir),
         "--listen", "127.0.0.1:99999", "--threads", "1", "--ready-file", str(ready),
         "--answers-db", str(tmp_path / "a.sqlite")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while process.poll() is None and not ready.exists():
            time.sleep(0.05)
        assert not ready.exists(), f"it serves: {ready.read_text()}"
        err = process.communicate(timeout=30)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 2, err
    assert "--listen '127.0.0.1:99999'" in err and "Traceback" not in err, err


def test_python_dash_m_prints_one_line_too(tmp_path):
    """`python -m splitdet.shared.cli` (what the tests and supervisors run) printed a traceback
    and exited 1 for every CommandError: its __main__ copy caught another CommandError class."""
    result = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", "cloud", "--model", str(tmp_path),
         "--listen", "127.0.0.1:99999"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("splitdet cloud: error: --listen"), result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------ numbers, hosts


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("--threads", "0", "--threads must be 1-1024, got 0"),  # was: every core, silently
        ("--threads", "100000", "--threads must be 1-1024"),  # was: a segfault
        ("--max-concurrent", "0", "--max-concurrent must be >= 1"),
        ("--max-message-mib", "4096", "--max-message-mib must be 1-2047"),
        ("--max-decoded-mib", "0", "--max-decoded-mib must be >= 1"),
        ("--grace", "inf", "--grace must be 0-3600, got inf"),  # was: a traceback on SIGTERM
        ("--grace", "nan", "--grace must be 0-3600, got nan"),
        ("--grace", "-1", "--grace must be 0-3600"),
        ("--metrics-port", "70000", "--metrics-port must be 0-65535"),  # was: a traceback
        ("--metrics-port", "-1", "--metrics-port must be 0-65535"),
        ("--answers-cap", "-1", "--answers-cap must be >= 0"),
        ("--forget-edges-after", "0", "--forget-edges-after must be 0.01-87600"),
        ("--forget-edges-after", "inf", "--forget-edges-after must be 0.01-87600"),
        ("--metrics-host", "metrics host", "--metrics-host: 'metrics host' is not a host name"),
        ("--metrics-host", "", "--metrics-host: no host"),
    ],
)
def test_option_out_of_range_is_named(capsys, no_model, option, value, problem):
    line = _refused(capsys, [*no_model, option, value], problem)
    assert "manifest" not in line


def test_server_config_refuses_a_grace_no_wait_can_take():
    with pytest.raises(ValueError, match="grace_s"):
        ServerConfig(model_dir=Path("model"), grace_s=math.inf)


# ---------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pem")
    ca = ThrowawayCA(directory, "plant")
    cert, key = ca.issue("cloud", server=True)
    _, other_key = ca.issue("other", server=True)
    k1_cert, k1_key = ca.issue("k1", server=True, curve=ec.SECP256K1())  # gRPC refuses it
    encrypted = directory / "encrypted.key"
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    damaged = directory / "damaged.pem"
    damaged.write_text(cert.read_text().replace("M", "X", 3))
    text = directory / "notes.txt"
    text.write_text("not a certificate\n")
    return {"ca": ca.cert_path, "cert": cert, "key": key, "other_key": other_key,
            "encrypted": encrypted, "damaged": damaged, "text": text,
            "k1_cert": k1_cert, "k1_key": k1_key,
            "missing": directory / "missing.pem"}  # fmt: skip


@pytest.mark.parametrize(
    "files, problem",
    [
        (("missing", "key", None), "--tls-cert {missing}: cannot read"),
        (("text", "key", None), "--tls-cert {text}: not a PEM certificate"),
        (("key", "cert", None), "--tls-cert {key}: not a PEM certificate"),  # swapped
        (("damaged", "key", None), "--tls-cert {damaged}: a damaged PEM certificate"),
        (("cert", "text", None), "--tls-key {text}: not a PEM private key"),
        (("cert", "other_key", None), "--tls-key {other_key}: not the key of --tls-cert"),
        (("cert", "encrypted", None), "--tls-key {encrypted}: encrypted"),
        (
            ("k1_cert", "k1_key", None),
            "--tls-key {k1_key}: a key (or --tls-cert {k1_cert}) that "
            "OpenSSL reads but gRPC's TLS cannot serve with",
        ),
        (("cert", "key", "key"), "--client-ca {key}: not a PEM certificate"),
        (("cert", "key", "missing"), "--client-ca {missing}: cannot read"),
        (("cert", None, None), "--tls-cert and --tls-key go together"),
        ((None, None, "ca"), "--client-ca (mutual TLS) needs --tls-cert"),
    ],
)
def test_tls_file_grpc_would_refuse_is_named(capsys, no_model, pem, files, problem):
    argv = list(no_model)
    for option, name in zip(("--tls-cert", "--tls-key", "--client-ca"), files, strict=True):
        if name is not None:
            argv += [option, str(pem[name])]
    line = _refused(capsys, argv, problem.format(**pem))
    assert "manifest" not in line and "cannot listen" not in line


def test_tls_files_that_serve_pass_the_check(pem):
    check_tls_files(pem["cert"], pem["key"], pem["ca"])
    check_tls_files(None, None, None)


def test_the_tls_check_leaves_no_socket_open(pem):
    """It binds a throwaway server (gRPC's own verdict on the pair): that socket must close,
    or a cloud whose certificate is renewed every month gathers listening ports."""
    import os

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    check_tls_files(pem["cert"], pem["key"], pem["ca"])
    before = open_files()
    for _ in range(10):
        check_tls_files(pem["cert"], pem["key"], pem["ca"])
    assert open_files() - before < 5


# ------------------------------------------------------------------------ files it writes


def test_ready_file_and_answers_db_that_cannot_be_are_named(capsys, no_model, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _refused(capsys, [*no_model, "--ready-file", str(tmp_path / "gone" / "r.json")],
             "--ready-file", "no folder")  # fmt: skip
    _refused(capsys, [*no_model, "--ready-file", str(folder)], "--ready-file", "is a directory")
    model = no_model[:2]  # (its own --answers-db: a path option is given once)
    _refused(capsys, [*model, "--answers-db", str(folder)], "--answers-db", "is a directory")
    _refused(capsys, [*model, "--answers-db", str(a_file / "a.sqlite")],
             "--answers-db", f"cannot create its folder {a_file}")  # fmt: skip


# ----------------------------------------------------------------------------- busy ports


@pytest.fixture
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_listen_port_held_by_another_server_is_named(capsys, tiny_model_dir, tmp_path, busy_port):
    _refused(
        capsys,
        ["--model", str(tiny_model_dir), "--listen", f"127.0.0.1:{busy_port}", "--threads", "1",
         "--answers-db", str(tmp_path / "a.sqlite")],
        f"cannot listen on 127.0.0.1:{busy_port}: Address already in use",
    )  # fmt: skip


def test_listen_address_this_host_lacks_is_named(capsys, tiny_model_dir, tmp_path):
    """gRPC said only "Failed to bind ... set GRPC_VERBOSITY=debug", after a "stopped" line for
    a server that never served. 192.0.2.1 is TEST-NET-1: no machine has it."""
    line = _refused(
        capsys,
        ["--model", str(tiny_model_dir), "--listen", "192.0.2.1:50059", "--threads", "1",
         "--answers-db", str(tmp_path / "a.sqlite")],
        "cannot listen on 192.0.2.1:50059: 192.0.2.1 is not an address of this machine",
    )  # fmt: skip
    assert "GRPC_VERBOSITY" not in line


def test_metrics_port_in_use_is_named(capsys, tiny_model_dir, tmp_path, busy_port):
    _refused(
        capsys,
        ["--model", str(tiny_model_dir), "--listen", "127.0.0.1:0", "--threads", "1",
         "--metrics-port", str(busy_port), "--metrics-host", "127.0.0.1",
         "--answers-db", str(tmp_path / "a.sqlite")],
        f"metrics endpoint 127.0.0.1:{busy_port}: Address already in use",
    )  # fmt: skip


def test_a_server_that_never_served_logs_no_stopped(tiny_model_dir, tmp_path, busy_port):
    """A busy --metrics-port logged "stopped" before its error: it read as if it had served.
    (A process: its log lines on stderr as an operator sees them.)"""
    done = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", "cloud", "--model", str(tiny_model_dir),
         "--listen", "127.0.0.1:0", "--threads", "1", "--metrics-port", str(busy_port),
         "--metrics-host", "127.0.0.1", "--answers-db", str(tmp_path / "a.sqlite")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "loading model" in done.stderr and "Address already in use" in done.stderr
    assert "stopped" not in done.stderr, done.stderr


# ------------------------------------------------------------------------ SIGTERM at once


def test_sigterm_while_loading_exits_0(tiny_model_dir, tmp_path):
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "splitdet.shared.cli", "cloud", "--model", str(tiny_model_dir),
         "--listen", "127.0.0.1:0", "--threads", "1", "--ready-file", str(ready),
         "--answers-db", str(tmp_path / "a.sqlite")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = []
        for line in process.stderr:  # SIGTERM is handled from this line on
            seen.append(line)
            if "loading model" in line or "serving model" in line:
                break
        assert "loading model" in seen[-1], "".join(seen)
        process.send_signal(signal.SIGTERM)
        err = "".join(seen) + process.communicate(timeout=60)[1]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err  # was -15: killed by the signal
    assert "Traceback" not in err, err


def test_a_name_with_one_address_this_host_lacks_still_listens(monkeypatch):
    """ "localhost" gives 127.0.0.1 and ::1; with IPv6 off, ::1 cannot be bound, yet gRPC
    serves on 127.0.0.1. The check refused it as "not an address of this machine"."""
    from splitdet.cloud import listen_address

    def both(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port)),  # not here
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setattr(listen_address.socket, "getaddrinfo", both)
    listen_address.check_listen_address(f"localhost:{port}")  # no OSError
    monkeypatch.setattr(listen_address.socket, "getaddrinfo", lambda *a, **k: both(*a, **k)[:1])
    with pytest.raises(OSError, match="localhost is not an address of this machine"):
        listen_address.check_listen_address(f"localhost:{port}")


def test_forgetting_edges_before_the_quiet_camera_alert_can_fire_is_warned_of(
    no_model, caplog, capsys
):
    """--forget-edges-after under an hour drops an edge's last-seen series before the README's
    'camera gone quiet' alert (an hour) can fire on it: accepted in silence before."""
    caplog.set_level("WARNING", logger="splitdet.cloud")
    main(["cloud", *no_model, "--forget-edges-after", "0.01"])  # (no model: exit 2 after)
    capsys.readouterr()
    warned = [r for r in caplog.records if getattr(r, "fields", {}).get("event") ==
              "forget_before_alert"]  # fmt: skip
    assert warned and "--forget-edges-after 0.01 h" in warned[0].getMessage()
    caplog.clear()
    main(["cloud", *no_model, "--forget-edges-after", "1"])
    assert not [r for r in caplog.records if "forget-edges-after" in r.getMessage()]
