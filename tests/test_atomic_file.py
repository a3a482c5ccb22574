"""Whole-file writes (shared.atomic_file): a failed write keeps the earlier file and leaves no
temporary file behind; a written file gets the umask's mode, not mkstemp's 0600."""

from __future__ import annotations

import os

import pytest

from splitdet.shared.atomic_file import atomic_write, replacing
from splitdet.shared.checkpoint import read_checkpoint, save_checkpoint

from conftest import make_tiny_model


def test_a_failed_write_keeps_the_earlier_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError, match="half way"), replacing(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("half way")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_written_file_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "sub" / "a.xml", b"<annotation/>\n", fsync=True)
    finally:
        os.umask(old)
    written = tmp_path / "sub" / "a.xml"
    assert written.read_bytes() == b"<annotation/>\n"
    assert written.stat().st_mode & 0o777 == mode


def test_a_checkpoint_that_cannot_be_saved_leaves_the_last_one_whole(tmp_path):
    path = tmp_path / "last.pt"
    model = make_tiny_model()
    save_checkpoint(path, model, epoch=3)
    with pytest.raises(Exception, match=r"lambda|pickle"):
        save_checkpoint(path, model, epoch=4, hook=lambda: None)  # not picklable
    assert read_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_link_or_a_fifo_is_written_through_not_replaced(tmp_path):
    """`--json out.json` where out.json links elsewhere, or a FIFO a reader waits on (`eval
    --json /dev/stdout`, `>(jq .)`): a rename would put a regular file in their place."""
    import threading

    real = tmp_path / "real.json"
    real.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic_write(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    atomic_write(fifo, '{"map": 0.5}\n')
    reader.join(10)
    assert got == ['{"map": 0.5}\n'] and not fifo.is_file()


def test_a_name_near_the_file_systems_limit_is_written_and_its_leftover_found(tmp_path):
    """The temporary name adds 14 bytes to the target's: a 250-byte name made it 264, over
    the 255 a file name may have ("File name too long")."""
    from splitdet.shared.atomic_file import stale_temporaries

    name = "é" * 120 + "n" * 5 + ".jpg"  # 249 bytes in UTF-8
    atomic_write(tmp_path / name, b"whole")
    assert (tmp_path / name).read_bytes() == b"whole"
    with pytest.raises(RuntimeError), replacing(tmp_path / name) as tmp:
        temporary = tmp.name
        raise RuntimeError
    assert len(os.fsencode(temporary)) <= 255 and not (tmp_path / temporary).exists()
    (tmp_path / temporary).write_bytes(b"half")  # as a writer killed mid-write leaves it
    assert stale_temporaries(tmp_path, [name]) == [tmp_path / temporary]
    assert stale_temporaries(tmp_path, ["other.jpg"]) == []
