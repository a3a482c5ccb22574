"""Mutant audit, second round: `edge.annotate`'s 8-bit picture of an image, and the mode of
predict's annotated copies.

`rgb_8bit`: "each value times 255, rounded half up" (`_to_8bit`: "rounded half up"), so the
annotated copy shows the grey levels the model saw, not each a step darker.
`_temporary_beside`: a copy gets "the mode an ordinary ``open()`` gives (not ``mkstemp``'s
``0o600``: other users' viewers read the copies)".
Each test names the one-line mutant it kills.
"""

from __future__ import annotations

import stat

import numpy as np

from splitdet.edge.annotate import annotated_bytes, draw_detections, rgb_8bit, save_annotated_copy


def test_values_are_rounded_half_up_to_8_bits():
    """Kills: `+ 0.5` dropped from `_to_8bit` (every level truncated: 127.6 drawn as 127)."""
    levels = np.array([0.0, 127.4, 127.5, 127.6, 254.6, 255.0], np.float32) / np.float32(255)
    image = np.stack([levels.reshape(1, -1)] * 3)  # Float32[3, 1, 6]
    assert rgb_8bit(image)[0, :, 0].tolist() == [0, 127, 128, 128, 255, 255]
    canvas = draw_detections(image, [], [], [])  # (what an annotated copy is made of)
    assert [canvas.getpixel((x, 0))[0] for x in range(6)] == [0, 127, 128, 128, 255, 255]


def test_an_annotated_copy_has_the_mode_open_gives(tmp_path):
    """Kills: the `os.chmod(tmp, folder_mode() & 0o666)` dropped from `_temporary_beside`
    (predict's copies left 0600, as mkstemp makes them: unreadable to other users)."""
    image = np.full((3, 24, 32), 0.5, np.float32)
    copy = save_annotated_copy(image, [[2, 2, 10, 10]], [0.9], ["scratch"], tmp_path / "a.jpg")
    reference = tmp_path / "plain.txt"
    with open(reference, "w"):
        pass
    assert stat.S_IMODE(copy.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_an_upper_case_suffix_names_its_format_too(tmp_path):
    """Kills: `.lower()` dropped from `encode`'s suffix (a copy asked for as ``.JPG`` or
    ``.PNG``, as cameras name their files, refused as a format Pillow does not write)."""
    image = np.full((3, 24, 32), 0.5, np.float32)
    assert annotated_bytes(image, [], [], [], tmp_path / "a.JPG")[:2] == b"\xff\xd8"
    assert annotated_bytes(image, [], [], [], tmp_path / "a.PNG")[:4] == b"\x89PNG"
