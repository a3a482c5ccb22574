"""Helpers for the wire and cloud server tests: a tiny model directory, requests, server processes.

Not a conftest: tests import what they use. Models are tiny (ResNet18, 64-channel FPN, 224 px
inputs, 100 proposals) so a detect call takes tens of milliseconds on two cores.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitdet.edge.client import ImageMeta
from splitdet.shared.codec import EncodedTensor, decode, encode, expected_level_shapes
from splitdet.shared.manifest import Manifest
from splitdet.shared.model import CloudHalf, EdgeHalf, MultiTaskRCNN
from splitdet.shared.spec import padded_size
from splitdet.training.export import export_model

from conftest import make_tiny_model

#: The cloud tests' model: conftest's tiny model with fewer proposals and a narrower box head,
#: so that a detect call takes tens of milliseconds.
TINY_OVERRIDES = dict(
    max_size=288, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_head_dim=256
)
#: Image size of the test requests (h, w); resized to 224x280, padded to 224x288.
IMAGE_HW = (240, 300)


def tiny_model(seed: int = 0) -> MultiTaskRCNN:
    """A random-weight tiny model in eval mode (conftest's, with TINY_OVERRIDES)."""
    return make_tiny_model(seed, **TINY_OVERRIDES)


def write_model_dir(model: MultiTaskRCNN, out_dir: Path) -> Manifest:
    """`splitdet export` of `model` into `out_dir` (gate threshold 0.5, default codec int8)."""
    return export_model(model, out_dir, gate_threshold=0.5, default_codec="int8")


_TMP_ROOT: list[Path] = []


def _tmp_root() -> Path:
    if not _TMP_ROOT:
        root = Path(tempfile.mkdtemp(prefix="splitdet-cloud-tests-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _TMP_ROOT.append(root)
    return _TMP_ROOT[0]


@functools.cache
def shared_model_dir(seed: int = 0) -> tuple[MultiTaskRCNN, Path, Manifest]:
    """One model directory per seed per test process (made once, removed at exit)."""
    model = tiny_model(seed)
    out_dir = _tmp_root() / f"model-{seed}"
    return model, out_dir, write_model_dir(model, out_dir)


@dataclass
class Sample:
    """One image's request material and the in-process reference answer."""

    encoded: list[EncodedTensor]
    image: ImageMeta
    reference: dict[str, torch.Tensor]  # CloudHalf.detect on the codec-decoded levels


@torch.inference_mode()
def make_sample(
    model: MultiTaskRCNN, seed: int = 1, codec: str = "int8", image_hw=IMAGE_HW
) -> Sample:
    """Run the edge half on a random image, encode its levels, and compute the reference boxes
    with the cloud half in-process on exactly what the server will decode."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, *image_hw, generator=generator)
    images, _ = model.transform([image])
    _, levels = EdgeHalf(model).forward(images.tensors)
    arrays = {name: level[0].numpy() for name, level in levels.items()}
    encoded = encode(arrays, codec=codec)
    resized = tuple(images.image_sizes[0])
    meta = ImageMeta(original_hw=tuple(image_hw), resized_hw=resized, source=f"random-{seed}")
    shapes = expected_level_shapes(model.config.split_spec, padded_size(*resized))
    decoded = decode(encoded, shapes)
    features = {name: torch.from_numpy(array)[None] for name, array in decoded.items()}
    reference = CloudHalf(model).detect(features, [resized], [tuple(image_hw)])[0]
    return Sample(encoded, meta, reference)


# ------------------------------------------------------------------------ server processes


@dataclass
class CloudProcess:
    """A `splitdet cloud` subprocess and what its ready file said."""

    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_peak_bytes(self) -> int:
        """Peak resident memory (VmHWM) of the server process."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the process if it still runs (teardown; SIGTERM tests signal it themselves)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def start_cloud_process(
    model_dir: Path, work_dir: Path, name: str, *extra: str, timeout: float = 90.0
) -> CloudProcess:
    """Start `splitdet cloud` on a free loopback port and wait until it serves."""
    return start_cloud_processes(model_dir, work_dir, [name], *extra, timeout=timeout)[0]


def start_cloud_processes(
    model_dir: Path, work_dir: Path, names: list[str], *extra: str, timeout: float = 90.0
) -> list[CloudProcess]:
    """Start one `splitdet cloud` per name (in parallel), each on a free loopback port, with its
    own answers database and log in `work_dir`; wait until all serve. On failure, none is left
    running."""
    work_dir.mkdir(parents=True, exist_ok=True)
    launched = []
    for name in names:
        ready = work_dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = work_dir / f"{name}.log"
        command = [
            sys.executable, "-m", "splitdet.shared.cli", "cloud",
            "--model", str(model_dir),
            "--listen", "127.0.0.1:0",
            "--metrics-port", "0",
            "--metrics-host", "127.0.0.1",
            "--threads", "1",
            "--answers-db", str(work_dir / f"{name}.answers.sqlite"),
            "--ready-file", str(ready),
            *extra,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        launched.append((process, ready, log_path))
    deadline = time.monotonic() + timeout
    try:
        for process, ready, log_path in launched:
            while not ready.exists():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"splitdet cloud exited {process.returncode}:\n{log_path.read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"splitdet cloud not ready:\n{log_path.read_text()}")
                time.sleep(0.05)
    except BaseException:
        for process, _, _ in launched:
            process.kill()
            process.wait()
        raise
    servers = []
    for process, ready, log_path in launched:
        info = json.loads(ready.read_text())
        servers.append(CloudProcess(process, info["port"], info["metrics_port"], log_path))
    return servers


def terminate(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)


def scrape_metrics(port: int) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value} (comments skipped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def as_numpy(reference: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reference.items()}


class FreezableProxy:
    """A TCP proxy on loopback whose open connections can go silent both ways, as a network
    cut off mid-call does (a dead NAT entry, a pulled cable): no FIN, no RST, just nothing.
    Connections opened after `cut` pass bytes again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.cuts: list[threading.Event] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Silence every connection open now."""
        for cut in self.cuts:
            cut.set()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target_port))
                self.sockets += [near, far]
                cut = threading.Event()
                self.cuts.append(cut)
                for source, sink in ((near, far), (far, near)):
                    args = (source, sink, cut)
                    threading.Thread(target=self._pass, args=args, daemon=True).start()

    @staticmethod
    def _pass(source: socket.socket, sink: socket.socket, cut: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if cut.is_set():
                    return  # swallow it and read no more: the peer hears nothing
                sink.sendall(data)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


#: The Detect method's full gRPC name, for calls made with raw bytes.
DETECT = "/splitdet.v1.Detection/Detect"
#: The cloud's last-seen gauge of one edge label, as `scrape_metrics` keys it.
LAST_SEEN = 'splitdet_cloud_edge_last_seen_timestamp_seconds{edge="%s"}'


def start_loopback_server(tmp_path: Path, threads: int = 1, **settings):
    """A CloudServer started in-process on a free loopback port, serving `shared_model_dir(0)`
    with its answers store and metrics in `tmp_path`; `settings` go to ServerConfig."""
    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    _, model_dir, _ = shared_model_dir(0)
    config = ServerConfig(
        model_dir=model_dir, listen="127.0.0.1:0", threads=threads, metrics_port=0,
        answers_db=tmp_path / "answers.sqlite", **settings,
    )  # fmt: skip
    return CloudServer(config).start()


@contextlib.contextmanager
def loopback_detect(tmp_path: Path, **settings):
    """(`start_loopback_server`'s server, a raw-bytes Detect to it); stopped at once after."""
    import grpc

    server = start_loopback_server(tmp_path, **settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, channel.unary_unary(DETECT)
    finally:
        server.stop(0)


def detect_bytes(sample, fingerprint: str, request_id: str) -> bytes:
    """A serialized DetectRequest of `make_sample`'s `sample` for the export `fingerprint`."""
    from splitdet.shared.messages import build_request

    return build_request(sample.encoded, sample.image, request_id, fingerprint).SerializeToString()


def detect_code(send, raw: bytes):
    """(the status code, its details) of a raw Detect call `send(raw)`: OK and "" when
    answered."""
    import grpc

    try:
        send(raw, timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
