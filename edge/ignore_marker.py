"""The marker file that keeps `splitdet edge run --recursive` out of a folder (torch-free).

`splitdet edge collect` writes one into its output, so that the copies it makes for review
are never taken for new images by a daemon watching a folder above; a user can mark any
other folder the same way (``touch FOLDER/.splitdet-ignore``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IGNORE_MARKER", "is_marked", "mark"]

#: A folder holding a regular file of this name is never entered with `--recursive`.
IGNORE_MARKER = ".splitdet-ignore"


def is_marked(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds the marker (a regular file, not a link or a folder)."""
    return os.path.isfile(os.path.join(folder, IGNORE_MARKER)) and not os.path.islink(
        os.path.join(folder, IGNORE_MARKER)
    )


def mark(folder: Path) -> None:
    """Put the marker in ``folder`` (which must exist), unless it is there already; a link
    of that name is replaced, never followed."""
    marker = Path(folder) / IGNORE_MARKER
    if is_marked(folder):
        return
    if marker.is_symlink():
        marker.unlink()
    marker.write_text("splitdet edge run --recursive never enters this folder\n")
