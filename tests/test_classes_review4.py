"""A quality engineer's several defect classes (scratch, dent, ``pit défaut``, a ``crack`` seen
only in val/test), as the faults were reproduced:

1. `data check` and `train` advised leaving a class held only outside train's boxes "out of
   --classes", which train then refused (its objects are of an unknown class): the advice now
   says to relabel or remove its objects too, and names the annotations holding them;
2. ``--classes`` typed in NFD (a Mac) against NFC annotations gave problems and warnings that
   printed the two names alike: they now say the names differ only in their Unicode form,
   both escaped;
3. annotated images drew non-ASCII class names as missing-glyph boxes, and a label of a box at
   the top over the ``p(defect)`` text;
4. `edge results --csv` wrote the list columns' non-ASCII names as ``\\u`` escapes;
5. `edge collect`'s ``collected.csv`` had labels but no class names;
6. a manifest whose top-level ``class_names`` was edited loaded silently.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from splitdet.shared.cli import main
from splitdet.training import voc

from support import make_tiny_voc

NFC = "pit d\u00e9faut"
NFD = unicodedata.normalize("NFD", NFC)


def _check(root: Path, capsys, *options: str) -> dict:
    out = root.parent / "report.json"
    main(["data", "check", str(root), "--no-progress", "--json", str(out), *options])
    capsys.readouterr()
    return json.loads(out.read_text())


def _rename_class(root: Path, image_id: str, name: str) -> None:
    path = root / "Annotations" / f"{image_id}.xml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("<name>scratch</name>", f"<name>{name}</name>"), "utf-8")


def _crack_in_val_only(tmp_path: Path) -> Path:
    """Eight images: 'crack' boxed in a val and a test image only, scratches elsewhere."""
    root = make_tiny_voc(tmp_path / "d")
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", ids[2:7])
    voc.write_split(root, "val", [ids[0], ids[7]])
    voc.write_split(root, "test", [ids[1]])
    for image_id in ids[:2]:
        _rename_class(root, image_id, "crack")
    return root


# ---------------------------------------------- 1: the advice for a class with no train box


def test_a_class_only_outside_train_is_advised_to_be_relabelled_where_it_is(tmp_path, capsys):
    """Leaving 'crack' out of --classes alone made train refuse img_000.xml's object."""
    root = _crack_in_val_only(tmp_path)
    report = _check(root, capsys, "--classes", "scratch,crack")
    (warning,) = [w for w in report["warnings"] if "no box of class 'crack'" in w]
    assert (
        "or leave it out of --classes and relabel or remove its objects in "
        f"{root / 'Annotations'}: img_000.xml, img_001.xml (train and eval refuse an object "
        "of a class --classes does not name)"
    ) in warning, warning

    # the advice followed: left out, its objects relabelled, the dataset checks clean
    for image_id in ("img_000", "img_001"):
        path = root / "Annotations" / f"{image_id}.xml"
        path.write_text(path.read_text().replace("<name>crack<", "<name>scratch<"))
    report = _check(root, capsys, "--classes", "scratch")
    assert report["problems"] == [] and report["warnings"] == [], report


def test_train_names_the_annotations_holding_a_class_it_has_no_box_of(tmp_path):
    """The warning train logs (`run_checks.untrained_classes`) names them too, a few and how
    many more."""
    from splitdet.training.run_checks import untrained_classes

    root = make_tiny_voc(tmp_path / "d", n_defective=6)
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", ids[5:])
    for image_id in ids[:5]:
        _rename_class(root, image_id, "crack")
    train = voc.read_split(root, "train", ("scratch", "crack"))
    warning = untrained_classes(("scratch", "crack"), root, train)
    assert warning is not None
    assert (
        f"relabel or remove its objects in {root / 'Annotations'}: img_000.xml, img_001.xml, "
        "img_002.xml and 2 more (train"
    ) in warning, warning


# --------------------------------------------- 2: --classes in another Unicode form (NFD)


def test_an_unknown_class_differing_only_in_its_unicode_form_says_so(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "d")
    _rename_class(root, "img_000", NFC)

    with pytest.raises(voc.VocError) as caught:
        voc.read_annotation(root, "img_000", ("scratch", NFD))
    hint = (
        f"{NFD!a} differs from the class {NFC!a} only in its Unicode form (NFD "
        "against NFC): type it as the annotations spell it"
    )
    assert str(caught.value).endswith(hint), caught.value
    assert "'pit de\\u0301faut'" in hint  # escaped: printed, the two look alike

    report = _check(root, capsys, "--classes", f"scratch,{NFD}")
    unknown = [p for p in report["problems"] if "unknown class" in p]
    assert unknown and all(p.endswith(hint) for p in unknown), unknown
    (nowhere,) = [w for w in report["warnings"] if "in no annotation of the dataset" in w]
    assert f"remove it from --classes, or label some; but {hint}" in nowhere, nowhere


def test_an_unknown_class_of_another_name_has_no_unicode_hint(tmp_path):
    root = make_tiny_voc(tmp_path / "d")
    _rename_class(root, "img_000", NFC)
    with pytest.raises(voc.VocError) as caught:
        voc.read_annotation(root, "img_000", ("scratch", "pit"))
    assert str(caught.value).endswith("(expected one of pit, scratch)"), caught.value


# ----------------------------------------------- 3: labels in annotated images (Pillow's font)


def _gray(height: int = 120, width: int = 300):
    import numpy as np

    return np.full((3, height, width), 0.5, np.float32)


def _font_draws(char: str) -> bool:
    """Whether Pillow's default font has a glyph for ``char`` (it draws otherwise than a
    character no font has)."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    return bytes(font.getmask(char)) != bytes(font.getmask("\uffff"))


@pytest.mark.parametrize("name", [NFC, "Kratzer-\u00e4", "Ma\u00df", "\u65e5\u672c"])
def test_a_class_name_the_font_lacks_is_drawn_escaped_not_as_boxes(name):
    """Drawn with Pillow's default font, ``é`` was a missing-glyph box, like every character
    the font lacks: "pit d□faut". Each is drawn as its escape now, as the ASCII text."""
    from splitdet.edge.annotate import draw_detections

    lacking = [c for c in name if not c.isascii() and not _font_draws(c)]
    if not lacking:
        pytest.skip(f"this Pillow's default font draws every character of {name!r}")
    shown = "".join(ascii(c)[1:-1] if c in lacking else c for c in name)
    box = [[10, 30, 140, 100]]
    drawn = draw_detections(_gray(), box, [0.9], [name], 0.97)
    assert drawn.tobytes() == draw_detections(_gray(), box, [0.9], [shown], 0.97).tobytes()


def test_a_label_is_kept_off_the_p_defect_text(tmp_path):
    """A box near the image's top put its label (above it, clamped to row 0) over the
    p(defect) text drawn at (8, 8)."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    from splitdet.edge.annotate import draw_detections

    box, outline = [20, 2, 200, 110], 2  # (the outline's width at this size)
    with_label = np.asarray(draw_detections(_gray(), [box], [0.9], ["scratch"], 0.97))
    p_only = np.asarray(draw_detections(_gray(), [], [], [], 0.97))
    probe = ImageDraw.Draw(draw_detections(_gray(), [], [], []))
    x1, y1, x2, y2 = probe.textbbox((8, 8), "p(defect) 0.970", font=ImageFont.load_default())
    region = np.zeros(p_only.shape[:2], bool)
    region[y1:y2, x1:x2] = True
    region[:, box[0] : box[0] + outline] = False  # the box's own outline crosses it
    region[box[1] : box[1] + outline, :] = False
    assert region.any() and (with_label[region] == p_only[region]).all()


# ------------------------------------------ 4 and 5: edge results --csv, edge collect's listing


def _image_file(path: Path) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (96, 64), 77).save(path)
    return str(path)


def _arrival(n: int, path: str):
    import hashlib
    import time

    from splitdet.edge.store import Arrival

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Arrival(path, f"{Path(path).name}|1|{n}|{n}", digest, 1, time.time())


def _two_exports_store(tmp_path: Path) -> Path:
    """A store holding a defect of each of two exports, whose label 1 names another class:
    'pit défaut' for the first, 'scratch' for the second."""
    from splitdet.edge.store import Answer, ResultStore

    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    for n, (fingerprint, name) in enumerate((("a" * 64, NFC), ("b" * 64, "scratch")), 1):
        path = _image_file(tmp_path / "archive" / f"part {n}.png")
        row, _, _ = store.record_pending(
            _arrival(n, path), 0.9, f"r{n}", b"x", fingerprint, {}, stored_path=path
        )
        answer = Answer(boxes=[[10.0, 10.0, 40.0, 30.0]], scores=[0.9], labels=[1],
                        class_names=[name])  # fmt: skip
        assert store.complete(row, answer)
    store.close()
    return db


def test_results_csv_writes_class_names_in_utf8_and_json_stays_ascii(tmp_path, capsys):
    import csv
    import io

    db = _two_exports_store(tmp_path)
    assert main(["edge", "results", "--db", str(db), "--csv"]) == 0
    text = capsys.readouterr().out
    assert '"[""pit d\u00e9faut""]"' in text and "\\u00e9" not in text, text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [json.loads(r["class_names"]) for r in rows] == [[NFC], ["scratch"]]

    assert main(["edge", "results", "--db", str(db), "--json"]) == 0  # documented: ASCII
    out = capsys.readouterr().out
    assert out.isascii() and json.loads(out)[0]["class_names"] == [NFC]


def test_collected_csv_names_each_box_class_last(tmp_path, capsys):
    """Label 1 is 'pit défaut' in one row and 'scratch' in the other: only the class names
    say so. The column comes last: readers by column index keep theirs."""
    import csv

    from splitdet.edge.collect import LISTING_COLUMNS

    db = _two_exports_store(tmp_path)
    out = tmp_path / "review"
    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    capsys.readouterr()
    text = (out / "collected.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0].split(",") == list(LISTING_COLUMNS)
    assert LISTING_COLUMNS[-2:] == ("class_names", "edge") and LISTING_COLUMNS[:-2] == (
        "image_id", "result_id", "source", "verdict", "p_defect", "fingerprint", "boxes",
        "scores", "labels", "content_hash", "needs_boxes",
    )  # fmt: skip
    rows = list(csv.DictReader(text.splitlines()))
    assert [(json.loads(r["labels"]), json.loads(r["class_names"])) for r in rows] == [
        ([1], [NFC]),
        ([1], ["scratch"]),
    ]
    assert "pit d\u00e9faut" in text  # UTF-8 as the file is, not \u escapes


def test_a_listing_written_before_class_names_gains_the_column_at_its_end(tmp_path, capsys):
    import csv

    from splitdet.edge.store import Answer, ResultStore

    db = _two_exports_store(tmp_path)
    out = tmp_path / "review"
    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    listing = out / "collected.csv"
    rows = list(csv.DictReader(listing.read_text(encoding="utf-8").splitlines()))
    old = [c for c in rows[0] if c != "class_names"]
    with open(listing, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    store = ResultStore(db)
    path = _image_file(tmp_path / "archive" / "part 3.png")
    row, _, _ = store.record_pending(_arrival(3, path), 0.9, "r3", b"x", "b" * 64, {},
                                     stored_path=path)  # fmt: skip
    assert store.complete(row, Answer([[1.0, 1.0, 9.0, 9.0]], [0.8], [2], ["dent"]))
    store.close()
    capsys.readouterr()

    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    listed = list(csv.DictReader(listing.read_text(encoding="utf-8").splitlines()))
    assert list(listed[0]) == [*old, "class_names"]
    assert [r["class_names"] for r in listed] == [None, None, '["dent"]']


# ------------------------------------------------- 6: the manifest's top-level class_names


def _manifest_dir(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """A model directory as `write_manifest` writes it, over stand-in artifact files (read
    and hashed, never run)."""
    from splitdet.shared.config import ModelConfig
    from splitdet.shared.manifest import artifacts_for, write_manifest

    config = ModelConfig(class_names=names)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in artifacts_for(config):
        (model_dir / name).write_bytes(name.encode())
    write_manifest(model_dir, config, 0.5, "int8")
    return model_dir


@pytest.mark.parametrize("verify", [True, False])
def test_a_manifest_whose_top_level_class_names_were_edited_is_refused(tmp_path, verify):
    """Outside the fingerprint, an edited list loaded silently while predictions kept
    model_config's names."""
    from splitdet.shared.manifest import MANIFEST_NAME, ManifestError, read_manifest

    model_dir = _manifest_dir(tmp_path, ("stain", "crack", NFC))
    assert read_manifest(model_dir, verify=verify).class_names == ("stain", "crack", NFC)
    path = model_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["class_names"] = ["crack", "stain", NFC]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as refused:
        read_manifest(model_dir, verify=verify)
    assert str(refused.value) == (
        f'{path}: class_names ["crack", "stain", "{NFC}"] differ from model_config\'s '
        f'class_names ["stain", "crack", "{NFC}"] (which predictions are named by, and the '
        "fingerprint covers): the manifest was edited; re-export the model, or restore the "
        "manifest.json export wrote"
    )

    data["class_names"] = ["stain", "crack", NFD]  # printed alike: escaped
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"pit de\\u0301faut.*pit d\\u00e9faut"):
        read_manifest(model_dir, verify=verify)

    del data["class_names"]  # none at the top: model_config's are the names
    path.write_text(json.dumps(data))
    assert read_manifest(model_dir, verify=verify).class_names == ("stain", "crack", NFC)
