"""Fixtures shared across the suite: a tiny random model and its exported model directory."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from splitdet.training.presets import TINY

if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share the 2 cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# A shell without job control starts background commands with SIGINT ignored, and an ignored
# signal stays ignored in every child: the Ctrl-C tests' subprocesses would never see theirs
# (`make test &` from a script). A handled signal is reset to the default in a child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: The modules that take longest (in this order: wall seconds of a three-worker run, 40-180 s
#: each), started first. pytest-xdist hands each worker a whole module (`--dist loadfile`) and by
#: default the modules of most tests first, which left a one-test module of 80 s to the very end
#: while the other workers idled; with `--no-loadscope-reorder` the order below is the order
#: they are handed out (longest first), then the rest by their number of tests.
SLOW_MODULES = (
    "test_edge_daemon", "test_train", "test_demo", "test_bench", "test_int8_trained",
    "test_export_publish", "test_model_split", "test_cloud_server", "test_eval_store_review",
    "test_predict_review", "test_cloud_reload", "test_container_review", "test_train_processes",
    "test_eval_export", "test_eval_review", "test_loadtest", "test_train_resume_review",
    "test_torchvision_import",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the modules longest first (`SLOW_MODULES`, then by number of tests), each one's
    tests kept in their order."""
    rank = {name: place for place, name in enumerate(SLOW_MODULES)}
    count = Counter(item.path for item in items)
    items.sort(key=lambda item: (rank.get(item.path.stem, len(rank)), -count[item.path]))


#: The signals whose dispositions a test must leave as it found them (`_signals_kept`).
_KEPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signals_kept():
    """Put SIGINT, SIGTERM and SIGHUP back as they were after each test: a command run in the
    test's own process that leaves one ignored (`edge run` and `cloud` do while their process
    ends) made every later subprocess of that worker inherit it ignored, and a Ctrl-C test's
    process then never stopped (a CI run: two such tests hung to their timeouts)."""
    before = {sig: signal.getsignal(sig) for sig in _KEPT_SIGNALS}
    yield
    for sig, handler in before.items():
        if handler is not None and signal.getsignal(sig) != handler:
            signal.signal(sig, handler)


#: One epoch of the `tiny` training preset, no validation.
ONE_EPOCH = replace(TINY, epochs=1, eval_every=0)

#: Small enough to export and run in a second or two on 2 cores; same code paths as ResNet50.
#: (A 256-wide box head over 300 proposals: a third of the default's evaluation time.)
TINY_CONFIG = dict(
    depth=18, fpn_channels=64, min_size=224, max_size=320, box_detections_per_img=50,
    box_head_dim=256, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300,
)  # fmt: skip


def make_tiny_model(seed: int = 0, **overrides):
    """A random-weight MultiTaskRCNN (eval mode) with TINY_CONFIG (+ overrides)."""
    import torch

    from splitdet.shared.config import ModelConfig
    from splitdet.shared.model import build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY_CONFIG, **overrides})).eval()


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: the machine's cores are shared, and oversubscribed OpenMP threads
    spin instead of working (a tiny run took 25x longer beside another training job)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model():
    """The random tiny model the session's exported model directory was made from."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """`splitdet export` of `tiny_model` (gate threshold 0.5, default codec int8)."""
    from splitdet.training.export import export_model

    out = tmp_path_factory.mktemp("tiny_model")
    export_model(tiny_model, out, gate_threshold=0.5, default_codec="int8")
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic VOC dataset (320x256): train 4+2, val 1+1... and test 3+3 images."""
    from splitdet.training.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny_dataset")
    generate_dataset(
        out,
        seed=3,
        size=(320, 256),
        n_defective=5,
        n_free=3,
        n_test_defective=3,
        n_test_free=3,
        workers=1,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory) -> Path:
    """`make_tiny_voc` with 3 defective and 1 defect-free image (a module may define its own)."""
    from support import make_tiny_voc

    return make_tiny_voc(tmp_path_factory.mktemp("voc"), n_defective=3, n_free=1)


@pytest.fixture(scope="module")
def finished_run(tiny_voc, tmp_path_factory) -> Path:
    """A `tiny` training run of one epoch on `tiny_voc`, one iteration (epoch 0 in last.pt)."""
    from splitdet.training.train import train

    run = tmp_path_factory.mktemp("run")
    train(ONE_EPOCH, tiny_voc, run, progress=False, max_iters=1)
    return run


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs mounted at tmp_path/disk for the test (root only; skipped elsewhere)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)


@pytest.fixture
def store_db(tmp_path) -> Path:
    """An empty splitdet edge store (a real SQLite file)."""
    import contextlib

    from splitdet.edge.store import ResultStore

    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)):
        pass
    return db
