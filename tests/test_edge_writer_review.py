"""A user-role review of the edge daemon's writer, with real daemons, stores and images.

1. One daemon per database also through a hard link: before, `edge run --db hl/b.sqlite` beside
   a daemon on `hl/a.sqlite` (the same file) started, two WAL files appeared and the second
   daemon's results were lost. Now it is refused at start naming the running daemon's pid, and
   `edge status` through either name sees that daemon.
2. A daemon refused for its --watch leaves no lock file for the --db it never used.
3. A full outbox that stops intake is said by `edge status` (text and --json: the caps, since
   when) and by the gauge splitdet_edge_outbox_full; the log event is `outbox_full`.
4. `edge abandon` refuses the export the running daemon sends with, unless --even-if-running.
5. A retention under a minute (`--keep-results`, `prune --older-than`) is refused.
6. Wording: a lock file that cannot be opened, an empty outbox, a small store's free pages, a
   newline in a name in the results table, a removed hot folder, a row prune kept for its file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store import OutboxCap, ResultStore
from splitdet.edge.store_file import StoreError, WriterLock
from splitdet.edge.watcher import HotFolder
from splitdet.shared.cli import main

from support import daemon_config, image_rows, running, wait_for

pytestmark = pytest.mark.timeout(120)


def png(level: int) -> bytes:
    """A small PNG of one grey level (distinct levels: distinct files and request ids)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def edge_run(model: Path, watch: Path, db: Path, *extra: object) -> list[str]:
    """The `edge run` arguments of a daemon flagging nothing, its cloud a closed port."""
    return ["edge", "run", "--model", str(model), "--watch", str(watch), "--db", str(db),
            "--cloud", "127.0.0.1:9", "--settle", "0", "--poll", "0.05", "--threads", "1",
            "--threshold", "2", "--log-format", "text", *map(str, extra)]  # fmt: skip


def start_daemon(argv: list[str], ready: Path) -> subprocess.Popen:
    """`splitdet ARGV --ready-file READY` in a process, once it is ready (its --watch made)."""
    Path(argv[argv.index("--watch") + 1]).mkdir(exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "splitdet.shared.cli", *argv, "--ready-file", str(ready)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: ready.exists() or process.poll() is not None, 60, "the daemon")
    assert process.poll() is None, process.stderr.read()
    return process


def test_a_second_daemon_on_a_hard_link_of_the_database_is_refused(
    tiny_model_dir, tmp_path, capsys
):
    folder = tmp_path / "hl"
    folder.mkdir()
    a, b = folder / "a.sqlite", folder / "b.sqlite"
    ResultStore(a).close()
    os.link(a, b)
    first = start_daemon(
        edge_run(tiny_model_dir, tmp_path / "hotH1", a, "--quarantine", tmp_path / "q1"),
        tmp_path / "first.ready",
    )
    try:
        second_watch = tmp_path / "hotH2"
        second_watch.mkdir()
        (second_watch / "x.png").write_bytes(png(30))
        capsys.readouterr()
        assert cli(*edge_run(tiny_model_dir, second_watch, b, "--once")) == 2
        err = capsys.readouterr().err
        assert f"--db {b} is in use by another `splitdet edge run` (pid {first.pid}" in err, err
        assert "hard link" in err and "Traceback" not in err
        assert (second_watch / "x.png").exists()
        wal = Path(f"{b}-wal")  # (a reader's, empty, at most: nothing was written through b)
        assert not wal.exists() or wal.stat().st_size == 0
        for name in (a, b):  # the readers still work, and see the daemon through either name
            assert cli("edge", "status", "--db", name) == 0
            assert f"running on this --db (pid {first.pid})" in capsys.readouterr().out
    finally:
        first.kill()
        first.wait()
    assert cli(*edge_run(tiny_model_dir, second_watch, b, "--once")) == 0  # (lock gone)
    assert [Path(r["path"]).name for r in image_rows(a)] == ["x.png"]  # (one file, two names)


def test_a_daemon_refused_for_its_hot_folder_leaves_nothing_for_its_database(
    tiny_model_dir, tmp_path, capsys
):
    watch = tmp_path / "hot"
    first = start_daemon(
        edge_run(tiny_model_dir, watch, tmp_path / "edge.sqlite"), tmp_path / "first.ready"
    )
    try:
        other = tmp_path / "other.sqlite"
        assert cli(*edge_run(tiny_model_dir, watch, other, "--once")) == 2
        assert f"--watch {watch} is in use" in capsys.readouterr().err
        assert not Path(f"{other}.lock").exists() and not other.exists()
    finally:
        first.kill()
        first.wait()


# ------------------------------------------- 3. a full outbox said by status; 2. abandon guard


@pytest.fixture
def stalled(tiny_model_dir, tmp_path):
    """A running daemon flagging every image, its cloud down, its outbox capped at 2 requests:
    the third image waits in --watch (intake stopped)."""
    config = daemon_config(
        tiny_model_dir, tmp_path, once=False, threshold=0.0, outbox=OutboxCap(max_items=2),
        retry_initial_s=60, retry_max_s=60,
    )  # fmt: skip
    for level in (10, 20, 30, 40):
        (config.watch / f"{level}.png").write_bytes(png(level))
    daemon = EdgeDaemon(config)
    with running(daemon):
        wait_for(lambda: daemon.metrics.outbox_full_waits._value.get() == 1, 60, "the stall")
        yield daemon


def test_status_and_metrics_say_the_outbox_is_full_and_intake_stopped(stalled, capsys, caplog):
    """Before: only the log event "outbox full, waiting" and a counter said so; status was
    silent about the cap, the stall and the images waiting in --watch."""
    db = stalled.config.db
    capsys.readouterr()

    def stall_in_status() -> dict | None:
        assert cli("edge", "status", "--db", db, "--json") == 0
        daemon = json.loads(capsys.readouterr().out)["daemon"]
        return daemon if daemon.get("outbox_full_since") else None

    daemon = wait_for(stall_in_status, 10, "the stall in `edge status --json`")
    assert daemon["outbox_caps"]["requests"] == 2
    assert cli("edge", "status", "--db", db) == 0
    text = capsys.readouterr().out
    assert "outbox full: 2 of 2 requests" in text and "intake stopped since" in text, text
    assert "images wait in --watch" in text
    assert daemon["export"] == stalled.fingerprint
    metrics = generate_latest(stalled.metrics.registry).decode()
    assert "splitdet_edge_outbox_full 1.0" in metrics
    assert 'splitdet_edge_outbox_cap{unit="requests"} 2.0' in metrics

    def events() -> list[str]:  # (logged by the fixture's daemon, just after the counter rose)
        return [r.getMessage() for phase in ("setup", "call") for r in caplog.get_records(phase)]

    wait_for(lambda: "outbox_full" in events(), 10, "the outbox_full event")
    assert "outbox full, waiting" not in events()


def test_abandon_refuses_the_export_the_running_daemon_sends_with(stalled, capsys):
    """Before: exit 0, the daemon's waiting real defects made dead letters while it went on
    sending with that export."""
    db, fingerprint = stalled.config.db, stalled.fingerprint
    capsys.readouterr()
    assert cli("edge", "abandon", "--db", db, "--fingerprint", fingerprint[:12]) == 2
    err = capsys.readouterr().err
    assert f"export {fingerprint[:16]} is the one the `splitdet edge run` running on" in err
    assert f"pid {os.getpid()}" in err and "--even-if-running" in err, err
    assert stalled.store.outbox_stats().depth == 2  # nothing changed
    assert cli("edge", "abandon", "--db", db, "--fingerprint", fingerprint[:12],
               "--even-if-running") == 0  # fmt: skip
    assert "made 2 request(s)" in capsys.readouterr().out


# ------------------------------------------------------------- 5. a retention under a minute


@pytest.mark.parametrize("age", ["0s", "30s", "0.5m"])
def test_a_retention_under_a_minute_is_refused(tiny_model_dir, tmp_path, capsys, age):
    """Before: `edge prune --older-than 0s` and `edge run --keep-results 0s` deleted every
    final result, rows written seconds ago too."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    (watch / "a.png").write_bytes(png(30))
    assert cli(*edge_run(tiny_model_dir, watch, db, "--once", "--after", "keep")) == 0
    for argv in (["edge", "prune", "--db", db, "--older-than", age],
                 edge_run(tiny_model_dir, watch, db, "--once", "--keep-results", age)):  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exits:
            cli(*argv)
        assert exits.value.code == 2
        err = capsys.readouterr().err
        assert "would delete the results written moments ago" in err and "1m or more" in err
        assert len(image_rows(db)) == 1


# ------------------------------------------------------------------------------ 6. wording


def test_a_lock_file_that_exists_but_cannot_be_opened_is_not_said_to_be_created(tmp_path):
    """Before: "cannot create its lock file" though it was there (a read-only folder)."""
    db = tmp_path / "edge.sqlite"
    Path(f"{db}.lock").mkdir()  # (there, and opening it fails)
    with pytest.raises(StoreError) as refused:
        WriterLock(db)
    assert f"cannot open its lock file {db}.lock (Is a directory)" in str(refused.value)


def test_status_of_an_empty_outbox_and_a_small_store_reads_plainly(tmp_path, capsys):
    """Before: "oldest - old, next try in -", and free pages said to be "given back after a
    prune" on a store where they are deliberately kept below 64 MB."""
    db = tmp_path / "edge.sqlite"
    ResultStore(db).close()
    assert cli("edge", "status", "--db", db) == 0
    text = capsys.readouterr().out
    assert "outbox        0 requests (empty)\n" in text and "oldest -" not in text, text
    assert "free pages, reused for new results (given back to the file system after a " in text


def test_the_results_table_escapes_a_newline_in_a_file_name(tiny_model_dir, tmp_path, capsys):
    """Before: the name printed raw broke the row in two; JSON and CSV keep it as it is."""
    config = daemon_config(tiny_model_dir, tmp_path, after="keep")
    (config.watch / "a\nb.png").write_bytes(png(30))
    assert EdgeDaemon(config).run() == 0
    capsys.readouterr()
    assert cli("edge", "results", "--db", config.db) == 0
    _header, row = capsys.readouterr().out.splitlines()
    assert row.endswith("a\\nb.png") and " ok " in row
    assert cli("edge", "results", "--db", config.db, "--json") == 0
    assert '/a\\nb.png"' in capsys.readouterr().out  # (JSON's own escape: as it was)


def test_a_removed_hot_folder_is_not_told_as_one_of_its_files(tmp_path, caplog):
    """Before: "cannot read the hot folder ...: skipped ...; the other files go on"."""
    watch = tmp_path / "hot"
    watch.mkdir()
    folder = HotFolder(watch, 0.0, 0.0)
    watch.rmdir()
    with caplog.at_level(logging.WARNING):
        folder.scan()
    [line] = [m for m in caplog.messages if m.startswith("cannot read")]
    assert line.startswith(f"cannot read the hot folder {watch} (")
    assert "no image is taken until it can be listed again" in line
    assert "the other files" not in line


def test_prune_says_why_it_kept_a_result_whose_image_is_still_in_the_hot_folder(
    tiny_model_dir, tmp_path, capsys
):
    """Before: "deleted 0 result(s)" and nothing more, the old row kept without a word."""
    config = daemon_config(tiny_model_dir, tmp_path, after="keep")
    (config.watch / "a.png").write_bytes(png(30))
    assert EdgeDaemon(config).run() == 0
    # the row made final two hours ago, in an earlier boot (no boot-clock guard keeps it)
    with contextlib.closing(sqlite3.connect(config.db)) as db, db:
        db.execute("UPDATE images SET finished = finished - 7200, finished_boot = NULL")
    capsys.readouterr()
    assert cli("edge", "prune", "--db", config.db, "--older-than", "1h") == 0
    out = capsys.readouterr().out
    assert "deleted 0 result(s)" in out
    assert "kept 1 result(s) older than --older-than whose image still lies where it arrived" in out
    assert len(image_rows(config.db)) == 1


def test_a_daemon_stopping_before_its_store_opened_leaves_no_empty_database(tmp_path, capsys):
    """The writer lock makes a missing --db (empty) to flock it before SQLite writes; a start
    that fails before the store opens (here a --model that is no export) removes it again."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    assert cli(*edge_run(tmp_path / "no-model", watch, db, "--once")) == 2
    assert "manifest.json" in capsys.readouterr().err and not db.exists()
