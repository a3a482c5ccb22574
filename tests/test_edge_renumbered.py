"""--after keep, when the files kept in the hot folder change identity but not content: a
remount that numbers inodes anew (CIFS `noserverino`) or a restore from a backup that keeps the
times. Before, every kept image was processed again, with a second row each; now each keeps
its one row. The same bytes written again (an identical shot) are still a new arrival."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store import ResultStore

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
    for name, level in (("a.png", 40), ("b.png", 80), ("c.png", 90), ("latest.png", 120)):
        (config.watch / name).write_bytes(png(level))
    backup = shutil.copy2(config.watch / "b.png", tmp_path / "b.png")
    assert EdgeDaemon(config).run() == 0
    first = {Path(r["path"]).name: r for r in image_rows(config.db)}
    assert len(first) == 4

    renumber(config.watch / "a.png")  # a remount: new inode, same mtime
    (config.watch / "b.png").unlink()
    shutil.copy2(backup, config.watch / "b.png")  # a restore that keeps the times
    (config.watch / "c.png").write_bytes(png(90))  # the same bytes written again: a new shot
    (config.watch / "latest.png").write_bytes(png(121))  # the camera's next shot: new content
    assert EdgeDaemon(config).run() == 0
    rows = image_rows(config.db)
    names = [Path(r["path"]).name for r in rows]
    assert names == ["a.png", "b.png", "c.png", "latest.png", "c.png", "latest.png"]
    for name in ("a.png", "b.png"):
        now = next(r for r in rows if r["id"] == first[name]["id"])
        assert now["file_key"] != first[name]["file_key"]  # known by its new identity
    told = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
            == "recorded_file_renumbered"]  # fmt: skip
    assert sorted(Path(r.fields["path"]).name for r in told) == ["a.png", "b.png"]

    # a third start, and a prune of every final result: nothing processed, the rows of the
    # files still there kept (the earlier c.png's and latest.png's go: their files were
    # written anew)
    caplog.clear()
    assert EdgeDaemon(daemon_config(tiny_model_dir, tmp_path, after="keep",
                                    keep_results_s=0.0)).run() == 0  # fmt: skip
    kept = [first["a.png"]["id"], first["b.png"]["id"], rows[-2]["id"], rows[-1]["id"]]
    assert [r["id"] for r in image_rows(config.db)] == kept
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
