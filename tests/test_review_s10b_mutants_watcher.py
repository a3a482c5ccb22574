"""Mutant audit, second round: which files the hot folder takes (`edge.watcher`,
`edge.watcher_listing`).

The watcher's docstring: names "still being written" by the usual tools (IN_PROGRESS_SUFFIXES,
`is_ignored_name`: checked in any case, as Windows tools write ``.PART``) are never picked up,
"so writers that write to a temporary name and rename are picked up only after the rename", and
are not told of as skipped either. Real files in a real folder; each test names the one-line
mutant it kills.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from splitdet.edge.watcher import HotFolder
from splitdet.edge.watcher_listing import is_ignored_name, parse_extensions

from support import as_nobody


def _taken(folder: HotFolder) -> list[str]:
    """The names handed over, in order (each kept in the folder once taken: `ignore`)."""
    names = []
    folder.scan()
    while (candidate := folder.next_candidate()) is not None:
        names.append(candidate.path.name)
        folder.ignore(candidate)
    return names


def test_in_progress_names_are_ignored_in_any_case(tmp_path: Path):
    """Kills: `.lower()` dropped from `is_ignored_name` (a Windows tool's ``shot.png.PART``,
    ``.TMP`` or ``.Crdownload`` taken half written by --any-extension, and told of as a
    skipped file otherwise)."""
    writing = ["a.png.PART", "b.TMP", "c.raw.Crdownload", "d.png.Filepart"]
    for name in [*writing, "done.png"]:
        (tmp_path / name).write_bytes(b"x")
    assert all(is_ignored_name(name) for name in writing)

    assert _taken(HotFolder(tmp_path, settle_s=0, extensions=None)) == ["done.png"]
    images_only = HotFolder(tmp_path, settle_s=0)
    assert _taken(images_only) == ["done.png"]
    assert images_only.skipped_files() == 0  # (in-progress names are not told of)

    (tmp_path / "a.png.PART").rename(tmp_path / "a.png")  # the writer's rename: taken now
    assert _taken(images_only) == ["a.png"]


#: Run as an unprivileged user (root lists any folder): a file next to a subfolder whose name
#: starts with that subfolder's name is removed while that subfolder cannot be listed.
_SIBLING_GONE = """
import json, sys
from pathlib import Path
from splitdet.edge.watcher import HotFolder
hot = Path(sys.argv[1])
(hot / "cam1").mkdir()
(hot / "cam1" / "a.png").write_bytes(b"x")
(hot / "cam10.png").write_bytes(b"x")
folder = HotFolder(hot, settle_s=3600, recursive=True)  # (nothing is ever ready)
folder.scan()
before = folder.pending()
(hot / "cam10.png").unlink()
(hot / "cam1").chmod(0)
try:
    folder.scan()
    after = folder.pending()
finally:
    (hot / "cam1").chmod(0o755)
print(json.dumps([before, after]))
"""


def test_a_file_gone_beside_an_unlistable_folder_is_not_kept(tmp_path: Path):
    """Kills: `_below_any` testing `name.startswith(where)` for `where + "/"` (a removed
    ``cam10.png`` kept as pending because ``cam1`` could not be listed: only the files below
    the folder that cannot be listed are kept as they were; a --once run would wait for a
    file that is gone)."""
    prefix = as_nobody()
    if prefix is None:
        pytest.skip("no unprivileged user to run as")
    with tempfile.TemporaryDirectory() as name:
        hot = Path(name) / "hot"
        hot.mkdir()
        for path in (Path(name), hot):
            path.chmod(0o777)
        result = subprocess.run(
            [*prefix, sys.executable, "-c", _SIBLING_GONE, str(hot)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # two files tracked; then cam1/a.png kept as it was (cam1 cannot be listed), cam10.png gone
    assert json.loads(result.stdout.splitlines()[-1]) == [2, 1], result.stderr


def test_extensions_are_taken_each_once_in_order():
    """Kills: the `if extension not in taken` check dropped from `normalize_extensions` (its
    docstring: lower-case ".ext" strings, in order, each once: "PNG" and ".png" are ".png")."""
    assert parse_extensions("PNG, .png,raw16,.RAW16, .Tif") == (".png", ".raw16", ".tif")
