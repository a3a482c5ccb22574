"""`splitdet export` over an earlier export: a run killed part-way leaves the earlier model
directory whole and servable (it is built in a staging folder and moved in, manifest last)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from splitdet.edge.runtime import EdgeRuntime
from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.manifest import GATE_ONNX, read_manifest
from splitdet.training.export import STAGING_PREFIX, export_model

from conftest import make_tiny_model


def _new_gate_written(out, old_stamp: int) -> bool:
    """Whether the running export has written its gate graph yet: into a staging folder, or
    (as an export that works in place would) over the earlier one."""
    staged = [f / GATE_ONNX for f in out.glob(f"{STAGING_PREFIX}*")]
    if any(g.is_file() and g.stat().st_size > 0 for g in staged):
        return True
    return (out / GATE_ONNX).stat().st_mtime_ns != old_stamp


def test_a_killed_export_leaves_the_earlier_one_whole(tmp_path):
    out = tmp_path / "model"
    before = export_model(make_tiny_model(seed=0), out).fingerprint
    checkpoint = tmp_path / "other.pt"
    save_checkpoint(checkpoint, make_tiny_model(seed=5))
    command = [sys.executable, "-m", "splitdet.shared.cli", "export",
               "--checkpoint", str(checkpoint), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stamp = (out / GATE_ONNX).stat().st_mtime_ns
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if _new_gate_written(out, stamp):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # mid-export: its new gate graph is written, no more
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the export ended before it could be killed"

    manifest = read_manifest(out, verify=True)  # every artifact's hash checked
    assert manifest.fingerprint == before
    assert EdgeRuntime(out, threads=1).manifest.fingerprint == before

    # the next export finishes, replaces the model and clears the killed one's staging folder
    after = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr
    assert read_manifest(out, verify=True).fingerprint != before
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def test_a_second_export_into_the_same_folder_is_refused_and_harms_nothing(tmp_path, capsys):
    """Two exports into one --out at once: the second used to take the first's staging
    folder for one a killed export left, and delete it under it. It is now refused at once,
    naming the first (its pid); the first's staging folder and export are untouched."""
    from splitdet.shared.cli import main
    from splitdet.shared.folder_lock import folder_lock
    from splitdet.training.export import EXPORT_LOCK, ExportError

    out = tmp_path / "model"
    export_model(make_tiny_model(), out, gate_threshold=0.5, default_codec="int8")
    before = read_manifest(out).fingerprint
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, make_tiny_model(seed=1))
    with folder_lock(out, EXPORT_LOCK, "splitdet export", "--out"):  # the first export, busy
        working = out / f"{STAGING_PREFIX}first"
        working.mkdir()
        (working / "edge_gate.onnx").write_bytes(b"half written")
        try:
            export_model(make_tiny_model(seed=1), out, gate_threshold=0.5, default_codec="int8")
        except ExportError as exc:
            assert f"--out {out}: another splitdet export (pid {os.getpid()})" in str(exc)
        else:
            raise AssertionError("the second export was not refused")
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "another splitdet export" in err and "Traceback" not in err
        assert (working / "edge_gate.onnx").read_bytes() == b"half written"
    assert read_manifest(out).fingerprint == before
    # once the first is done, an export goes through (and clears what a killed one left)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert read_manifest(out).fingerprint != before
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
