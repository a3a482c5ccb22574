"""TLS and mutual TLS with a throw-away CA made here (acceptance 3).

Refused: plaintext, no client certificate, a client certificate from another CA, a wrong token.
Accepted: the right client certificate and token.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cloud_fixtures import make_sample, shared_model_dir
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitdet.cloud.core import DetectionCore, load_cloud
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry, RetryLater

pytestmark = pytest.mark.timeout(120)
TOKEN = "correct horse battery staple"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, key, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _certificate(subject, issuer, public_key, signing_key, extensions):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


class ThrowawayCA:
    """A CA that signs server and client certificates, written as PEM files in `directory`."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _certificate(
            _name(name),
            _name(name),
            self.key.public_key(),
            self.key,
            [(x509.BasicConstraints(ca=True, path_length=None), True)],
        )
        self.cert_path, _ = _write(directory / f"{name}-ca", self.key, self.cert)

    def issue(
        self, common_name: str, server: bool, curve: ec.EllipticCurve | None = None
    ) -> tuple[Path, Path]:
        """(certificate path, key path) for a server (localhost, 127.0.0.1) or a client; its
        key on `curve` (default P-256)."""
        key = ec.generate_private_key(curve or ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        extensions = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
        ]
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            extensions.append((x509.SubjectAlternativeName(names), False))
        cert = _certificate(
            _name(common_name), self.cert.subject, key.public_key(), self.key, extensions
        )
        return _write(self.directory / f"{self.name}-{common_name}", key, cert)


def plant_pki(directory: Path) -> dict:
    """The plant's CA (`ca`), the cloud's pair (`server`), an edge's (`client`), and an edge
    pair from another CA (`other_client`), written in `directory`."""
    ca, other_ca = ThrowawayCA(directory, "plant"), ThrowawayCA(directory, "intruder")
    return {
        "ca": ca.cert_path,
        "server": ca.issue("cloud", server=True),
        "client": ca.issue("edge-1", server=False),
        "other_client": other_ca.issue("edge-x", server=False),
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return plant_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    model, model_dir, manifest = shared_model_dir(0)
    cert, key = pki["server"]
    config = ServerConfig(
        model_dir=model_dir,
        listen="127.0.0.1:0",
        threads=2,
        tls_cert=cert,
        tls_key=key,
        client_ca=pki["ca"],
        token=TOKEN,
    )
    cloud, manifest = load_cloud(model_dir)
    server = CloudServer(config, DetectionCore(cloud, manifest, None)).start()
    yield server, make_sample(model, seed=5)
    server.stop(0)


def _client(server: CloudServer, pki, **settings) -> CloudClient:
    base = {"addresses": f"localhost:{server.port}", "manifest_timeout_s": 5.0}
    return CloudClient(ClientConfig(**{**base, **settings}))


def _trusted_client(server: CloudServer, pki, **settings) -> CloudClient:
    """A client with the CA, the edge's certificate and the token: everything right."""
    cert, key = pki["client"]
    trusted = {"root_certs": pki["ca"], "client_cert": cert, "client_key": key, "token": TOKEN}
    return _client(server, pki, **{**trusted, **settings})


def _refusal(client: CloudClient) -> Exception:
    with client, pytest.raises((RetryLater, NeverRetry)) as refused:
        client.manifest()
    return refused.value


def test_plaintext_is_refused(mtls_server, pki):
    error = _refusal(_client(mtls_server[0], pki, token=TOKEN))
    assert error.code is grpc.StatusCode.UNAVAILABLE


def test_missing_client_certificate_is_refused(mtls_server, pki):
    error = _refusal(_client(mtls_server[0], pki, root_certs=pki["ca"], token=TOKEN))
    assert error.code is grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(mtls_server, pki):
    cert, key = pki["other_client"]
    client = _client(
        mtls_server[0], pki, root_certs=pki["ca"], client_cert=cert, client_key=key, token=TOKEN
    )
    assert _refusal(client).code is grpc.StatusCode.UNAVAILABLE


def test_server_from_an_unknown_ca_is_refused(mtls_server, pki):
    cert, key = pki["client"]
    client = _client(mtls_server[0], pki, client_cert=cert, client_key=key, token=TOKEN)
    assert _refusal(client).code is grpc.StatusCode.UNAVAILABLE  # system roots do not know it


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + " "])
def test_wrong_token_is_refused(mtls_server, pki, token):
    cert, key = pki["client"]
    client = _client(
        mtls_server[0], pki, root_certs=pki["ca"], client_cert=cert, client_key=key, token=token
    )
    error = _refusal(client)
    assert isinstance(error, NeverRetry) and error.code is grpc.StatusCode.UNAUTHENTICATED


def test_right_certificate_and_token_succeed(mtls_server, pki):
    server, sample = mtls_server
    cert, key = pki["client"]
    fingerprint = server.core.fingerprint
    with _client(
        server, pki, root_certs=pki["ca"], client_cert=cert, client_key=key, token=TOKEN
    ) as client:
        assert client.manifest().fingerprint == fingerprint
        result = client.detect(sample.encoded, sample.image, "tls-1", fingerprint)
        assert len(result.boxes) == len(sample.reference["boxes"]) > 0
    # an IP target with the certificate's name given explicitly works too
    with _trusted_client(
        server, pki, addresses=f"127.0.0.1:{server.port}", server_name="localhost"
    ) as client:
        assert client.health() == "SERVING"


def test_several_addresses_over_tls_need_the_name_every_certificate_holds(mtls_server, pki):
    """With several addresses the channel's authority is the list, which no certificate names:
    every call failed hostname verification, with a hint that the certificate lacked the
    host. Refused at once now, naming --server-name; given it, the replicas answer."""
    server, _ = mtls_server
    cert, key = pki["client"]
    replicas = f"127.0.0.1:{server.port},127.0.0.2:{server.port}"  # (the second one is dead)
    for empty in (None, ""):  # ("" sets no name: gRPC checks the list again)
        with pytest.raises(ValueError, match="need --server-name NAME"):
            ClientConfig(
                replicas, root_certs=pki["ca"], client_cert=cert, client_key=key, server_name=empty
            )
    ClientConfig(replicas)  # (plaintext has no name to check)
    with _trusted_client(server, pki, addresses=replicas, server_name="localhost") as client:
        assert client.health() == "SERVING"


def test_server_only_tls(pki, tmp_path):
    _, model_dir, _ = shared_model_dir(0)
    cert, key = pki["server"]
    config = ServerConfig(
        model_dir=model_dir,
        listen="127.0.0.1:0",
        tls_cert=cert,
        tls_key=key,
        answers_db=tmp_path / "answers.sqlite",
    )
    with CloudServer(config) as server:
        with _client(server, pki, root_certs=pki["ca"]) as client:
            assert client.manifest().fingerprint == server.core.fingerprint
        assert _refusal(_client(server, pki)).code is grpc.StatusCode.UNAVAILABLE


def test_partial_tls_settings_are_refused(tmp_path, pki):
    cert, _key = pki["server"]
    with pytest.raises(ValueError):
        ServerConfig(model_dir=tmp_path, tls_cert=cert)
    with pytest.raises(ValueError):
        ServerConfig(model_dir=tmp_path, client_ca=pki["ca"])
    with pytest.raises(ValueError):
        ClientConfig("localhost:1", client_cert=cert)


def test_a_renewed_certificate_is_served_without_a_restart(pki, tmp_path, caplog):
    """The certificate files are renewed on disk (another CA here, to tell them apart): the
    next connection gets the new certificate, with no restart. Half a renewal (a key that is
    not the certificate's) is logged, and the certificate in use kept."""
    import shutil

    _, model_dir, _ = shared_model_dir(0)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki["server"][0], cert)
    shutil.copy(pki["server"][1], key)
    config = ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", tls_cert=cert, tls_key=key,
                          answers_db=tmp_path / "answers.sqlite")  # fmt: skip
    renewed_ca = ThrowawayCA(tmp_path, "renewed")
    caplog.set_level("INFO", logger="splitdet.cloud.server")
    with CloudServer(config) as server:
        with _client(server, pki, root_certs=pki["ca"]) as client:
            assert client.manifest().fingerprint == server.core.fingerprint
        new_cert, new_key = renewed_ca.issue("cloud", server=True)
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        with _client(server, pki, root_certs=renewed_ca.cert_path) as client:
            assert client.manifest().fingerprint == server.core.fingerprint
        assert "renewed certificate" in caplog.text
        refused = _refusal(_client(server, pki, root_certs=pki["ca"]))  # the old CA's trust
        assert refused.code is grpc.StatusCode.UNAVAILABLE

        _, stray_key = ThrowawayCA(tmp_path, "stray").issue("cloud", server=True)
        key.write_bytes(stray_key.read_bytes())  # half a renewal: not the certificate's key
        with _client(server, pki, root_certs=renewed_ca.cert_path) as client:
            assert client.manifest().fingerprint == server.core.fingerprint
        assert "keeping the current certificate" in caplog.text

        # a renewal OpenSSL reads but gRPC cannot serve with: said so, the current one kept
        k1_cert, k1_key = renewed_ca.issue("cloud-k1", server=True, curve=ec.SECP256K1())
        key.write_bytes(k1_key.read_bytes())
        cert.write_bytes(k1_cert.read_bytes())
        with _client(server, pki, root_certs=renewed_ca.cert_path) as client:
            assert client.manifest().fingerprint == server.core.fingerprint
        assert "gRPC's TLS cannot serve with" in caplog.text


def test_a_token_sent_without_tls_is_warned_of_once_per_target(caplog):
    """The warning was logged for every client made: a daemon makes one anew at each
    reconnect (9-10 lines per edge in one outage), loadtest one per simulated edge."""
    from support import free_port

    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with caplog.at_level("WARNING", logger="splitdet.edge"):
        for address in (first, first, first, second):
            CloudClient(ClientConfig(addresses=address, token=TOKEN)).close()
    warned = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert len(warned) == 2 and first in warned[0] and second in warned[1], warned
