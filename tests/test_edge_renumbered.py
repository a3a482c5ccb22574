"""--after keep, when the files kept in the hot folder change identity but not content: a
remount that numbers inodes anew (CIFS `noserverino`) or a restore from a backup. Before, every
kept image was processed again, with a second row each; now each keeps its one row."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store import SCHEMA_VERSION, ResultStore

from support import daemon_config, image_rows


def png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def renumber(path: Path) -> None:
    """The same bytes and modification time under a new inode, as a remount shows them."""
    copy = path.with_name(path.name + ".part")  # an in-progress name: the daemon skips it
    shutil.copy2(path, copy)
    copy.replace(path)


def test_kept_files_found_under_new_identities_keep_their_rows(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitdet.edge")
    config = daemon_config(tiny_model_dir, tmp_path, after="keep", settle_s=0.0)
    for name, level in (("a.png", 40), ("b.png", 80), ("latest.png", 120)):
        (config.watch / name).write_bytes(png(level))
    assert EdgeDaemon(config).run() == 0
    first = {Path(r["path"]).name: r for r in image_rows(config.db)}
    assert len(first) == 3

    renumber(config.watch / "a.png")  # a remount: new inode, same mtime
    (config.watch / "b.png").write_bytes(png(80))  # a restore: same bytes, a new mtime
    (config.watch / "latest.png").write_bytes(png(121))  # the camera's next shot: new content
    assert EdgeDaemon(config).run() == 0
    rows = image_rows(config.db)
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "latest.png", "latest.png"]
    for name in ("a.png", "b.png"):
        now = next(r for r in rows if r["id"] == first[name]["id"])
        assert now["file_key"] != first[name]["file_key"]  # known by its new identity
    told = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
            == "recorded_file_renumbered"]  # fmt: skip
    assert sorted(Path(r.fields["path"]).name for r in told) == ["a.png", "b.png"]

    # a third start, and a prune of every final result: nothing processed, the rows of the
    # files still there kept (the earlier latest.png's goes: its file was replaced)
    caplog.clear()
    assert EdgeDaemon(daemon_config(tiny_model_dir, tmp_path, after="keep",
                                    keep_results_s=0.0)).run() == 0  # fmt: skip
    assert [r["id"] for r in image_rows(config.db)] == [
        first["a.png"]["id"],
        first["b.png"]["id"],
        rows[-1]["id"],
    ]
    assert not [r for r in caplog.records if "renumbered" in r.getMessage()]


def test_a_remount_before_a_prune_keeps_the_rows(tiny_model_dir, tmp_path):
    """The prune asks whether each row's file is still there: a file renumbered but with its
    name, size and modification time is (before: its row went, and the image came back as new)."""
    config = daemon_config(tiny_model_dir, tmp_path, after="keep", settle_s=0.0)
    (config.watch / "a.png").write_bytes(png(40))
    assert EdgeDaemon(config).run() == 0
    (row,) = image_rows(config.db)
    renumber(config.watch / "a.png")
    store = ResultStore(config.db)
    try:
        assert store.prune(before=float("inf")).deleted == 0
    finally:
        store.close()
    assert image_rows(config.db) == [row]


def test_a_version_2_store_gains_the_index(tmp_path):
    db = tmp_path / "edge.sqlite"
    ResultStore(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:  # as version 2 left it
        conn.execute("DROP INDEX images_stored_path")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    store = ResultStore(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 3
        indexes = {r[0] for r in store._query("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "images_stored_path" in indexes
    finally:
        store.close()
