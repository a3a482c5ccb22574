"""A week beside a camera (`splitdet edge run --after keep`): a restart on a hot folder of
thousands of kept images, all recorded by the run before, stat'ed every one of them at every
--poll for a minute (RECENT_S), as if each had just been processed: 20% of a core for 10 000
files, where the idle folder costs 2-3%."""

from __future__ import annotations

import os
import time
from pathlib import Path

from PIL import Image

from splitdet.edge.watcher import HotFolder

RECENT_S = 1.0  # the folder's `recent_s` here (the daemon's is 60 s)


def _kept_folder(folder: Path, n: int) -> bytes:
    """`n` PNGs in `folder`, last changed more than RECENT_S ago (kept by an earlier run)."""
    Image.new("RGB", (8, 8), (90, 90, 90)).save(folder / "first.png")
    data = (folder / "first.png").read_bytes()
    for i in range(1, n):
        (folder / f"cam_{i:05d}.png").write_bytes(data)
    time.sleep(RECENT_S + 0.2)
    return data


def _take_all(folder: HotFolder) -> None:
    """Hand every candidate over and keep it in the folder, as the intake does with a file
    its row already records (`AfterActions.move` under --after keep)."""
    while (candidate := folder.next_candidate()) is not None:
        folder.ignore(candidate)


def test_a_restart_on_kept_images_does_not_stat_them_all_at_every_poll(tmp_path):
    data = _kept_folder(tmp_path, 300)
    folder = HotFolder(tmp_path, settle_s=0.0, full_scan_s=3600.0, recent_s=RECENT_S)
    folder.scan()  # the start: every file listed
    _take_all(folder)
    stated = folder._restat()  # what each idle poll stats, listing nothing
    assert stated is not None and len(stated) == 0, (
        f"{len(stated or [])} files kept long before the start are stat'ed at every poll"
    )

    # a file arriving after the start and kept is still watched closely (a camera rewriting
    # one name in place is seen at once), and so is a file of the start changed just now
    (tmp_path / "new.png").write_bytes(data)
    folder.scan()
    _take_all(folder)
    os.chmod(tmp_path / "first.png", 0o640)  # its ctime: handed over again, compared
    os.utime(tmp_path, None)  # (its folder's times say "changed")
    folder.scan()
    _take_all(folder)
    stated = folder._restat()
    assert stated is not None and sorted(name for _, name, _, _ in stated) == [
        "first.png",
        "new.png",
    ]
