"""`splitdet edge collect`: a real results database and real image files in, a VOC tree with the
model's boxes as pre-labels out, which `splitdet data check` accepts; a second run adds new
results and never touches a reviewed annotation."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.collect import voc_image_id
from splitdet.edge.ignore_marker import IGNORE_MARKER
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import main
from splitdet.training import voc

FINGERPRINT = "c" * 64
W, H = 96, 64


def _image(path: Path, fmt: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (W, H), 77).save(path, format=fmt)
    return str(path)


def _arrival(n: int, path: str) -> Arrival:
    """The arrival of the file at `path`, hashed as the watcher does (a made-up hash when the
    file is not there)."""
    file = Path(path)
    digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else f"{n:064x}"
    return Arrival(path, f"{file.name}|1|{n}|{n}", digest, 1, time.time())


def _defect(store: ResultStore, n: int, path: str, p: float, answer: Answer) -> int:
    row, _, _ = store.record_pending(
        _arrival(n, path), p, f"r{n}", b"features", FINGERPRINT, {}, stored_path=path
    )
    assert store.complete(row, answer)
    return row


@pytest.fixture
def line(tmp_path):
    """(db, archive, ids): one result of each kind, their files in an archive folder."""
    archive, db = tmp_path / "archive", tmp_path / "edge.sqlite"
    store = ResultStore(db)
    ids = {}
    good = _image(archive / "cam 1" / "good part.png")
    ids["ok"], _ = store.record_ok(_arrival(1, good), 0.05, FINGERPRINT, {}, stored_path=good)
    scratched = _image(archive / "scratched.jpg")
    answer = Answer(
        boxes=[[10.0, 12.5, 40.0, 20.0], [80.0, 50.0, 120.0, 70.0], [1.0, 1.0, 5.0, 5.0]],
        scores=[0.93, 0.71, 0.3],  # the third is below the default threshold
        labels=[2, 1, 2],  # the first box a dent: one name per box, as the sender stores them
        class_names=["dent", "scratch", "dent"],
    )
    ids["defect"] = _defect(store, 2, scratched, 0.88, answer)
    unsure = _image(archive / "unsure.pgm", "PPM")  # a name VOC readers do not look for
    nothing = Answer(boxes=[], scores=[], labels=[], class_names=[])
    ids["flagged_clean"] = _defect(store, 3, unsure, 0.41, nothing)
    ids["gone"], _ = store.record_ok(
        _arrival(4, "/hot/4.png"), 0.2, FINGERPRINT, {}, stored_path=str(archive / "gone.png")
    )
    ids["deleted"], _ = store.record_ok(_arrival(5, "/hot/5.png"), 0.1, FINGERPRINT, {})
    ids["pending"], _, _ = store.record_pending(
        _arrival(6, _image(archive / "6.png")), 0.9, "r6", b"x", FINGERPRINT, {}
    )
    dead, _, _ = store.record_pending(_arrival(7, _image(archive / "7.png")), 0.9, "r7", b"x",
                                      FINGERPRINT, {})  # fmt: skip
    store.dead_letter(dead, "dead letter: INTERNAL: bug")
    store.close()
    return db, archive, ids


def _collect(db: Path, out: Path, capsys, *options: str) -> dict:
    assert main(["edge", "collect", "--db", str(db), "--out", str(out), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def test_collect_writes_a_voc_tree_with_the_model_boxes(line, tmp_path, capsys):
    db, _, ids = line
    out = tmp_path / "review"
    summary = _collect(db, out, capsys)
    # ok and defect rows whose image was kept; pending and error rows are not final, and a
    # deleted image (--after delete) is not chosen: it would take a --limit place every run
    assert summary["matched"] == 4
    assert summary["collected"] == 3 and summary["already_collected"] == 0
    assert summary["missing"] == [f"{tmp_path / 'archive' / 'gone.png'}: no longer there"]
    assert (out / IGNORE_MARKER).is_file()  # a daemon watching above it with --recursive skips it

    good = voc.read_annotation(out, f"{ids['ok']:08d}-good_part")
    assert good.objects == () and good.image_path.suffix == ".png"
    defect = voc.read_annotation(out, f"{ids['defect']:08d}-scratched")
    assert [(o.name, o.box) for o in defect.objects] == [
        ("dent", (10.0, 12.0, 40.0, 20.0)),  # VOC's integer px, rounded outwards
        ("scratch", (80.0, 50.0, float(W), float(H))),  # clipped to the image
    ]  # each box's own class (a review: every dent became "scratch")
    clean = voc.read_annotation(out, f"{ids['flagged_clean']:08d}-unsure")
    assert clean.objects == () and clean.image_path.suffix == ".png"  # converted, readable
    assert Image.open(clean.image_path).size == (W, H)

    with open(out / "collected.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert [int(r["result_id"]) for r in listed] == [ids["ok"], ids["defect"], ids["flagged_clean"]]
    assert json.loads(listed[1]["scores"]) == [0.93, 0.71, 0.3]  # what the model said, all of it

    assert main(["data", "split", str(out), "--val", "0", "--test", "0"]) == 0  # all train
    capsys.readouterr()
    assert main(["data", "check", str(out), "--decode", "--no-progress"]) == 0
    assert "ok, " in capsys.readouterr().out


def test_a_second_run_adds_new_results_and_keeps_reviewed_ones(line, tmp_path, capsys):
    db, archive, ids = line
    out = tmp_path / "review"
    _collect(db, out, capsys)
    reviewed = out / "Annotations" / f"{ids['defect']:08d}-scratched.xml"
    sample = voc.read_annotation(out, reviewed.stem)
    voc.write_annotation(reviewed, voc.VocSample(sample.image_id, sample.image_path, W, H, ()))
    before = reviewed.read_bytes()

    store = ResultStore(db)
    new = _image(archive / "later.png")
    later, _ = store.record_ok(_arrival(8, new), 0.3, FINGERPRINT, {}, stored_path=new)
    store.close()
    summary = _collect(db, out, capsys)
    assert summary["collected"] == 1 and summary["already_collected"] == 3
    assert reviewed.read_bytes() == before  # the reviewer's correction stands
    assert (out / "Annotations" / f"{later:08d}-later.xml").is_file()
    with open(out / "collected.csv", newline="") as fh:
        assert [int(r["result_id"]) for r in csv.DictReader(fh)][-1] == later


def test_selection_by_verdict_p_defect_and_limit(line, tmp_path, capsys):
    db, _, _ = line
    assert _collect(db, tmp_path / "a", capsys, "--verdict", "defect")["matched"] == 2
    unsure = _collect(db, tmp_path / "b", capsys, "--p-defect", "0.3:0.9")
    assert unsure["matched"] == 2 and unsure["collected"] == 2
    assert _collect(db, tmp_path / "d", capsys, "--since", "1h")["matched"] == 4
    first = _collect(db, tmp_path / "c", capsys, "--limit", "1", "--verdict", "defect")
    assert (first["matched"], first["collected"], first["already_collected"]) == (2, 1, 0)
    again = _collect(db, tmp_path / "c", capsys, "--limit", "1", "--verdict", "defect")
    assert (again["matched"], again["collected"], again["already_collected"]) == (2, 1, 1)
    assert len(list((tmp_path / "c" / "Annotations").glob("*.xml"))) == 2  # another one


def test_a_gone_file_gives_its_place_to_the_next(tmp_path, capsys):
    """--limit picks evenly; a pick whose file was removed since (the camera's clean-up
    under --after keep) passes to the next result, so every run collects its share."""
    hot, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    store = ResultStore(db)
    paths = [_image(hot / f"{k}.png") for k in range(6)]
    for k, path in enumerate(paths):
        store.record_ok(_arrival(k, path), 0.1, FINGERPRINT, {}, stored_path=path)
    store.close()
    for k in (0, 3):  # exactly the evenly spaced picks of 2 among 6
        Path(paths[k]).unlink()
    summary = _collect(db, tmp_path / "review", capsys, "--limit", "2")
    assert summary["collected"] == 2
    assert sorted(summary["missing"]) == [f"{paths[0]}: no longer there",
                                          f"{paths[3]}: no longer there"]  # fmt: skip
    assert sorted(p.stem[-1] for p in (tmp_path / "review" / "JPEGImages").iterdir()) == [
        "1", "4"
    ]  # fmt: skip


def test_what_cannot_be_collected_as_it_was_seen(tmp_path, capsys):
    """A file the camera wrote again under the same name (--after keep), a 16-bit PGM, and a
    review folder where the images arrive."""
    hot, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    store = ResultStore(db)
    reused = _image(hot / "cam.png")
    first, _ = store.record_ok(_arrival(1, reused), 0.1, FINGERPRINT, {}, stored_path=reused)
    Image.new("L", (W, H), 200).save(reused)  # the next part, same name, not yet processed
    deep = hot / "deep.pgm"
    Image.new("I", (W, H), 40000).convert("I;16").save(deep, "PPM")
    row, _ = store.record_ok(_arrival(2, str(deep)), 0.1, FINGERPRINT, {}, stored_path=str(deep))
    store.close()
    code = main(["edge", "collect", "--db", str(db), "--out", str(hot / "review")])
    assert code == 2 and "where the results' images arrived" in capsys.readouterr().err
    assert not (hot / "review").exists()

    out = tmp_path / "review"
    summary = _collect(db, out, capsys)
    assert summary["collected"] == 1
    assert summary["missing"] == [f"{reused}: a different image now than the one processed "
                                  "(its content changed)"]  # fmt: skip
    converted = Image.open(out / "JPEGImages" / f"{row:08d}-deep.png")
    assert converted.mode == "I;16" and converted.getpixel((0, 0)) == 40000
    xml = out / "Annotations" / f"{row:08d}-deep.xml"
    assert xml.stat().st_mode & 0o044 == 0o044  # readable by a reviewer's tool as another user
    assert first == 1


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--p-defect", "0.9:0.1"], "expected 0 <= LOW <= HIGH <= 1, got '0.9:0.1'"),
        (["--p-defect", "half"], "expected LOW:HIGH such as 0.2:0.8, got 'half'"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_bad_options_are_one_line(line, tmp_path, capsys, options, needle):
    db, _, _ = line
    with pytest.raises(SystemExit) as exit_info:
        main(["edge", "collect", "--db", str(db), "--out", str(tmp_path / "o"), *options])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_no_database_is_one_line(tmp_path, capsys):
    code = main(["edge", "collect", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no such results database" in err and "Traceback" not in err


#: Where the bright block lies in the pixels as stored (x1, y1, x2, y2).
BLOCK = (10, 12, 40, 30)


def _tagged(path: Path, mode: str, orientation: int | None, fmt: str) -> bytes:
    """A W x H image in `mode`, dark with a bright BLOCK in the pixels as stored, saved with
    an EXIF orientation tag (None: no EXIF); its bytes."""
    if mode == "I;16":
        wide = np.full((H, W), 3000, np.uint16)
        wide[BLOCK[1] : BLOCK[3], BLOCK[0] : BLOCK[2]] = 60000
        image = Image.fromarray(wide)
    else:
        dark, bright = {
            "CMYK": ((0, 0, 0, 200), (0, 0, 0, 0)),
            "L": (20, 240),
        }.get(mode, ((20, 20, 20), (240, 230, 220)))
        image = Image.new(mode, (W, H), dark)
        image.paste(bright, BLOCK)
    options = {}
    if orientation is not None:
        tags = Image.Exif()
        tags[voc.EXIF_ORIENTATION] = orientation
        options["exif"] = tags.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)
    return path.read_bytes()


def _bright_box(pixels: np.ndarray) -> tuple[float, float, float, float]:
    """The bright block's box in Float32[3, H, W] pixels: what a perfect detector answers."""
    ys, xs = np.nonzero(pixels.mean(axis=0) > 0.5)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def test_exif_turned_images_are_collected_as_the_edge_saw_them(tmp_path, capsys):
    """The edge decodes an image's pixels as Pillow gives them: a JPEG's or PNG's as stored,
    its EXIF orientation tag ignored; the cloud's boxes are in those coordinates. Before: an
    image tagged 2..8 was copied as it was, and `splitdet data check` refused the tree (viewers
    and annotation tools show it turned, the boxes elsewhere). Now it is a PNG of those pixels
    without the tag; images without a turning tag are still copied byte for byte."""
    from splitdet.edge.preprocess import decode_image

    hot, db = tmp_path / "archive", tmp_path / "edge.sqlite"
    cases = {  # name -> (mode, orientation, format, collected as)
        "cam_rgb.jpg": ("RGB", 6, "JPEG", ".png"),
        "cam_gray.JPG": ("L", 8, "JPEG", ".png"),
        "cam_cmyk.jpeg": ("CMYK", 3, "JPEG", ".png"),  # a mode PNG cannot hold: RGB, as read
        "mirrored.png": ("RGB", 2, "PNG", ".png"),
        "deep.tif": ("I;16", 5, "TIFF", ".png"),  # (Pillow turns a TIFF itself when decoding)
        "upright.jpg": ("RGB", 1, "JPEG", ".jpg"),
        "plain.jpg": ("RGB", None, "JPEG", ".jpg"),
    }
    store = ResultStore(db)
    sources, seen, ids = {}, {}, {}
    for n, (name, (mode, orientation, fmt, _)) in enumerate(cases.items(), 1):
        sources[name] = _tagged(hot / name, mode, orientation, fmt)
        seen[name] = decode_image(sources[name], name)  # what the edge processed
        box = _bright_box(seen[name])
        if fmt != "TIFF":  # the raw layout: the block where it lies in the pixels as stored
            assert box == tuple(map(float, BLOCK)), name
        answer = Answer(boxes=[list(box)], scores=[0.9], labels=[1], class_names=["scratch"])
        ids[name] = _defect(store, n, str(hot / name), 0.9, answer)
    store.close()
    out = tmp_path / "review"
    summary = _collect(db, out, capsys)
    assert summary["collected"] == len(cases) and not summary["missing"]

    for name, (_, _, _, suffix) in cases.items():
        image_id = voc_image_id(ids[name], name)
        sample = voc.read_annotation(out, image_id)  # checks <size> and the EXIF tag too
        written = sample.image_path
        assert written.name == f"{image_id}{suffix}", name
        assert list((out / "JPEGImages").glob(f"{image_id}.*")) == [written]  # no other copy
        xml = (out / "Annotations" / f"{image_id}.xml").read_text()
        assert f"<filename>{written.name}</filename>" in xml  # names the file written
        if suffix == ".jpg":
            assert written.read_bytes() == sources[name]  # untouched
            continue
        _, height, width = seen[name].shape
        with Image.open(written) as img:
            assert img.format == "PNG" and img.size == (width, height) == (
                sample.width,
                sample.height,
            )
            assert voc.EXIF_ORIENTATION not in img.getexif()
        # exactly the pixels the edge decoded (lossless), so the boxes lie where the cloud
        # put them: on the bright block
        pixels = decode_image(written.read_bytes(), written.name)
        assert np.array_equal(pixels, seen[name]), name
        [obj] = sample.objects
        assert obj.box == _bright_box(pixels), name
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        assert pixels[:, y1:y2, x1:x2].mean() > 0.75, name

    assert main(["data", "split", str(out), "--val", "0", "--test", "0"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(out), "--decode", "--no-progress"]) == 0, (
        capsys.readouterr().out
    )


def _camera(folder: Path, gray: int) -> tuple[Path, str]:
    """(db, content hash): a camera's own store whose row 1 is an ok result for its own
    img0001.jpg (pixels of value `gray`), as that camera's daemon leaves it."""
    image = folder / "archive" / "img0001.jpg"
    image.parent.mkdir(parents=True)
    Image.new("L", (W, H), gray).save(image)
    db = folder / "edge.sqlite"
    store = ResultStore(db)
    row, _ = store.record_ok(_arrival(1, str(image)), 0.1, FINGERPRINT, {}, stored_path=str(image))
    store.close()
    assert row == 1
    return db, hashlib.sha256(image.read_bytes()).hexdigest()


def test_two_cameras_same_row_and_name_into_one_folder(tmp_path, capsys):
    """Two cameras' stores each hold a row 1 for a file named img0001.jpg, different pictures.
    Before: both had the VOC id 00000001-img0001 and the second camera's image was counted
    "already there" and never collected. Now an id already taken counts as already there only
    for the same image (its content hash); the other gets the id with a tag of its hash, and
    the summary says so. Running collect again on either store adds nothing."""
    cam_a, hash_a = _camera(tmp_path / "a", 40)
    cam_b, hash_b = _camera(tmp_path / "b", 200)
    assert hash_a != hash_b
    out = tmp_path / "review"
    first = _collect(cam_a, out, capsys)
    assert (first["collected"], first["already_collected"]) == (1, 0)
    second = _collect(cam_b, out, capsys)
    tagged = f"00000001-img0001-{hash_b[:8]}"
    assert (second["collected"], second["already_collected"]) == (1, 0)  # before: (0, 1)
    assert first["renamed"] == [] and second["renamed"] == [tagged]
    images = out / "JPEGImages"
    assert sorted(p.name for p in images.iterdir()) == sorted(
        ["00000001-img0001.jpg", f"{tagged}.jpg"]
    )
    assert hashlib.sha256((images / "00000001-img0001.jpg").read_bytes()).hexdigest() == hash_a
    assert hashlib.sha256((images / f"{tagged}.jpg").read_bytes()).hexdigest() == hash_b
    assert voc.read_annotation(out, tagged).image_path == images / f"{tagged}.jpg"

    for db in (cam_a, cam_b, cam_a):  # idempotent: each image is there once
        again = _collect(db, out, capsys)
        assert (again["collected"], again["already_collected"], again["renamed"]) == (0, 1, [])
    with open(out / "collected.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert [(r["image_id"], r["content_hash"]) for r in listed] == [
        ("00000001-img0001", hash_a), (tagged, hash_b)
    ]  # fmt: skip

    assert main(["edge", "collect", "--db", str(cam_b), "--out", str(out)]) == 0
    assert "0 image(s) collected, 1 already there" in capsys.readouterr().out
    cam_c, hash_c = _camera(tmp_path / "c", 120)  # the text summary names a tagged id too
    assert main(["edge", "collect", "--db", str(cam_c), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 image(s) collected" in text
    tagged_c = f"00000001-img0001-{hash_c[:8]}"
    assert f"1 collected under a tagged id (another image in --out had its id): {tagged_c}" in text


def test_a_tree_collected_before_content_hashes_were_listed(tmp_path, capsys):
    """A tree whose collected.csv has no content_hash column (written by an earlier version):
    its images, byte copies and converted PNGs alike, are still known as already there, and
    a new image is listed under the old columns."""
    folder = tmp_path / "cam"
    db, _ = _camera(folder, 40)
    store = ResultStore(db)
    turned = folder / "archive" / "turned.jpg"
    _tagged(turned, "RGB", 6, "JPEG")  # collected as a PNG of its pixels: not a byte copy
    store.record_ok(_arrival(2, str(turned)), 0.2, FINGERPRINT, {}, stored_path=str(turned))
    store.close()
    out = tmp_path / "review"
    assert _collect(db, out, capsys)["collected"] == 2
    listing = out / "collected.csv"
    with open(listing, newline="") as fh:
        rows = list(csv.DictReader(fh))
    old_columns = [c for c in rows[0] if c != "content_hash"]
    with open(listing, "w", newline="") as fh:
        writer = csv.DictWriter(fh, old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    again = _collect(db, out, capsys)
    assert (again["collected"], again["already_collected"]) == (0, 2)
    store = ResultStore(db)
    later = _image(folder / "archive" / "later.png")
    store.record_ok(_arrival(3, later), 0.3, FINGERPRINT, {}, stored_path=later)
    store.close()
    assert _collect(db, out, capsys)["collected"] == 1
    with open(listing, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == old_columns and len(list(reader)) == 3


def test_a_run_killed_before_it_listed_an_image_has_its_row_written_by_the_next(
    line, tmp_path, capsys
):
    """A crash review: `edge collect` killed between an image's annotation and its row in
    collected.csv left the image listed nowhere for good (every later run counted it as
    already collected): a defect's p(defect), boxes and needs_boxes mark were lost. And one
    killed while it wrote an annotation left its temporary file beside the others for good."""
    import os

    db, _, ids = line
    out = tmp_path / "review"
    _collect(db, out, capsys)
    listing = out / "collected.csv"
    rows = listing.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = (f"{ids['defect']:08d}-", f"{ids['flagged_clean']:08d}-")
    kept = [r for r in rows if not r.startswith(cut)]
    assert len(kept) == len(rows) - 2
    listing.write_text("".join(kept), encoding="utf-8")
    # the defect: killed after its annotation, before its row; the flagged one: while its
    # annotation was written (its temporary left, no annotation)
    annotations = out / "Annotations"
    annotation = annotations / f"{ids['defect']:08d}-scratched.xml"
    before = annotation.read_bytes()
    (annotations / f"{ids['flagged_clean']:08d}-unsure.xml").unlink()
    stale = annotations / f".{ids['flagged_clean']:08d}-unsure.xml.k2x9_q0a.tmp"
    fresh = annotations / f".{ids['ok']:08d}-good_part.xml.a1b2c3d4.tmp"  # another run's, now
    for temporary in (stale, fresh):
        temporary.write_bytes(b"<annotation>")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))

    summary = _collect(db, out, capsys)
    assert summary["collected"] == 1 and summary["already_collected"] == 2
    assert summary["relisted"] == [f"{ids['defect']:08d}-scratched"]
    with open(listing, newline="") as fh:
        listed = {int(r["result_id"]): r for r in csv.DictReader(fh)}
    assert set(listed) == {ids["ok"], ids["defect"], ids["flagged_clean"]}
    assert json.loads(listed[ids["defect"]]["scores"]) == [0.93, 0.71, 0.3]
    assert listed[ids["defect"]]["needs_boxes"] == "no"  # two boxes scored 0.5 or more
    assert annotation.read_bytes() == before  # its files left as they are
    assert not stale.exists() and fresh.exists()
    _collect(db, out, capsys)  # listed once: a third run adds no row
    assert len(listing.read_text(encoding="utf-8").splitlines()) == 4


def test_an_edited_listing_that_does_not_parse_gets_no_second_rows(line, tmp_path, capsys):
    """A review of the relisting: a hand-edited collected.csv with an unclosed quote (the rows
    after it swallowed by csv) had its images "relisted": each listed twice."""
    db = line[0]
    out = tmp_path / "review"
    _collect(db, out, capsys)
    listing = out / "collected.csv"
    lines = listing.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(1, '"a note\n')
    listing.write_text("".join(lines), encoding="utf-8")
    before = listing.read_text(encoding="utf-8")
    summary = _collect(db, out, capsys)
    assert summary["relisted"] == [] and summary["collected"] == 0
    assert listing.read_text(encoding="utf-8") == before


def test_a_killed_writes_temporary_annotation_goes_whatever_is_chosen(line, tmp_path, capsys):
    """The same review: a temporary annotation was removed only when its image was chosen again
    (not with another --limit or other filters)."""
    import os

    db = line[0]
    out = tmp_path / "review"
    _collect(db, out, capsys)
    stale = out / "Annotations" / ".00000099-never_chosen.xml.k2x9_q0a.tmp"
    stale.write_bytes(b"<annotation>")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    _collect(db, out, capsys, "--verdict", "ok")
    assert not stale.exists()
