"""`splitdet data merge SRC SRC... --out DIR`: one VOC tree holding every image, annotation and
split line of the sources, which `data check` passes and train reads whole; ids colliding
between sources refused (or prefixed with --prefix); never written into an existing dataset,
and never left half-made."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from splitdet.shared.atomic_file import _umask
from splitdet.shared.cli import main
from splitdet.training import voc, voc_merge

from support import make_tiny_voc


def _source(root: Path, seed: int, n_defective: int = 4, n_free: int = 2) -> Path:
    """A tiny VOC tree split train / val / test."""
    make_tiny_voc(root, n_defective=n_defective, n_free=n_free, seed=seed)
    ids = voc.read_split_ids(root, "train")
    defective, free = ids[:n_defective], ids[n_defective:]
    voc.write_split(root, "train", defective[:-2] + free[:-1])
    voc.write_split(root, "val", defective[-2:-1] + free[-1:])
    voc.write_split(root, "test", defective[-1:])
    return root


def _renamed(root: Path, tag: str) -> Path:
    """`root` with every id given the prefix `tag` (a source whose ids collide with none)."""
    for xml in sorted((root / "Annotations").glob("*.xml")):
        sample = voc.read_annotation(root, xml.stem)
        image = sample.image_path.with_name(tag + sample.image_path.name)
        sample.image_path.rename(image)
        xml.unlink()
        voc.write_annotation(
            root / "Annotations" / f"{tag}{xml.stem}.xml",
            voc.VocSample(tag + sample.image_id, image, sample.width, sample.height,
                          sample.objects),
        )  # fmt: skip
    for split in ("train", "val", "test"):
        voc.write_split(root, split, [tag + i for i in voc.read_split_ids(root, split)])
    return root


def _boxes(root: Path, split: str) -> list[tuple]:
    return sorted((s.image_path.read_bytes(), o.name, o.box)
                  for s in voc.read_split(root, split) for o in s.objects)  # fmt: skip


def _merge(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "merge", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".merging-" in p.name)


def test_two_trees_merge_into_one_that_checks_and_trains_whole(tmp_path, capsys):
    a = _source(tmp_path / "gaskets", seed=0)
    b = _renamed(_source(tmp_path / "review", seed=1, n_defective=3, n_free=1), "line_")
    out = tmp_path / "merged"

    code, text, err = _merge(capsys, str(a), str(b), "--out", str(out))

    assert code == 0, err
    for split in ("train", "val", "test"):
        assert voc.read_split_ids(out, split) == (
            voc.read_split_ids(a, split) + voc.read_split_ids(b, split)
        )
    # every box of both trains, on its own pixels (read as train reads it)
    assert _boxes(out, "train") == sorted(_boxes(a, "train") + _boxes(b, "train"))
    assert len(_boxes(out, "train")) > 0
    for xml in (out / "Annotations").glob("*.xml"):  # <filename> names the merged image
        sample = voc.read_annotation(out, xml.stem)
        assert sample.filename == sample.image_path.name and sample.image_path.parent == (
            out / "JPEGImages"
        )
    assert f"{a}: train 3, val 2, test 1" in text and f"{b}: train 1, val 2, test 1" in text
    assert "merged: train 4, val 4, test 2" in text and "classes (boxes): scratch" in text
    assert f"{out}: 10 images (hard-linked), 10 annotations from 2 sources" in text
    merged_image = next((out / "JPEGImages").iterdir())
    assert merged_image.stat().st_nlink == 2  # (tmp_path: one file system)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0o700
    assert f"next: splitdet data check {out}" in text
    assert _leftovers(tmp_path) == []

    report_path = tmp_path / "report.json"
    code = main(["data", "check", str(out), "--no-progress", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 0 and report["problems"] == [], report["problems"]
    assert report["annotations"] == report["images"] == 6 + 4
    assert {s: report["splits"][s]["images"] for s in ("train", "val", "test")} == {
        "train": 4, "val": 4, "test": 2
    }  # fmt: skip


def test_colliding_ids_are_refused_by_name_and_prefix_merges_them(tmp_path, capsys):
    a = _source(tmp_path / "gaskets", seed=0)
    b = _source(tmp_path / "review", seed=1, n_defective=3, n_free=1)  # img_000..img_003
    out = tmp_path / "merged"

    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 2 and "4 image id(s) in more than one source" in err
    assert f"'img_000' ({a} and {b})" in err and "--prefix" in err
    assert not out.exists() and _leftovers(tmp_path) == []

    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out), "--prefix")
    assert code == 0, err
    train = voc.read_split_ids(out, "train")
    assert train == ["gaskets_" + i for i in voc.read_split_ids(a, "train")] + [
        "review_" + i for i in voc.read_split_ids(b, "train")
    ]
    assert (out / "JPEGImages" / "review_img_000.png").read_bytes() == (
        b / "JPEGImages" / "img_000.png"
    ).read_bytes()
    assert voc.read_annotation(out, "review_img_000").filename == "review_img_000.png"
    assert main(["data", "check", str(out), "--no-progress"]) == 0


def test_an_existing_out_is_never_written_into(tmp_path, capsys):
    a = _source(tmp_path / "a", seed=0)
    b = _renamed(_source(tmp_path / "b", seed=1), "b_")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 2 and f"--out {out}: exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    (out / "notes.txt").unlink()  # an empty folder is filled
    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 0, err
    assert len(voc.read_split_ids(out, "train")) == 6

    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))  # the merged one now
    assert code == 2 and "exists and is not empty" in err


def test_a_malformed_source_names_its_file_and_leaves_no_out(tmp_path, capsys):
    a = _source(tmp_path / "a", seed=0)
    b = _renamed(_source(tmp_path / "b", seed=1), "b_")
    bad = b / "Annotations" / "b_img_001.xml"
    bad.write_text("<annotation><size>")
    out = tmp_path / "merged"

    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 2 and "Traceback" not in err
    assert f"{bad}: malformed XML" in err and f"splitdet data check {b}" in err
    assert not out.exists() and _leftovers(tmp_path) == []

    bad.unlink()  # a source without split files: `data split` writes them
    for split in ("train", "val", "test"):
        (b / "ImageSets" / "Main" / f"{split}.txt").unlink()
    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 2 and "no split file" in err and f"splitdet data split {b}" in err
    assert not out.exists()


def test_a_failure_while_writing_leaves_no_out(tmp_path, capsys, monkeypatch):
    a = _source(tmp_path / "a", seed=0)
    b = _renamed(_source(tmp_path / "b", seed=1), "b_")
    out = tmp_path / "merged"
    written = []
    real = voc_merge.atomic_write

    def failing(path, data, **kwargs):
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(path)
        real(path, data, **kwargs)

    monkeypatch.setattr(voc_merge, "atomic_write", failing)
    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 2 and "No space left on device" in err and len(written) == 5
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_source_holding_another_s_images_or_an_out_inside_a_source_is_refused(
    tmp_path, capsys, monkeypatch
):
    """A source merged earlier from another holds its images as hard links: merged again with
    it, each would be in the tree twice (two ids, counted twice in a split). An --out inside
    a source would change it; the current folder as --out cannot be replaced."""
    a = _source(tmp_path / "gaskets", seed=0)
    b = _renamed(_source(tmp_path / "review", seed=1, n_defective=3, n_free=1), "line_")
    first = tmp_path / "first"
    assert _merge(capsys, str(a), str(b), "--out", str(first))[0] == 0

    code, _, err = _merge(capsys, str(a), str(first), "--out", str(tmp_path / "again"))
    assert code == 2 and "are the same image (one file, linked)" in err, err
    assert f"{first} holds images of {a}" in err
    assert not (tmp_path / "again").exists()

    copied = tmp_path / "copied"  # a merge onto another file system copies; so does cp -r
    shutil.copytree(first, copied)
    code, _, err = _merge(capsys, str(copied), str(a), "--out", str(tmp_path / "again"))
    assert code == 2 and "are the same image (the same bytes)" in err, err
    assert f"{a} holds images of {copied}" in err

    inside = a / "JPEGImages" / "merged"
    code, _, err = _merge(capsys, str(a), str(b), "--out", str(inside))
    assert code == 2 and f"--out {inside}: inside the source {a}" in err, err
    assert not inside.exists()

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, _, err = _merge(capsys, str(a), str(b), "--out", ".")
    assert code == 2 and "--out .: the current folder" in err, err
    assert list(here.iterdir()) == []


def test_a_failed_merge_removes_the_folders_it_made_for_out(tmp_path, capsys, monkeypatch):
    a = _source(tmp_path / "gaskets", seed=0)
    b = _renamed(_source(tmp_path / "review", seed=1, n_defective=3, n_free=1), "line_")
    out = tmp_path / "new" / "deeper" / "merged"

    def no_room(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(voc_merge.voc, "write_split", no_room)
    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out))
    assert code == 2 and "No space left on device" in err, err
    assert not (tmp_path / "new").exists()


def test_annotations_keep_what_the_sources_wrote_but_the_image_they_name(tmp_path, capsys):
    """Merge wrote every annotation anew with the fields splitdet reads: a labelling tool's
    pose, truncated, its own tags and boxes off the integer grid were lost. Now only <folder>
    and <filename> change, to name the merged image (with --prefix, the prefixed one)."""
    a = _source(tmp_path / "gaskets", seed=0)
    b = _source(tmp_path / "review", seed=1)
    xml = a / "Annotations" / "img_000.xml"
    document = xml.read_text()
    document = document.replace("<folder>JPEGImages</folder>", "")  # (a tool that writes none)
    document = document.replace("<pose>Unspecified</pose>", "<pose>Left</pose>", 1)
    document = document.replace("<truncated>0</truncated>", "<truncated>1</truncated>", 1)
    document = document.replace("</bndbox>", "</bndbox><attributes><occluded>yes</occluded>"
                                "</attributes>", 1)  # fmt: skip
    document = re.sub(r"<xmin>\d+</xmin>", "<xmin>12.5</xmin>", document, count=1)
    xml.write_text(document)
    source = voc.read_annotation(a, "img_000")
    out = tmp_path / "merged"

    code, _, err = _merge(capsys, str(a), str(b), "--prefix", "--out", str(out))

    assert code == 0, err
    merged_xml = (out / "Annotations" / "gaskets_img_000.xml").read_text()
    for kept in ("<pose>Left</pose>", "<truncated>1</truncated>", "<occluded>yes</occluded>",
                 "<xmin>12.5</xmin>"):  # fmt: skip
        assert kept in merged_xml, merged_xml
    assert "<folder>JPEGImages</folder>" in merged_xml
    assert "<filename>gaskets_img_000.png</filename>" in merged_xml
    merged = voc.read_annotation(out, "gaskets_img_000")
    assert merged.objects == source.objects and merged.filename == merged.image_path.name
