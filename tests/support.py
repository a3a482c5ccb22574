"""Helpers for tests: a torch-blocking subprocess runner, hostile files, a tiny VOC tree,
`splitdet predict` records, a batch edge daemon's configuration, a daemon run in a thread and
its result rows."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "torchvision")):
                # as if torch were not installed (an edge-only install)
                raise ModuleNotFoundError(f"torch is blocked in this test: {name}", name=name)
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing torch raises ImportError."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def sliver_png(width: int = 2000) -> bytes:
    """A valid grey PNG 1 px high: no detector input size can hold it (it resizes to 0 rows)."""
    raw = b"\x00" + bytes([128]) * width  # one row: filter byte, then the grey values
    header = struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 40000 x 40000 pixels (1.6 G)."""
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def train_argv(data: Path, run: Path, *extra: str) -> list[str]:
    """`splitdet train` arguments for one `tiny` epoch of `data` into `run`, no validation."""
    return ["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--epochs", "1",
            "--eval-every", "0", "--no-progress", *extra]  # fmt: skip


def make_tiny_voc(root: Path, n_defective: int = 6, n_free: int = 2, size=(160, 128), seed=0):
    """A VOC tree of dark images with bright 3-px strokes (`scratch`), split train = val = all."""
    import numpy as np

    from splitdet.training import voc

    rng = np.random.default_rng(seed)
    width, height = size
    ids = []
    for k in range(n_defective + n_free):
        image = rng.normal(40, 6, (height, width, 3)).clip(0, 255).astype(np.uint8)
        objects = []
        if k < n_defective:
            for _ in range(1 + k % 2):
                horizontal = rng.random() < 0.5
                length = int(rng.integers(30, 60))
                x0 = int(rng.integers(4, width - (length if horizontal else 4) - 4))
                y0 = int(rng.integers(4, height - (4 if horizontal else length) - 4))
                x1, y1 = (x0 + length, y0 + 3) if horizontal else (x0 + 3, y0 + length)
                image[y0:y1, x0:x1] = 230
                objects.append(
                    voc.VocObject("scratch", (float(x0), float(y0), float(x1), float(y1)))
                )
        ids.append(write_voc_image(root, f"img_{k:03d}", image, objects))
    for split in ("train", "val", "test"):
        voc.write_split(root, split, ids)
    return root


def write_voc_image(root: Path, image_id: str, image, objects) -> str:
    """Write `image` (uint8 [H, W, 3]) as JPEGImages/ID.png and its annotation naming
    `objects` (VocObjects) into the VOC tree `root`; returns `image_id`."""
    from PIL import Image

    from splitdet.training import voc

    height, width = image.shape[:2]
    path = root / "JPEGImages" / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    sample = voc.VocSample(image_id, path, width, height, tuple(objects))
    voc.write_annotation(root / "Annotations" / f"{image_id}.xml", sample)
    return image_id


def predict_records(model_dir: Path, images: Path, out: Path, *options: str) -> list[dict]:
    """Run `splitdet predict IMAGES --model MODEL_DIR --json OUT OPTIONS...` in-process; its
    per-image records, sorted by path."""
    import json

    from splitdet.shared.cli import main

    code = main([
        "predict", str(images), "--model", str(model_dir), *options,
        "--json", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    return sorted(json.loads(out.read_text()), key=lambda record: record["path"])


def pb_varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2) built by hand, for hostile requests."""
    return pb_varint(number << 3 | 2) + pb_varint(len(payload)) + payload


def as_nobody() -> list[str] | None:
    """The command prefix that runs as an unprivileged user, or None if there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import splitdet"], capture_output=True)
    return prefix if probe.returncode == 0 else None


@contextlib.contextmanager
def nobody_scratch(model_dir: Path):
    """(command prefix running as an unprivileged user, a scratch folder open to it, a copy
    of `model_dir` it can read), or pytest.skip when there is no such user. Root ignores
    permissions; /tmp/pytest-of-root is closed to others."""
    import pytest

    prefix = as_nobody()
    if prefix is None:
        pytest.skip("no unprivileged user to run as")
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        root.chmod(0o777)
        model = shutil.copytree(model_dir, root / "model")
        for path in [model, *model.iterdir()]:
            path.chmod(0o755)
        yield prefix, root, model


#: A gate threshold no p(defect) reaches: the daemon flags nothing.
NOTHING = 2.0


def daemon_config(model_dir: Path, tmp_path: Path, **overrides):
    """A batch `DaemonConfig` (`--once`) with short waits on tmp_path/hot, flagging nothing,
    its cloud a closed port; `overrides` replace any field."""
    from splitdet.edge.daemon_config import DaemonConfig

    watch = tmp_path / "hot"
    watch.mkdir(parents=True, exist_ok=True)
    values = dict(
        model_dir=model_dir, watch=watch, cloud="127.0.0.1:9", db=tmp_path / "edge.sqlite",
        once=True, drain_timeout_s=0.0, threshold=NOTHING, threads=1, settle_s=0.05,
        unreadable_grace_s=0.0, poll_s=0.05, retry_initial_s=0.1, retry_max_s=0.5,
    )  # fmt: skip
    return DaemonConfig(**{**values, **overrides})


@contextlib.contextmanager
def running(daemon):
    """An `EdgeDaemon`'s run() in a thread, stopped and joined on leaving (AssertionError if
    it does not stop within 30 s)."""
    import threading

    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        daemon.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "the daemon did not stop"


def run_until(argv: list[str], ready, what: str, then, timeout: float = 120.0):
    """Run `argv` (pipes, text), wait until `ready()` holds (AssertionError naming `what`
    after `timeout` s, or when the process ends first), call `then(process)` (send a signal,
    cut a link...), and wait for it to end: (exit status, stdout, stderr). The process is
    killed if anything fails on the way."""
    import time

    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
            time.sleep(0.02)
        then(process)
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


def image_rows(db: Path) -> list[dict]:
    """Every row of an edge store's images table, in arrival order, through a fresh
    connection."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM images ORDER BY id")]


def processes_naming(path: Path) -> list[int]:
    """Pids of the live processes (zombies left out) whose command line names `path`: the
    ranks of a training run."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(path).encode() in words and state != "Z":
            pids.append(int(entry.name))
    return pids


def cli_train_rank(rank: int, world: int, port: int, runs: list[list[str]], logs: str) -> None:
    """One torchrun-like rank (for torch.multiprocessing.spawn): `cli_train.main` for each argv
    of `runs` in turn, its stdout and stderr in LOGS/rankN.txt (asserting each exits 0)."""
    import torch
    import torch.distributed as dist

    from splitdet.training import cli_train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    with open(Path(logs) / f"rank{rank}.txt", "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            for argv in runs:
                assert cli_train.main(argv) == 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            if dist.is_initialized():
                dist.destroy_process_group()


def with_fd_closed(fd: int, argv: list[str]) -> list[str]:
    """`argv` run by a shell with file descriptor `fd` closed (`>&-`, `2>&-`), as a
    supervisor may start us. Not `preexec_fn=lambda: os.close(fd)`: that forks this process,
    and a fork of a process with gRPC threads (a test worker that ran a server) sometimes
    aborts in the child ("epoll_wait error: Bad file descriptor", 3 of 300 tries)."""
    return ["sh", "-c", f'exec "$@" {fd}>&-', "sh", *map(str, argv)]


def free_port() -> int:
    """A loopback port nothing listens on (a cloud that is down, or one to start there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """`condition()`'s first true value, polled every `interval` s; AssertionError naming
    `what` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


#: `splitdet ARGS` under a file size limit of argv[1] bytes (SIGXFSZ ignored: a write past it
#: fails with EFBIG, as on a file system that cannot hold the file).
FILE_SIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from splitdet.shared.cli import main
sys.exit(main(sys.argv[2:]))
"""


class Killed(BaseException):
    """Stands for a kill -9 at a chosen point: nothing after it runs, no handler cleans up."""


def killed(*_args, **_kwargs):
    """Patched in for a step a test kills the process at (`Killed`)."""
    raise Killed


class _FullDisk(io.FileIO):
    """A file on a file system that fills after `room` bytes: further writes fail with ENOSPC,
    as write(2) does there."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


class _CtrlCMidWrite(io.FileIO):
    """A file whose writer is stopped by Ctrl-C after `room` bytes: the write raises
    KeyboardInterrupt, as Python's SIGINT handler does in the thread that runs it."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise KeyboardInterrupt
        return super().write(data)


def ctrl_c_mid_write_open(file, mode="r", *args, **kwargs):
    """`open` for a module under test (monkeypatched in): a file opened for writing (torch.save's)
    is interrupted by Ctrl-C part way; others open as usual."""
    if "w" in mode:
        return _CtrlCMidWrite(file, "w")
    return builtins.open(file, mode, *args, **kwargs)


def full_disk_open(file, mode="r", *args, **kwargs):
    """`open` for a module under test (monkeypatched in): a file opened for writing (torch.save's)
    is on a full disk; others open as usual."""
    if "w" in mode:
        return _FullDisk(file, "w")
    return builtins.open(file, mode, *args, **kwargs)


def edge_error_line(capsys, *needles: str) -> str:
    """The one `splitdet edge: error:` line a command printed (no traceback), checked for each
    needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "splitdet edge: error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def edge_run_once_offline(db: Path, watch: Path, model_dir: Path) -> int:
    """`splitdet edge run --once` in this process on `watch`, a closed cloud port, a threshold
    nothing reaches (no image needs the cloud), text logs; its exit status."""
    from splitdet.shared.cli import main

    return main(
        ["edge", "run", "--model", str(model_dir), "--watch", str(watch), "--db", str(db),
         "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--settle", "0",
         "--unreadable-grace", "0", "--threads", "1", "--threshold", "2",
         "--log-format", "text"]
    )  # fmt: skip


def age_rows(db: Path, ids, days: float) -> None:
    """Make the edge store's rows `ids` look finished `days` ago, by the wall clock and the boot
    clock alike (a prune keeps a row of this boot that only the wall clock calls old:
    test_edge_prune_clock.py)."""
    import sqlite3
    import time

    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            "UPDATE images SET finished = ?, finished_boot_s = finished_boot_s - ? WHERE id = ?",
            [(time.time() - days * 86400.0, days * 86400.0, i) for i in ids],
        )
        conn.commit()


def image_ids(db: Path) -> set[int]:
    """The ids of the edge store's rows."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM images")}


def run_main(capsys, *argv: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `splitdet ARGV` run in this process (pytest's
    `capsys`); argparse's exits too."""
    from splitdet.shared.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


#: Python code defining `swallowed_then_wait()` (`.format(signal="SIGTERM")` first): it sends
#: SIGNAL to this process from inside a weakref callback (the handler runs there), as
#: the garbage collector would run one; put where the start-up passes, then waits 3 s there,
#: long enough for a signal sent again to arrive before the start-up goes on.
FINALISER = """
import os, signal, time, weakref

class Collected:
    pass

def finaliser(_ref):
    os.kill(os.getpid(), signal.{signal})
    for _ in range(10**5):  # (the handler runs between two bytecodes: here)
        pass

def swallowed_then_wait():
    thing = Collected()
    ref = weakref.ref(thing, finaliser)
    del thing  # the callback runs now
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.01)
"""
