"""`read_image_file` when the file changes under it: a file longer than its stat said (a camera
still writing it), one that grows past the limit, one replaced between the look and the open."""

import os
import tracemalloc
from pathlib import Path

import pytest

from splitdet.edge import preprocess
from splitdet.edge.preprocess import ImageError, read_image_file

# A regular file whose stat size (0) understates what a read returns, as a file still being
# written grows between the stat and the read; its content is fixed for this process.
GROWING = Path("/proc/self/cmdline")


@pytest.fixture
def growing() -> bytes:
    if not GROWING.is_file() or GROWING.stat().st_size != 0:
        pytest.skip("needs Linux /proc (a regular file whose stat size is 0)")
    return GROWING.read_bytes()


def test_a_file_longer_than_its_stat_said_is_read_whole(growing, monkeypatch):
    """Past the stat's size it is read on in chunks (here 3 bytes each) to its end."""
    monkeypatch.setattr(preprocess, "READ_CHUNK_BYTES", 3)
    assert len(growing) > 6
    assert read_image_file(GROWING) == growing


def test_a_file_that_grows_past_the_limit_is_refused_after_limit_plus_one_bytes(
    growing, monkeypatch
):
    """Never read beyond the limit + 1 byte, whatever the stat said; the message names the
    file and the size it reached."""
    limit = len(growing) // 2
    monkeypatch.setattr(preprocess, "MAX_FILE_BYTES", limit)
    monkeypatch.setattr(preprocess, "READ_CHUNK_BYTES", 2)
    with pytest.raises(ImageError) as refused:
        read_image_file(GROWING)
    assert str(refused.value) == f"{GROWING} is {limit + 1} bytes, over the 0 MiB limit"


def _replace_before_open(monkeypatch, path: Path, replace) -> None:
    """Make the next `os.open` of `path` find it replaced by `replace(path)` first, as if
    another process swapped it between `read_image_file`'s stat and its open."""
    real_open = os.open

    def swapping_open(name, flags, *args, **kwargs):
        if Path(name) == path:
            path.unlink()
            replace(path)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swapping_open)


def test_a_file_replaced_by_a_fifo_after_the_stat_is_refused_without_waiting(tmp_path, monkeypatch):
    """Opened without blocking (a FIFO opened to read waits for a writer) and looked at again."""
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG small")
    _replace_before_open(monkeypatch, image, os.mkfifo)
    with pytest.raises(ImageError, match=r"a\.png: not a regular file \(a FIFO\); not read"):
        read_image_file(image)


def test_a_file_replaced_by_a_larger_one_after_the_stat_is_refused_unread(tmp_path, monkeypatch):
    """The replacement (sparse: no disk used) is over the limit: refused by its size, never
    loaded."""
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG small")

    def huge(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.truncate(preprocess.MAX_FILE_BYTES + 1)

    _replace_before_open(monkeypatch, image, huge)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"a\.png is \d+ bytes, over the 256 MiB"):
            read_image_file(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes allocated: the replacement was read"
