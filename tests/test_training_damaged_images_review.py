"""Review: training reads damaged JPEGs and PNGs as the edge does.

A JPEG whose scan data ends early (cut and its end marker appended, or bytes zeroed) and a PNG
whose zlib stream holds too few rows decode through Pillow without an error, the rest flat grey
(JPEG) or black (PNG). The edge refuses them (`preprocess.decode_pixels`); training's reader
(`voc.load_rgb_and_peak`: `data check --decode`, the training dataset, `train`) decoded them
with Pillow and trained on the half-grey image, and `data check --decode` said nothing. It now
refuses them with the edge's message, naming the file; genuine images whose last rows are
exactly the decoder's grey (or black) are not refused. Evaluation reads images as the edge does
(`evaluate_predict.edge_image`) and refuses them too.

Small files (256 x 256) written with Pillow; the damaged ones made as the edge's own tests make
them (`test_damaged_frames_review5`).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_damaged_frames_review5 import cut_and_ended, gasket, jpeg, png, png_of_rows, zeroed

from splitdet.training import voc

from support import make_tiny_voc, png_chunk, run_main

pytestmark = pytest.mark.timeout(60)


#: The edge's words for each damage (`preprocess._check_filled`).
GREY_JPEG = "a JPEG decoded as flat grey (128 in every channel) from about row"
SHORT_PNG = "a PNG whose compressed pixel data ends after 32 of its 64 rows"
#: Either.
DAMAGE = r"ends early or is damaged|decoded as black"


def png16_of_rows(array: np.ndarray, rows: int) -> bytes:
    """A 16-bit grayscale PNG of `array`'s size (uint16 [H, W]) whose complete zlib stream
    holds only its first `rows` rows."""
    height, width = array.shape
    raw = b"".join(b"\0" + array[r].astype(">u2").tobytes() for r in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + idat + png_chunk(b"IEND", b"")


def noise(height: int = 64, width: int = 48) -> np.ndarray:
    """uint8 [H, W] of values 30..219, none 0 (no genuinely black row)."""
    return np.random.default_rng(0).integers(30, 220, (height, width), dtype=np.uint8)


def pillow_rgb(path: Path) -> np.ndarray:
    """What Pillow itself decodes the file at `path` to, as RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


DAMAGED = {
    "JPEG cut at 30%, end marker appended": (
        "jpg", lambda: cut_and_ended(jpeg(gasket(1), quality=92), 0.3), GREY_JPEG),
    "JPEG with 2048 bytes zeroed": ("jpg", lambda: zeroed(jpeg(gasket(1), quality=92), 0.5),
                                    GREY_JPEG),
    "grayscale JPEG cut": (
        "jpg", lambda: cut_and_ended(jpeg(gasket(3)[..., 1], quality=85), 0.5), GREY_JPEG),
    "progressive JPEG cut": (
        "jpg", lambda: cut_and_ended(jpeg(gasket(2), quality=75, progressive=True), 0.1),
        GREY_JPEG),
    "PNG of 32 of its 64 rows": ("png", lambda: png_of_rows(noise(), 32), SHORT_PNG),
    "16-bit PNG of 32 of its 64 rows": (
        "png", lambda: png16_of_rows(noise().astype(np.uint16) * 257, 32), SHORT_PNG),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_load_rgb_refuses_a_damaged_file_with_the_edges_message(damage, tmp_path):
    suffix, make, words = DAMAGED[damage]
    path = tmp_path / f"part_0001.{suffix}"
    path.write_bytes(make())
    pillow_rgb(path)  # (Pillow itself decodes it without an error)
    with pytest.raises(voc.VocError) as refused:
        voc.load_rgb(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: {words}"), message
    with pytest.raises(voc.VocError, match=DAMAGE):
        voc.load_rgb_and_peak(path, 12)


def test_the_message_is_the_edges_own(tmp_path):
    from splitdet.edge.preprocess import ImageError, decode_pixels

    data = cut_and_ended(jpeg(gasket(1), quality=92), 0.3)
    path = tmp_path / "part.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError) as edge:
        decode_pixels(data, str(path))
    with pytest.raises(voc.VocError) as training:
        voc.load_rgb(path)
    assert str(training.value) == str(edge.value)


#: Encoder settings of the genuine grey-band JPEGs (each layout's scans end differently).
LAYOUTS = {
    "baseline": dict(quality=80),
    "progressive": dict(quality=75, progressive=True),
    "restart markers": dict(quality=75, restart_marker_blocks=8),
    "4:4:4": dict(quality=90, subsampling=0),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_genuine_jpeg_whose_last_rows_are_exactly_grey_is_read(layout, tmp_path):
    """A band of exactly 128 along the bottom of the image itself decodes as the decoder's
    fill does: the edge's check tells it apart (it decodes again), so training reads it."""
    options = LAYOUTS[layout]
    image = gasket(4)
    image[-40:] = 128
    path = tmp_path / "grey_band.jpg"
    path.write_bytes(jpeg(image, **options))
    decoded = pillow_rgb(path)
    assert (decoded[-8:] == 128).all()  # (the decoder's grey, but genuine)
    read = voc.load_rgb(path)
    assert np.array_equal(np.asarray(read), decoded)
    grey = tmp_path / "grey_band_l.jpg"
    grey.write_bytes(jpeg(image[..., 0], **options))
    assert voc.load_rgb(grey).size == (256, 256)


def test_a_uniform_mid_grey_jpeg_is_read(tmp_path):
    path = tmp_path / "flat.jpg"
    path.write_bytes(jpeg(np.full((64, 96, 3), 128, np.uint8)))
    assert (np.asarray(voc.load_rgb(path)) == 128).all()


def test_a_png_with_genuinely_black_bottom_rows_is_read(tmp_path):
    image = gasket(5)
    image[-10:] = 0
    for k, array in enumerate((image, image[..., 0], image[..., 0].astype(np.uint16) * 257)):
        path = tmp_path / f"black_{k}.png"
        path.write_bytes(png(array))
        assert voc.load_rgb(path).size == (256, 256)
    whole = tmp_path / "whole.png"
    whole.write_bytes(png_of_rows(noise(), 64))
    assert voc.load_rgb(whole).size == (48, 64)


def _with_damaged(root: Path, image_id: str, suffix: str, data: bytes) -> Path:
    """Add `data` as JPEGImages/ID.SUFFIX (its annotation without boxes) to the train split of
    the VOC tree `root`; its path."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    path = root / "JPEGImages" / f"{image_id}.{suffix}"
    path.write_bytes(data)
    sample = voc.VocSample(image_id, path, width, height, ())
    voc.write_annotation(root / "Annotations" / f"{image_id}.xml", sample)
    voc.write_split(root, "train", [*voc.read_split_ids(root, "train"), image_id])
    return path


@pytest.fixture(scope="module")
def damaged_voc(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(A tiny VOC tree whose train split holds a cut JPEG and a short PNG, the JPEG, the
    PNG)."""
    root = make_tiny_voc(tmp_path_factory.mktemp("voc"), n_defective=2, n_free=1, size=(64, 64))
    cut = _with_damaged(root, "cut", "jpg", cut_and_ended(jpeg(gasket(1), quality=92), 0.3))
    short = _with_damaged(root, "short", "png", png_of_rows(noise(), 32))
    return root, cut, short


def _problems(capsys, root: Path, *options: str) -> tuple[int, list[str]]:
    """(exit status, problems) of `splitdet data check ROOT OPTIONS`."""
    code, out, _ = run_main(capsys, "data", "check", root, "--json", "-", *options)
    return code, json.loads(out)["problems"]


def test_data_check_decode_lists_the_damaged_files_as_problems(damaged_voc, capsys):
    root, cut, short = damaged_voc
    _, header_only = _problems(capsys, root)  # (the tiny tree's splits leak: problems of theirs)
    assert not any(str(cut) in p or str(short) in p for p in header_only), header_only
    code, problems = _problems(capsys, root, "--decode")
    assert code == 1
    found = [p for p in problems if p not in header_only]
    assert len(found) == 2, found
    assert any(p.startswith(f"{cut}: {GREY_JPEG}") for p in found), found
    assert any(p.startswith(f"{short}: {SHORT_PNG}") for p in found), found


def test_the_training_dataset_and_eval_refuse_them(damaged_voc):
    from splitdet.training.dataset import VocDetection
    from splitdet.training.evaluate_predict import edge_image

    root, cut, short = damaged_voc
    samples = {s.image_id: s for s in voc.read_split(root, "train")}
    dataset = VocDetection(list(samples.values()), ["scratch"], train=True)
    index = list(samples).index("cut")
    with pytest.raises(voc.VocError, match=f"^{re.escape(str(cut))}: a JPEG decoded as flat grey"):
        dataset[index]
    for path in (cut, short):
        with pytest.raises(voc.VocError, match=DAMAGE):
            edge_image(path, 16)
    dataset[list(samples).index("img_000")]  # (a genuine one: read)


def test_the_hint_of_train_and_eval_names_data_check_with_decode(damaged_voc):
    """Only `data check --decode` finds such a file: the command train and eval suggest after
    the error gave it without --decode, which found nothing."""
    root, cut, short = damaged_voc
    for path in (cut, short):
        with pytest.raises(voc.VocError) as refused:
            voc.load_rgb(path)
        hint = voc.check_hint(refused.value, root)
        assert hint.endswith(f"(`splitdet data check {root} --decode` lists every problem at once)")
