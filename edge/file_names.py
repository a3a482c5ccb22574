"""File names that fit: the byte limit of a name on the usual file systems, and a name cut
short to it. Used for the daemon's archived and quarantined copies and predict's annotated
copies, whose names grow by a prefix or a suffix beside the camera's own."""

from __future__ import annotations

import os

#: A file name's length limit on the usual file systems (ext4, XFS, btrfs, NTFS/SMB), bytes.
NAME_MAX = 255


def fit_name(stem: str, ending: str, limit: int = NAME_MAX) -> str:
    """``stem + ending`` in at most `limit` bytes: the stem cut short (never inside a
    character; bytes of a name that is not UTF-8 count as they will be written), the ending
    kept whole."""
    room = max(limit - len(os.fsencode(ending)), 0)
    raw = os.fsencode(stem)
    if len(raw) > room:
        stem = os.fsdecode(raw[:room].decode("utf-8", "ignore").encode())
    return stem + ending
