"""Thread settings of the benchmark's processes follow the cores this process may run on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and at least 2 usable cores",
)


def test_loadtest_started_cloud_threads_follow_cpu_affinity(tmp_path: Path) -> None:
    """A loadtest pinned to one core starts its cloud with one torch thread, as `splitdet
    cloud` and `splitdet bench` count cores, not with every core of the host
    (`os.cpu_count()`: 64 threads on 2 pinned cores measure an oversubscribed cloud)."""
    out = tmp_path / "load.json"
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")  # (never read: the missing --model stops the run first)
    core = min(os.sched_getaffinity(0))
    result = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", "loadtest", str(image),
         "--model", str(tmp_path / "no-model"), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    settings = json.loads(out.read_text())["settings"]
    assert settings["cloud_threads"] == 1


def test_the_edge_runtime_threads_follow_cpu_affinity() -> None:
    """The edge's ONNX Runtime sessions, without --threads, run a thread per core the process
    may use (they took `os.cpu_count()`: every core of the host, on an edge pinned to fewer)."""
    core = min(os.sched_getaffinity(0))
    result = subprocess.run(
        [sys.executable, "-c", "from splitdet.edge.runtime import session_options; "
         "print(session_options(None).intra_op_num_threads)"],
        capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1"]


def test_jpeg_baseline_gets_its_image_as_monolithic_does(tmp_path: Path) -> None:
    """The JPEG baseline's server hands its detector the decoded image as the monolithic
    system gets it: Float32[3, H, W], C-contiguous (a transposed view made torch's resize take
    a strided path, ~0.1 s more per 2448x2048 image, charged to the baseline), the same
    values; and the server still answers with that detector's boxes."""
    import numpy as np
    import torch

    from splitdet.bench.jpeg_server import JpegClient, jpeg_pixels
    from splitdet.bench.processes import ServiceProcess
    from splitdet.bench.run import load_image_bytes
    from splitdet.bench.systems import jpeg_bytes
    from splitdet.shared.checkpoint import save_checkpoint

    from conftest import make_tiny_model

    rng = np.random.default_rng(0)
    data = jpeg_bytes(rng.random((3, 96, 128), dtype=np.float32), 95)
    pixels = jpeg_pixels(data)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 96, 128)
    assert pixels.flags.c_contiguous
    np.testing.assert_array_equal(pixels, load_image_bytes(data))

    model = make_tiny_model()
    save_checkpoint(tmp_path / "m.pt", model, gate_threshold=0.5)
    server = ServiceProcess(
        [sys.executable, "-m", "splitdet.bench.jpeg_server", "--checkpoint",
         str(tmp_path / "m.pt"), "--threads", "1"],
        log_path=tmp_path / "jpeg.log", name="JPEG baseline server", ready_prefix="PORT ",
    )  # fmt: skip
    with server:
        client = JpegClient(f"127.0.0.1:{server.ready['line'].split()[1]}")
        try:
            answer = client.detect(data)
        finally:
            client.close()
    with torch.inference_mode():
        expected = model([torch.from_numpy(load_image_bytes(data))])[0]
    assert len(answer["scores"]) == len(expected["scores"])
    np.testing.assert_allclose(answer["scores"], expected["scores"].numpy(), atol=1e-5)
