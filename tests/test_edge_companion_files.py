"""The companion files camera software and Windows write into a hot folder (Thumbs.db,
desktop.ini, sidecar .json/.xml/.txt metadata): `splitdet edge run` takes only images by their
name and leaves these where they are, untouched and unrecorded, logged once each (INFO) and
counted in `splitdet_edge_skipped_files`; --extensions / --any-extension choose otherwise.

Before: every such file was decoded, quarantined as an unreadable image with an "error" row,
and counted in `splitdet_edge_errors_total{kind="quarantine"}`, the unreadable-images alert.

Real files, real SQLite, the real daemon (in-process, or the CLI entry point) with the tiny
exported model; the cloud address is a closed port and nothing is flagged.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.daemon_config import DaemonConfig
from splitdet.edge.file_moves import REASON_SUFFIX
from splitdet.edge.watcher import SKIPPED_GONE_MEMORY, HotFolder, normalize_extensions
from splitdet.shared.cli import main

from support import NOTHING, daemon_config, image_rows

pytestmark = pytest.mark.timeout(120)
CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"
#: What camera software and Windows leave beside the images (name -> bytes).
COMPANIONS = {
    "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 4,  # an OLE file
    "desktop.ini": b"[.ShellClassInfo]\r\nIconResource=C:\\cam.ico,0\r\n",
    "cam_0001.json": b'{"exposure_us": 800, "gain": 2}\n',
    "cam_0001.xml": b"<?xml version='1.0'?><frame id='1'/>\n",
    "cam_0001.txt": b"line 3, part 4411\n",
}


def png(level: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """A small PNG of one grey level."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def snapshot(folder: Path, names) -> dict[str, tuple]:
    """(bytes, inode, mtime in ns) of each named file: a file moved, rewritten or touched
    differs."""
    out = {}
    for name in names:
        stat = (folder / name).stat()
        out[name] = ((folder / name).read_bytes(), stat.st_ino, stat.st_mtime_ns)
    return out


def skipped_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "file_skipped"]


def scrape(port: int) -> dict[str, float]:
    """The daemon's metrics endpoint as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {
        key: float(value)
        for key, _, value in (line.rpartition(" ") for line in lines if not line.startswith("#"))
    }


def run_until_processed(config: DaemonConfig, n: int) -> dict[str, float]:
    """Run the daemon (not in batch mode, its metrics on a free port) until it has handled
    `n` files, and return what its metrics endpoint says then; it exits 0 when stopped."""
    daemon = EdgeDaemon(replace(config, once=False, metrics_port=0, metrics_host="127.0.0.1"))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.processed < n or daemon.metrics_port is None:
            assert thread.is_alive() and time.monotonic() < deadline, "the daemon did not go on"
            time.sleep(0.05)
        time.sleep(0.2)  # a few more scans: nothing else is taken
        return scrape(daemon.metrics_port)
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
        assert status == [0]


def _edge_run(model_dir: Path, watch: Path, db: Path, *options: str) -> int:
    """`splitdet edge run --once` against a closed port, nothing flagged."""
    return main(
        ["edge", "run", "--model", str(model_dir), "--watch", str(watch), "--db", str(db),
         "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--settle", "0",
         "--unreadable-grace", "0", "--threads", "1", "--threshold", str(NOTHING),
         "--log-format", "text", *options]
    )  # fmt: skip


# ------------------------------------------------------------------------------ the watcher


def test_the_watcher_takes_images_by_name_and_tells_of_the_rest_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitdet.edge.watcher")
    images = ["a.png", "B.JPG", "c.Tiff", "d.jpeg", "e.bmp", "f.tif"]
    for k, name in enumerate(images):
        (tmp_path / name).write_bytes(png(10 * k))
    others = [*COMPANIONS, "frame_0001"]  # no extension at all: not taken either
    for name in others:
        (tmp_path / name).write_bytes(COMPANIONS.get(name, b"raw"))
    (tmp_path / ".hidden.png").write_bytes(png(1))  # hidden, in progress: ignored, not told
    (tmp_path / "next.png.part").write_bytes(png(2))
    folder = HotFolder(tmp_path, settle_s=0)
    for _ in range(3):  # a scan every poll: told once, not once per scan
        folder.scan()
    taken = []
    while (candidate := folder.next_candidate()) is not None:
        taken.append(candidate.name)
        folder.ignore(candidate)  # kept in place, as with --after keep
    assert sorted(taken) == sorted(images)
    assert folder.skipped_files() == len(others)
    told = skipped_lines(caplog)
    assert sorted(r.fields["path"] for r in told) == sorted(str(tmp_path / n) for n in others)
    assert {r.levelno for r in told} == {logging.INFO}
    thumbs = next(r.getMessage() for r in told if r.fields["path"].endswith("Thumbs.db"))
    assert "left alone" in thumbs and ".db" in thumbs and "--extensions" in thumbs

    # a sidecar the camera deletes and writes again is not told again; a new name is
    (tmp_path / "cam_0001.json").unlink()
    folder.scan()
    assert folder.skipped_files() == len(others) - 1
    (tmp_path / "cam_0001.json").write_bytes(b"{}")
    (tmp_path / "cam_0002.json").write_bytes(b"{}")
    folder.scan()
    assert folder.skipped_files() == len(others) + 1
    assert [r.fields["path"] for r in skipped_lines(caplog)[len(told) :]] == [
        str(tmp_path / "cam_0002.json")
    ]
    assert folder.next_candidate() is None


def test_what_is_remembered_as_told_is_bounded(tmp_path, caplog):
    """Names told and gone since are remembered up to SKIPPED_GONE_MEMORY (a camera writing a
    sidecar per image under --after delete would otherwise grow the daemon without end); the
    oldest are forgotten first (at DEBUG: a scan names only the first few at INFO)."""
    caplog.set_level(logging.DEBUG, logger="splitdet.edge.watcher")
    n = SKIPPED_GONE_MEMORY + 3
    names = [f"s{k:05d}.json" for k in range(n)]
    folder = HotFolder(tmp_path, settle_s=0)
    for name in names:
        (tmp_path / name).write_bytes(b"{}")
    folder.scan()
    assert len(skipped_lines(caplog)) == n
    for name in names:
        (tmp_path / name).unlink()
    folder.scan()
    assert folder.skipped_files() == 0
    caplog.clear()
    for name in (names[0], names[2], names[3], names[-1]):  # 0..2 forgotten, the rest not
        (tmp_path / name).write_bytes(b"{}")
    folder.scan()
    assert sorted(Path(r.fields["path"]).name for r in skipped_lines(caplog)) == [
        names[0], names[2]
    ]  # fmt: skip


def test_extensions_choose_what_is_taken(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitdet.edge.watcher")
    for name in ("frame.RAW16", "a.png", "b.jpg", "meta.json", "frame_0002"):
        (tmp_path / name).write_bytes(b"x")

    def taken(folder: HotFolder) -> list[str]:
        folder.scan()
        names = []
        while (candidate := folder.next_candidate()) is not None:
            names.append(candidate.name)
            folder.ignore(candidate)
        return sorted(names)

    chosen = HotFolder(tmp_path, settle_s=0, extensions=(".raw16", "PNG"))
    assert chosen.extensions == (".raw16", ".png")
    assert taken(chosen) == ["a.png", "frame.RAW16"]  # only these: the list replaces the default
    assert chosen.skipped_files() == 3
    caplog.clear()
    every = HotFolder(tmp_path, settle_s=0, extensions=None)  # --any-extension
    assert taken(every) == ["a.png", "b.jpg", "frame.RAW16", "frame_0002", "meta.json"]
    assert every.skipped_files() == 0 and not skipped_lines(caplog)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([], "no extension given"),
        (["."], "is not a file extension"),
        (["*.png"], "is not a file extension"),
        (["*"], "--any-extension takes every file"),
        ([".tar.gz"], "is not a file extension"),
        (["sub/x"], "is not a file extension"),
        ([".TMP"], ".tmp names files still being written"),
    ],
)
def test_extensions_that_cannot_be_one_are_refused(given, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        normalize_extensions(given)


# ------------------------------------------------------------------------------ the daemon


@pytest.mark.parametrize("after", ["keep", "archive", "delete"])
def test_the_daemon_leaves_companion_files_alone(tiny_model_dir, tmp_path, caplog, after):
    """Before: each companion file got an "error" row, was moved into the quarantine with a
    NAME.reason.txt ("not an image file") and counted as an unreadable image."""
    caplog.set_level(logging.INFO, logger="splitdet.edge")
    config = daemon_config(tiny_model_dir, tmp_path, after=after)
    watch = config.watch
    (watch / "good.png").write_bytes(png(60))
    (watch / "broken.png").write_bytes(CORRUPT)  # an image by its name: still quarantined
    for name, data in COMPANIONS.items():
        (watch / name).write_bytes(data)
    before = snapshot(watch, COMPANIONS)

    metrics = run_until_processed(config, 2)
    table = {Path(r["path"]).name: r for r in image_rows(config.db)}
    assert sorted(table) == ["broken.png", "good.png"]  # no row for a companion file
    assert table["good.png"]["verdict"] == "ok"
    assert table["broken.png"]["error_kind"] == "quarantine"
    assert snapshot(watch, COMPANIONS) == before  # not moved, rewritten, deleted or touched
    quarantined = sorted(p.name for p in config.quarantine.iterdir())
    stored = f"{table['broken.png']['id']:08d}_broken.png"
    assert quarantined == [stored, stored + REASON_SUFFIX]
    left = sorted(p.name for p in watch.iterdir() if p.is_file())
    assert left == sorted([*COMPANIONS, *(["good.png"] if after == "keep" else [])])
    if after == "archive":
        assert [p.name for p in config.archive.iterdir()] == [
            f"{table['good.png']['id']:08d}_good.png"
        ]
    assert metrics["splitdet_edge_skipped_files"] == len(COMPANIONS)
    assert metrics['splitdet_edge_errors_total{kind="quarantine"}'] == 1  # broken.png only
    assert metrics['splitdet_edge_images_total{verdict="error"}'] == 1
    told = skipped_lines(caplog)
    assert sorted(Path(r.fields["path"]).name for r in told) == sorted(COMPANIONS)

    # a restart (with a prune of every final result) finds nothing new and touches nothing;
    # under --after keep the result of the image still in --watch is kept
    assert EdgeDaemon(daemon_config(tiny_model_dir, tmp_path, after=after,
                                  keep_results_s=0.0)).run() == 0  # fmt: skip
    assert snapshot(watch, COMPANIONS) == before
    assert sorted(p.name for p in config.quarantine.iterdir()) == quarantined
    assert [Path(r["path"]).name for r in image_rows(config.db)] == (["good.png"] if after == "keep"
                                                               else [])  # fmt: skip


def test_recursive_leaves_sidecars_in_subfolders_and_never_reads_its_own_folders(
    tiny_model_dir, tmp_path, caplog
):
    """--recursive with the quarantine and archive inside --watch: a subfolder's sidecar is
    left alone, and the daemon's own reason files are neither taken nor told of."""
    caplog.set_level(logging.INFO, logger="splitdet.edge")
    config = daemon_config(tiny_model_dir, tmp_path, after="archive", recursive=True)
    watch = config.watch
    day = watch / "2026-12-04"
    day.mkdir()
    (day / "a.png").write_bytes(png(70))
    (day / "a.json").write_bytes(b"{}")
    (day / "bad.tif").write_bytes(b"not a tiff at all")
    (watch / "Thumbs.db").write_bytes(COMPANIONS["Thumbs.db"])
    assert EdgeDaemon(config).run() == 0
    assert EdgeDaemon(config).run() == 0  # the quarantine's .reason.txt is not read back
    table = {Path(r["path"]).relative_to(watch).as_posix(): r for r in image_rows(config.db)}
    assert sorted(table) == ["2026-12-04/a.png", "2026-12-04/bad.tif"]
    assert (day / "a.json").read_bytes() == b"{}" and (watch / "Thumbs.db").is_file()
    assert any(p.name.endswith(REASON_SUFFIX) for p in config.quarantine.iterdir())
    told = sorted({r.fields["path"] for r in skipped_lines(caplog)})
    assert told == [str(day / "a.json"), str(watch / "Thumbs.db")]


# ------------------------------------------------------------------------------ the options


def test_extensions_takes_a_camera_s_own_extension(tiny_model_dir, tmp_path):
    """A camera writing its images as .raw16 (here PNG bytes): --extensions .raw16,.PNG takes
    them and the PNGs, and leaves the rest alone; --any-extension takes every file, as before
    (a companion file is then quarantined)."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    (watch / "frame_0001.raw16").write_bytes(png(30))
    (watch / "a.png").write_bytes(png(40))
    (watch / "b.jpg").write_bytes(jpeg(50))
    (watch / "frame_0001.json").write_bytes(b"{}")
    assert _edge_run(tiny_model_dir, watch, db, "--extensions", ".raw16, .PNG") == 0
    assert sorted(Path(r["path"]).name for r in image_rows(db)) == ["a.png", "frame_0001.raw16"]
    assert {r["verdict"] for r in image_rows(db)} == {"ok"}

    assert _edge_run(tiny_model_dir, watch, db, "--any-extension") == 0
    table = {Path(r["path"]).name: r for r in image_rows(db)}
    assert sorted(table) == ["a.png", "b.jpg", "frame_0001.json", "frame_0001.raw16"]
    assert table["frame_0001.json"]["error_kind"] == "quarantine"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--extensions", ""], "--extensions '': no extension given"),
        (["--extensions", ",,"], "--extensions ',,': no extension given"),
        (["--extensions", "*.png"], "'*.png' is not a file extension"),
        (["--extensions", ".png,*"], "--any-extension takes every file"),
        (["--extensions", ".png,.part"], ".part names files still being written"),
        (["--extensions", "raw/16"], "'raw/16' is not a file extension"),
    ],
)
def test_extensions_that_cannot_work_are_one_line_at_start(
    tiny_model_dir, tmp_path, capsys, options, needle
):
    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "a.png").write_bytes(png(40))
    db = tmp_path / "edge.sqlite"
    assert _edge_run(tiny_model_dir, watch, db, *options) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if "splitdet edge: error:" in line]
    assert needle in line, err
    assert not db.exists() and os.listdir(watch) == ["a.png"]  # found before anything started


def test_extensions_and_any_extension_exclude_each_other(tiny_model_dir, tmp_path, capsys):
    watch = tmp_path / "hot"
    watch.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _edge_run(tiny_model_dir, watch, tmp_path / "edge.sqlite", "--extensions", ".png",
                  "--any-extension")  # fmt: skip
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
