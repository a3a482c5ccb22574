"""`splitdet predict` after a review: where --save and --json may write, files that must not be
read whole (or at all), Ctrl-C, what a folder scan skips, inputs named twice, --timeout alone.

Real files, a real exported model and real ONNX sessions; a real SIGINT to a real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import main

from support import run_until, run_without_torch


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of two small random images, a.png and b.png."""
    folder = tmp_path_factory.mktemp("review_images")
    rng = np.random.default_rng(1)
    for name, (h, w) in (("a.png", (200, 260)), ("b.png", (240, 240))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def copy_images(source: Path, folder: Path, *names: str) -> Path:
    """`folder` (made) holding copies of `source`'s images under `names` (default: all)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or [p.name for p in source.iterdir()]:
        (folder / name).write_bytes((source / name).read_bytes())
    return folder


def predict(model: Path, *argv: str) -> int:
    """`splitdet predict ARGV --model MODEL --no-progress`, in this process; its exit status."""
    return main(["predict", *argv, "--model", str(model), "--no-progress"])


# 1. --save beside an input file -------------------------------------------------------------


@pytest.mark.parametrize("where", ["relative", "absolute", "camera folder"])
def test_save_in_a_folder_below_an_input_files_folder_is_taken(
    tiny_model_dir, images, tmp_path, monkeypatch, where
):
    """`predict top.jpg --save ann` was refused ("--save ann is in the input top.jpg"): the
    copies go to ann/top.jpg, which cannot be top.jpg."""
    monkeypatch.chdir(tmp_path)
    if where == "camera folder":
        copy_images(images, tmp_path / "cam", "a.png")
        given, save = "cam/a.png", "cam/results"
    else:
        copy_images(images, tmp_path, "a.png")
        given, save = "a.png", "ann" if where == "relative" else str(tmp_path / "out" / "ann")
    original = Path(given).read_bytes()
    assert predict(tiny_model_dir, given, "--gate", "off", "--save", save) == 0
    assert (Path(save) / "a.jpg").is_file()
    assert Path(given).read_bytes() == original


def test_save_in_an_input_files_own_folder_is_refused_and_makes_nothing(
    tiny_model_dir, images, tmp_path, monkeypatch, capsys
):
    """The only place a copy of a.png can overwrite an input file is a.png's own folder; a
    refused run leaves no --save folder behind (it made an empty one)."""
    monkeypatch.chdir(tmp_path)
    copy_images(images, tmp_path / "cam", "a.png")
    assert predict(tiny_model_dir, "cam/a.png", "--gate", "off", "--save", "cam") == 2
    assert "--save cam is in the input cam/a.png" in capsys.readouterr().err
    # an input folder scanned with --recursive: no folder at any depth inside it
    code = predict(tiny_model_dir, "cam", "-r", "--gate", "off", "--save", "cam/new/annotated")
    assert code == 2
    err = capsys.readouterr().err
    assert "--save cam/new/annotated is in the input cam" in err and "Traceback" not in err
    assert not (tmp_path / "cam" / "new").exists()


def test_a_missing_input_beside_save_is_one_error(tiny_model_dir, images, tmp_path, monkeypatch):
    """`predict a.png nonexist.png --save ann2` was refused as a whole ("--save ann2 is in the
    input nonexist.png"); a missing file is an error of its own."""
    monkeypatch.chdir(tmp_path)
    copy_images(images, tmp_path, "a.png")
    code = predict(
        tiny_model_dir, "a.png", "nonexist.png", "--gate", "off", "--save", "ann2",
        "--json", "out.json",
    )  # fmt: skip
    assert code == 1
    records = {r["path"]: r for r in json.loads(Path("out.json").read_text())}
    assert records["nonexist.png"]["verdict"] == "error"
    assert "nonexist.png: cannot read" in records["nonexist.png"]["error"]
    assert records["a.png"]["verdict"] == "defect" and Path("ann2/a.jpg").is_file()


# 2. files not read whole, or at all ----------------------------------------------------------


def test_oversized_fifo_and_device_inputs_are_errors_and_the_others_go_on(
    tiny_model_dir, images, tmp_path
):
    """A 3 GiB file was read whole before its size was checked, /dev/zero read until memory ran
    out, and a FIFO opened for reading hung the run for good; each is now one error line, and
    the image after them is processed, in a process limited to 3 GiB of address space."""
    big = tmp_path / "big.jpg"
    with big.open("wb") as file:
        file.truncate(3 * 2**30)  # sparse: no disk used
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    good = copy_images(images, tmp_path / "good", "a.png") / "a.png"
    argv = [str(big), "/dev/zero", str(fifo), str(good)]
    result = run_without_torch(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from splitdet.shared.cli import main
        status = main(["predict", *{argv!r}, "--model", {str(tiny_model_dir)!r},
                       "--threshold", "2", "--json", "-", "--no-progress"])
        peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
        print("peak_kib", peak, file=sys.stderr)  # (ru_maxrss keeps the forking parent's)
        sys.exit(status)
        """
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = {r["path"]: r for r in json.loads(result.stdout)}
    assert records[str(big)]["error"] == f"{big} is 3.0 GiB, over the 256 MiB limit"
    assert "/dev/zero: not a regular file (a character device)" in records["/dev/zero"]["error"]
    assert f"{fifo}: not a regular file (a FIFO)" in records[str(fifo)]["error"]
    assert all(records[p]["verdict"] == "error" for p in argv[:3])
    assert records[str(good)]["verdict"] == "ok" and records[str(good)]["error"] is None
    peak_kib = int(result.stderr.split("peak_kib ")[1].split()[0])
    assert peak_kib < 1024 * 1024, peak_kib  # nothing of the 3 GiB was loaded


# 3. --json over an input ---------------------------------------------------------------------


def test_json_never_overwrites_an_input_or_an_image(tiny_model_dir, images, tmp_path, capsys):
    """`predict jx --json jx/a.png` replaced the image with the results (exit 0)."""
    folder = copy_images(images, tmp_path / "jx")
    other = copy_images(images, tmp_path / "elsewhere", "b.png") / "b.png"
    os.link(folder / "b.png", tmp_path / "hardlink.json")  # the same file by another name
    original = {p: p.read_bytes() for p in (folder / "a.png", folder / "b.png", other)}
    for target, needle in (
        (folder / "a.png", f"--json {folder / 'a.png'} is the input image"),
        (tmp_path / "hardlink.json", "is the input image"),
        (other, f"--json {other} is an image file"),
    ):
        assert predict(tiny_model_dir, str(folder), "--json", str(target)) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert "images:" not in err  # refused before any image was processed
    assert all(p.read_bytes() == data for p, data in original.items())
    # results beside the images are fine (the next scan leaves a .json out)
    assert predict(tiny_model_dir, str(folder), "--json", str(folder / "results.json")) == 0
    assert len(json.loads((folder / "results.json").read_text())) == 2


# 4. Ctrl-C -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "status", "line"),
    [(signal.SIGINT, 130, "splitdet predict: interrupted"),
     (signal.SIGTERM, 143, "splitdet predict: stopped on SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)  # fmt: skip
def test_ctrl_c_writes_the_records_finished_so_far(tiny_model_dir, images, tmp_path, sent,
                                                   status, line):  # fmt: skip
    """SIGINT mid-run wrote no JSON at all, though annotated copies of the finished images were
    there; now the finished records are written, each saying run_complete false, exit 130.
    SIGTERM (a scheduler's, a container's stop) likewise, exit 143: it ended the process at
    once, no JSON, no line (an interruption review)."""
    folder = tmp_path / "many"
    folder.mkdir()
    source = images / "a.png"
    for index in range(400):
        os.link(source, folder / f"img{index:03d}.png")
    out, saved = tmp_path / "out.json", tmp_path / "annotated"
    code = f"""
        import sys
        from splitdet.shared.cli import main
        sys.exit(main(["predict", {str(folder)!r}, "--model", {str(tiny_model_dir)!r},
                       "--gate", "off", "--save", {str(saved)!r}, "--json", {str(out)!r},
                       "--no-progress"]))
        """
    code, stdout, stderr = run_until(
        [sys.executable, "-c", textwrap.dedent(code)],
        # 4 copies whole (not their hidden temporary files): 3 records at least, the 4th image's
        # record perhaps not yet made when SIGINT lands
        lambda: saved.is_dir() and len(list(saved.glob("[!.]*.jpg"))) >= 4,
        "annotated image",
        lambda process: process.send_signal(sent),
    )
    assert code == status, stderr
    assert line in stderr and "Traceback" not in stderr
    assert ("interrupted" if sent == signal.SIGINT else "stopped") + " after" in stdout
    records = json.loads(out.read_text())
    assert 3 <= len(records) < 400
    assert all(r["run_complete"] is False for r in records)
    assert all(r["verdict"] == "defect" and Path(r["annotated"]).is_file() for r in records)
    # the copy of the image being processed at SIGINT may be written, its record not
    assert len(list(saved.iterdir())) - len(records) in (0, 1)


# 6. what a folder scan skips -----------------------------------------------------------------


def test_a_folder_scan_names_every_kind_of_entry_it_skips(tiny_model_dir, images, tmp_path, caplog):
    """A symbolic link to a folder, a dangling link, a FIFO and hidden files were skipped
    without a word (a .txt got an INFO line), subfolders without a hint to use -r."""
    folder = copy_images(images, tmp_path / "scan", "a.png")
    copy_images(images, folder / "sub", "b.png")
    (folder / ".hidden.png").write_bytes((images / "b.png").read_bytes())
    (folder / "linked").symlink_to(images, target_is_directory=True)
    (folder / "dead.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(folder / "fifo.png")
    (folder / "notes.txt").write_text("not an image\n")
    caplog.set_level("INFO", logger="splitdet.edge.cli_predict")
    out = tmp_path / "out.json"
    assert predict(tiny_model_dir, str(folder), "--json", str(out)) == 0
    lines = [r.getMessage() for r in caplog.records]
    skipped = next(line for line in lines if line.startswith("folder scan skipped hidden"))
    for needle in (
        f"hidden, named .*: 1 ({folder / '.hidden.png'})",
        f"symbolic links to folders, not followed: 1 ({folder / 'linked'})",
        f"dangling symbolic links: 1 ({folder / 'dead.png'})",
        f"FIFOs, devices or sockets: 1 ({folder / 'fifo.png'})",
    ):
        assert needle in skipped, skipped
    assert any(
        f"1 subfolder(s) ({folder / 'sub'}): --recursive takes their images too" in line
        for line in lines
    ), lines
    assert any("left out 1 file(s)" in line and "notes.txt" in line for line in lines)
    assert [Path(r["path"]).name for r in json.loads(out.read_text())] == ["a.png"]

    caplog.clear()  # with -r: the subfolder is taken, the link to a folder still not followed
    assert predict(tiny_model_dir, str(folder), "-r", "--json", str(out)) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert not any("subfolder(s)" in line for line in lines)
    assert any("symbolic links to folders, not followed: 1" in line for line in lines)
    found = sorted(
        Path(r["path"]).relative_to(folder).as_posix() for r in json.loads(out.read_text())
    )
    assert found == ["a.png", "sub/b.png"]


# 7. inputs named twice -----------------------------------------------------------------------


def test_each_file_is_processed_once_however_often_it_is_named(
    tiny_model_dir, images, tmp_path, monkeypatch, caplog
):
    """`predict imgs imgs/a.png ./imgs/a.png` processed a.png three times (three annotated
    copies, a_2.jpg and a_3.jpg); a symbolic link to it is the same file too."""
    monkeypatch.chdir(tmp_path)
    copy_images(images, tmp_path / "imgs")
    (tmp_path / "link.png").symlink_to(tmp_path / "imgs" / "a.png")
    caplog.set_level("INFO", logger="splitdet.edge.cli_predict")
    code = predict(
        tiny_model_dir, "imgs", "imgs/a.png", "./imgs/a.png", "link.png", "--gate", "off",
        "--save", "s", "--json", "out.json",
    )  # fmt: skip
    assert code == 0
    records = json.loads(Path("out.json").read_text())
    assert [r["path"] for r in records] == ["imgs/a.png", "imgs/b.png"]
    assert all(r["run_complete"] is True for r in records)  # a run that ran to its end
    assert sorted(p.name for p in Path("s").iterdir()) == ["a.jpg", "b.jpg"]
    assert any("skipped 3 duplicate input(s)" in r.getMessage() for r in caplog.records)


# 8. --timeout without --cloud ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5", "nan", "30"])
def test_timeout_without_cloud_is_refused_whatever_its_value(tiny_model_dir, images, capsys, value):
    """`--timeout 0` was taken without --cloud (0 read as not given), -5 and nan refused."""
    assert predict(tiny_model_dir, str(images), "--timeout", value) == 2
    err = capsys.readouterr().err
    assert "--timeout: for --cloud only" in err and "Traceback" not in err


def test_save_never_writes_through_a_link_onto_an_input(tiny_model_dir, images, tmp_path, capsys):
    """The folder rule missed links: an annotated copy's name in --save that is a link to an
    input (review/a.jpg -> inp/a.jpg), or an input found by a folder scan that is a link into
    --save (A/x.jpg -> B/x.jpg, --save B), had the copy written over the input image."""
    inp = copy_images(images, tmp_path / "inp", "a.png")
    (inp / "a.jpg").write_bytes((inp / "a.png").read_bytes())
    review = tmp_path / "review"
    review.mkdir()
    (review / "a.jpg").symlink_to(inp / "a.jpg")
    before = (inp / "a.jpg").read_bytes()
    assert predict(tiny_model_dir, str(inp / "a.jpg"), "--save", str(review), "--gate", "off") == 2
    err = capsys.readouterr().err
    assert f"its annotated copy {review / 'a.jpg'} would be written over the input" in err, err
    a_folder, b_folder = tmp_path / "A", copy_images(images, tmp_path / "B", "b.png")
    (b_folder / "x.jpg").write_bytes((b_folder / "b.png").read_bytes())
    a_folder.mkdir()
    (a_folder / "x.jpg").symlink_to(b_folder / "x.jpg")
    x_before = (b_folder / "x.jpg").read_bytes()
    assert predict(tiny_model_dir, str(a_folder), "--save", str(b_folder), "--gate", "off") == 2
    assert "would be written over the input image" in capsys.readouterr().err
    assert (inp / "a.jpg").read_bytes() == before
    assert (b_folder / "x.jpg").read_bytes() == x_before
    # a hard link cannot reach the input's bytes, but the name is a file predict did not
    # write: left alone too (tests/test_predict_save_review.py)
    (review / "a.jpg").unlink()
    os.link(inp / "a.jpg", review / "a.jpg")
    assert predict(tiny_model_dir, str(inp / "a.jpg"), "--save", str(review), "--gate", "off") == 2
    assert "is a file that is not an annotated copy from predict" in capsys.readouterr().err
    assert (inp / "a.jpg").read_bytes() == before
    assert (review / "a.jpg").read_bytes() == before


class _SwitchableProxy:
    """A TCP proxy on loopback to `target_port` that can be switched off (every open
    connection closed, new ones closed as soon as accepted: the cloud is down or restarting)
    and on again."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list = []
        self.down = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def switch_off(self) -> None:
        self.down.set()
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        import socket
        import threading

        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                if self.down.is_set():
                    near.close()
                    continue
                far = socket.create_connection(("127.0.0.1", self.target_port))
                self.open += [near, far]
                for source, sink in ((near, far), (far, near)):
                    threading.Thread(target=self._pass, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pass(source, sink) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.close()

    def close(self) -> None:
        self.switch_off()
        self.listener.close()


def _predict_while_the_link_fails(
    tmp_path: Path, images: Path, count: int, timeout: float, fail
) -> tuple[int, str, list[dict]]:
    """`splitdet predict` (a process) of `count` images through a `_SwitchableProxy` to a
    cloud on loopback, `--gate off --timeout TIMEOUT`; once the first annotated copy is
    written, `fail(proxy)`. (exit status, stderr, the JSON records)."""
    from cloud_fixtures import start_loopback_server

    server = start_loopback_server(tmp_path)
    proxy = _SwitchableProxy(server.port)
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(count):
        (folder / f"i{k}.png").write_bytes((images / ("a.png" if k % 2 else "b.png")).read_bytes())
    saved, out = tmp_path / "saved", tmp_path / "out.json"
    argv = [sys.executable, "-m", "splitdet.shared.cli", "predict", str(folder), "--model",
            str(server.config.model_dir), "--cloud", f"127.0.0.1:{proxy.port}", "--gate",
            "off", "--save", str(saved), "--json", str(out), "--no-progress", "--timeout",
            f"{timeout:g}"]  # fmt: skip
    try:
        code, _, stderr = run_until(
            argv, lambda: saved.is_dir() and any(saved.iterdir()), "first answer",
            lambda process: fail(proxy),
        )  # fmt: skip
    finally:
        proxy.close()
        server.stop(0)
    return code, stderr, json.loads(out.read_text())


def test_a_cloud_that_restarts_mid_run_costs_time_not_results(tmp_path, images):
    """A cloud killed and started again mid-run failed every image sent meanwhile at once
    ("UNAVAILABLE"), --timeout never used to wait for it. Now a call the cloud may answer
    later is sent again within --timeout: every image gets its boxes."""

    def restart(proxy: _SwitchableProxy) -> None:
        proxy.switch_off()
        time.sleep(2.0)  # (the cloud "restarting": calls meanwhile fail UNAVAILABLE)
        proxy.down.clear()

    code, stderr, records = _predict_while_the_link_fails(tmp_path, images, 8, 30, restart)
    assert code == 0, stderr
    assert [r["verdict"] for r in records] == ["defect"] * 8, [r.get("error") for r in records]
    assert "the cloud did not answer" in stderr and "trying again for up to" in stderr, stderr
    # the images that waited say so: the part of their round trip spent retrying
    waited = [r["timings"] for r in records if "cloud_retry_wait" in r["timings"]]
    assert waited and all(0 < w["cloud_retry_wait"] <= w["round_trip"] for w in waited)
    assert "cloud_retry_wait" not in records[0]["timings"]  # (answered at the first try)


def test_a_cloud_gone_for_good_costs_one_image_its_timeout_not_every_image(tmp_path, images):
    """With retries, a cloud lost for good mid-run made every later flagged image wait its
    whole --timeout. Now the first image that spends its timeout marks the cloud gone: the
    next get one try each (no retries) until one is answered."""
    code, stderr, records = _predict_while_the_link_fails(
        tmp_path, images, 6, 3, _SwitchableProxy.switch_off
    )
    assert code == 1, stderr
    verdicts = [r["verdict"] for r in records]
    assert verdicts[0] == "defect" and verdicts.count("error") >= 4, verdicts
    assert stderr.count("trying again for up to") == 1, stderr  # (one image retried)


def test_the_summary_counts_the_defects_that_hold_no_box():
    """With --gate off every image is a defect by verdict: the summary said "15 defect (7
    boxes)", as if 15 images held scratches. It says how many of them hold none."""
    from splitdet.edge.cli_predict import summary
    from splitdet.edge.predict import Prediction

    found = Prediction("a.png", "defect", 0.9, boxes=[[1.0, 2.0, 3.0, 4.0]] * 2, bytes_sent=10**6)
    nothing = Prediction("b.png", "defect", 0.1, bytes_sent=10**6)
    line = summary([found, nothing, Prediction("c.png", "ok", 0.05)], 3)  # (in-process)
    assert line == "3 images: 1 ok, 2 defect (2 boxes; 1 with no box), 0 errors; " \
        "2.00 MB of features would be sent"  # fmt: skip
    assert "with no box" not in summary([found], 1)
