"""`splitdet data check` lists every problem of a VOC dataset at once; `splitdet data split`
writes stratified, reproducible train/val/test files (and empty annotations for unboxed images)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from splitdet.shared.cli import main
from splitdet.training import voc

from support import make_tiny_voc


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A clean tiny VOC tree: 6 defective + 3 defect-free images, split into train/val/test."""
    root = make_tiny_voc(tmp_path / "voc", n_defective=6, n_free=3)
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", ids[:4] + ids[6:8])
    voc.write_split(root, "val", ids[4:5] + ids[8:])
    voc.write_split(root, "test", ids[5:6])
    return root


def _check(root: Path, capsys, *options: str) -> tuple[int, dict, str]:
    out = root.parent / "report.json"
    code = main(["data", "check", str(root), "--no-progress", "--json", str(out), *options])
    text = capsys.readouterr().out
    return code, json.loads(out.read_text()), text


def test_a_clean_dataset_passes_and_is_summed_up(dataset, capsys):
    code, report, text = _check(dataset, capsys, "--decode")
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["annotations"] == report["images"] == 9
    assert report["splits"]["train"] == {
        "images": 6,
        "unreadable": 0,
        "defective": 4,
        "defect_free": 2,
        "objects": {"scratch": sum(voc.read_annotation(dataset, i).objects.__len__()
                                   for i in voc.read_split_ids(dataset, "train"))},
        "difficult": 0,
    }  # fmt: skip
    assert report["splits"]["val"]["defective"] == 1 and report["splits"]["test"]["images"] == 1
    assert report["image_sizes"] == {"160x128": 9}
    assert "ok, 0 warning(s)" in text


def test_every_problem_is_listed_at_once_naming_its_file(dataset, capsys):
    """Train stops at the first of these; check names all six in one run."""
    images, annotations = dataset / "JPEGImages", dataset / "Annotations"
    (annotations / "img_001.xml").write_text("<annotation><size>")  # malformed
    truncated = images / "img_002.png"
    truncated.write_bytes(truncated.read_bytes()[:400])  # header fine, body cut
    outside = annotations / "img_003.xml"
    outside.write_text(outside.read_text().replace("<xmax>", "<xmax>9", 1))
    Image.new("RGB", (160, 128)).save(images / "unboxed.png")  # no annotation at all
    with open(dataset / "ImageSets" / "Main" / "val.txt", "a") as fh:
        fh.write("img_000\nghost\n")  # leak from train, and an id with no annotation

    code, report, text = _check(dataset, capsys)
    header_only = report["problems"]
    code_decoded, report, text = _check(dataset, capsys, "--decode")
    problems = report["problems"]

    assert code == code_decoded == 1 and not report["ok"]
    expected = [
        f"{images / 'unboxed.png'}: no annotation",
        f"{annotations / 'img_001.xml'}: malformed XML",
        f"{truncated}: cannot decode image",
        f"{outside}: <object> #1 box",
        "val.txt: lists 'img_000', also in train.txt",
        "val.txt: lists 'ghost', which has no Annotations/ghost.xml",
    ]
    for needle in expected:
        assert sum(needle in line for line in problems) == 1, (needle, problems)
    assert len(problems) == len(expected)
    assert not any(str(truncated) in line for line in header_only)  # only decoding finds it
    assert "6 problem(s)" in text and "problem: " in text


def test_classes_and_warnings(dataset, capsys):
    code, report, _ = _check(dataset, capsys, "--classes", "dent")
    assert code == 1 and all("unknown class 'scratch'" in p for p in report["problems"])
    assert len(report["problems"]) == 6  # every defective image, not only the first
    assert report["splits"]["train"]["unreadable"] == 4

    clicked = voc.read_annotation(dataset, "img_000")
    thin = voc.VocObject("scratch", (5.0, 5.0, 60.0, 6.0))  # 1 px thin but long: a scratch
    dot = voc.VocObject("scratch", (5.0, 9.0, 6.0, 10.0))  # 1x1 px: a stray click
    voc.write_annotation(
        dataset / "Annotations" / "img_000.xml",
        voc.VocSample("img_000", clicked.image_path, 160, 128, (thin, dot)),
    )
    (dataset / "ImageSets" / "Main" / "val.txt").unlink()
    voc.write_split(dataset, "train", voc.read_split_ids(dataset, "train")[:4])
    code, report, _ = _check(dataset, capsys)
    assert code == 0  # warnings do not fail the check
    warnings = "\n".join(report["warnings"])
    assert "val.txt: split file not found" in warnings
    assert "train.txt: no defect-free image" in warnings
    assert "annotated image(s) in no split" in warnings and len(report["unlisted"]) == 4
    assert "img_000.xml: a 'scratch' box of 1x1 px" in warnings
    assert len(report["warnings"]) == 4  # the long 1-px one is not a stray click


def test_not_a_dataset_is_one_clear_line(tmp_path, capsys):
    code = main(["data", "check", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and f"{tmp_path / 'Annotations'}: folder not found" in out
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def _tool_export(tmp_path: Path) -> Path:
    """What an annotation tool leaves: boxes for defective images only, no split files."""
    root = make_tiny_voc(tmp_path / "tool", n_defective=12, n_free=8)
    shutil.rmtree(root / "ImageSets")
    for image_id in [f"img_{k:03d}" for k in range(12, 20)]:
        (root / "Annotations" / f"{image_id}.xml").unlink()
    return root


def test_split_writes_empty_annotations_and_stratified_reproducible_splits(tmp_path, capsys):
    root = _tool_export(tmp_path)
    args = ["data", "split", str(root), "--val", "0.25", "--test", "0.25", "--json"]
    assert main([*args, "--write-empty"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["empty_annotations_written"]) == 8
    assert voc.read_annotation(root, "img_015").objects == ()  # a defect-free image now
    assert voc.read_annotation(root, "img_015").width == 160

    splits = {s: voc.read_split(root, s) for s in ("train", "val", "test")}
    ids = [s.image_id for samples in splits.values() for s in samples]
    assert sorted(ids) == [f"img_{k:03d}" for k in range(20)]  # each image exactly once
    kinds = {s: Counter(x.is_defective for x in samples) for s, samples in splits.items()}
    assert kinds["train"] == {True: 6, False: 4}
    assert kinds["val"] == kinds["test"] == {True: 3, False: 2}

    assert main([*args]) == 2  # the files exist now
    assert "already holds train.txt, val.txt, test.txt (--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == first["splits"]  # same seed
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] != first["splits"]

    code, report, _ = _check(root, capsys)
    assert code == 0 and report["unlisted"] == []


def test_split_writes_nothing_when_an_annotation_is_broken(tmp_path, capsys):
    root = _tool_export(tmp_path)
    (root / "Annotations" / "img_003.xml").write_text("not xml")
    assert main(["data", "split", str(root), "--write-empty"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'Annotations' / 'img_003.xml'}: malformed XML" in err
    assert "Traceback" not in err
    assert not (root / "ImageSets").exists()
    assert not (root / "Annotations" / "img_015.xml").exists()  # no empty annotation either


def test_split_keeps_a_rare_class_in_every_split(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "voc", n_defective=12, n_free=4)
    for k in (0, 1, 2):  # three images of a rare class, besides nine of scratches
        path = root / "Annotations" / f"img_{k:03d}.xml"
        path.write_text(path.read_text().replace("<name>scratch</name>", "<name>dent</name>"))
    assert main(["data", "split", str(root), "--overwrite", "--val", "0.34", "--test", "0.34"]) == 0
    for split in ("train", "val", "test"):
        names = {o.name for s in voc.read_split(root, split) for o in s.objects}
        assert "dent" in names, split


def test_train_points_at_data_check(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=1)
    (root / "Annotations" / "img_001.xml").write_text("<annotation>")
    code = main(["train", "--data", str(root), "--out", str(tmp_path / "run"), "--preset",
                 "tiny", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "malformed XML" in err
    assert f"`splitdet data check {root}` lists every problem at once" in err


def test_split_add_keeps_every_earlier_assignment(tmp_path, capsys):
    root = _tool_export(tmp_path)
    assert main(["data", "split", str(root), "--write-empty", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["splits"]
    for k in range(20, 30):  # new images from the line, defective and defect-free
        src = root / "Annotations" / f"img_{k % 20:03d}.xml"
        sample = voc.read_annotation(root, src.stem)
        image = root / "JPEGImages" / f"new_{k}.png"
        shutil.copyfile(sample.image_path, image)
        voc.write_annotation(
            root / "Annotations" / f"new_{k}.xml",
            voc.VocSample(f"new_{k}", image, sample.width, sample.height, sample.objects),
        )
    assert main(["data", "split", str(root), "--add", "--json", "--seed", "5"]) == 0
    after = json.loads(capsys.readouterr().out)
    for split, ids in before.items():
        assert after["splits"][split][: len(ids)] == ids  # nothing moved
    new = [i for split in after["splits"].values() for i in split if i.startswith("new_")]
    assert sorted(new) == sorted(f"new_{k}" for k in range(20, 30))
    assert sum(after["added"].values()) == 10 and after["added"]["val"] >= 1
    with pytest.raises(SystemExit):  # one or the other
        main(["data", "split", str(root), "--add", "--overwrite"])
    assert "--overwrite: not allowed with argument --add" in capsys.readouterr().err


def _rename_class(root: Path, ids, name: str) -> None:
    for image_id in ids:
        path = root / "Annotations" / f"{image_id}.xml"
        path.write_text(path.read_text().replace("<name>scratch</name>", f"<name>{name}</name>"))


def test_classes_train_would_refuse_are_named_with_the_option(dataset, tmp_path, capsys):
    _rename_class(dataset, ["img_000"], "dent")
    code, report, _ = _check(dataset, capsys)
    assert code == 0  # the data is fine; the training command needs the option
    assert any("train with --classes dent,scratch" in w for w in report["warnings"])
    assert "give every class the dataset holds with --classes" in voc.check_hint(
        voc.VocError("x.xml: <object> #1 has unknown class 'dent'"), dataset
    )
    truncated = voc.check_hint(voc.VocError("a.png: cannot decode image: truncated"), dataset)
    assert f"`splitdet data check {dataset} --decode`" in truncated


def test_split_files_that_would_fail_later_are_problems(dataset, capsys):
    main_dir = dataset / "ImageSets" / "Main"
    (main_dir / "test.txt").unlink()
    (main_dir / "train.txt").write_text("")
    code, report, _ = _check(dataset, capsys)
    assert code == 1
    assert [p for p in report["problems"] if "train.txt" in p] == [
        f"{main_dir / 'train.txt'}: lists no image to train on"
    ]
    assert any("test.txt: no held-out image" in w for w in report["warnings"])

    (main_dir / "train.txt").write_text("img_000\n#hidden\nimg\\001\n")  # a Windows path
    code, report, _ = _check(dataset, capsys)
    assert [p for p in report["problems"] if "train.txt" in p] == [
        f"{main_dir / 'train.txt'}:3: image id 'img\\\\001' holds a path separator"
    ]  # and no follow-on "train.txt: split file not found" nor "in no split"
    assert not any("no split" in w for w in report["warnings"])


def test_images_named_by_filename_other_cases_and_fifos(dataset, capsys):
    images, annotations = dataset / "JPEGImages", dataset / "Annotations"
    (images / "img_000.png").rename(images / "photo0.png")  # annotation names it in <filename>
    xml = annotations / "img_000.xml"
    xml.write_text(xml.read_text().replace("img_000.png", "photo0.png"))
    (images / "img_001.png").rename(images / "img_001.Png")
    twin = annotations / "img_002.xml"
    (annotations / "copy_of_2.xml").write_text(twin.read_text())  # the same image twice
    (annotations / "img_003.xml").rename(annotations / "img_003.XML")
    os.mkfifo(annotations / "pipe.xml")

    assert _check(dataset, capsys)[0] == 1
    problems = "\n".join(_check(dataset, capsys)[1]["problems"])
    assert "photo0.png: no annotation" not in problems
    assert "img_001" not in problems  # .Png is found
    assert f"{images / 'img_002.png'}: the image of 2 annotations (copy_of_2, img_002)" in problems
    assert f"{annotations / 'img_003.XML'}: name it img_003.xml" in problems
    assert f"{annotations / 'pipe.xml'}: cannot read annotation: not a regular file" in problems
    (annotations / "pipe.xml").unlink()
    (annotations / "copy_of_2.xml").unlink()

    shutil.rmtree(dataset / "ImageSets")
    (annotations / "img_003.XML").rename(annotations / "img_003.xml")
    assert main(["data", "split", str(dataset), "--write-empty", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["empty_annotations_written"] == []
    assert not (annotations / "photo0.xml").exists()  # a defective image, not a defect-free one


def test_split_refuses_ids_a_split_file_cannot_hold_and_writes_nothing(tmp_path, capsys):
    root = _tool_export(tmp_path)
    for bad in ("my part", "#4"):
        shutil.copyfile(root / "JPEGImages" / "img_000.png", root / "JPEGImages" / f"{bad}.png")
        sample = voc.read_annotation(root, "img_000")
        voc.write_annotation(
            root / "Annotations" / f"{bad}.xml",
            voc.VocSample(bad, root / "JPEGImages" / f"{bad}.png", 160, 128, sample.objects),
        )
    assert main(["data", "split", str(root), "--write-empty"]) == 2
    err = capsys.readouterr().err
    assert "; rename it (and 1 more; `splitdet data check` lists all)" in err
    assert not (root / "ImageSets").exists()
    assert not (root / "Annotations" / "img_015.xml").exists()
    problems = "\n".join(_check(root, capsys)[1]["problems"])
    assert "'my part' holds white space" in problems
    assert "'#4' starts with '#'" in problems


def test_split_gives_val_a_defective_image_and_refuses_an_empty_train(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "voc", n_defective=10, n_free=20)
    shutil.rmtree(root / "ImageSets")
    for k in range(5):  # five classes of two images each
        _rename_class(root, [f"img_{2 * k:03d}", f"img_{2 * k + 1:03d}"], f"class{k}")
    for seed in range(5):
        assert main(["data", "split", str(root), "--overwrite", "--seed", str(seed)]) == 0
        for split in ("val", "test"):
            assert any(s.is_defective for s in voc.read_split(root, split)), (seed, split)
        capsys.readouterr()
    assert main(["data", "split", str(root), "--overwrite", "--val", "0.5", "--test", "0.49"]) == 2
    assert "leave none of the 30 images to train on" in capsys.readouterr().err


def test_validation_subset_keeps_a_rare_defective_image():
    from splitdet.training.train import _validation_subset

    def sample(k: int) -> voc.VocSample:
        objects = (voc.VocObject("scratch", (0.0, 0.0, 2.0, 2.0)),) if k == 1 else ()
        return voc.VocSample(f"i{k}", Path("i.png"), 4, 4, objects)

    samples = [sample(k) for k in range(120)]
    assert not any(s.is_defective for s in voc.evenly_spaced(samples, 60))  # the old choice
    subset = _validation_subset(samples, 60)
    assert len(subset) == 60 and sum(s.is_defective for s in subset) == 1
    assert subset == sorted(subset, key=samples.index)  # in the split's order


def _reviewed_dataset(tmp_path: Path) -> Path:
    """Nine images, at a path with a space: 'Pit mark' boxed in a val image only, 'dent' in a
    train image, scratches in the others."""
    root = make_tiny_voc(tmp_path / "my data", n_defective=6, n_free=3)
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", ids[1:4] + ids[6:8])
    voc.write_split(root, "val", ids[:1] + ids[4:5] + ids[8:])
    voc.write_split(root, "test", ids[5:6])
    _rename_class(root, ["img_000"], "Pit mark")
    _rename_class(root, ["img_001"], "dent")
    return root


def test_a_class_with_no_box_to_train_on_is_a_warning_naming_it(tmp_path, capsys):
    """It passed silently: the model would never learn to detect it."""
    root = _reviewed_dataset(tmp_path)
    train_txt = root / "ImageSets" / "Main" / "train.txt"
    code, report, text = _check(root, capsys, "--classes", "scratch,dent,Pit mark,rust")
    assert code == 0 and report["problems"] == []  # a warning: train and eval would run
    assert report["warnings"] == [
        f"{train_txt}: class 'rust' is in no annotation of the dataset at all: the model will "
        "never learn to detect it; remove it from --classes, or label some; and no box of "
        "class 'Pit mark' to train on (the dataset holds 1 'Pit mark' elsewhere: in val, "
        "test, in no split, or marked difficult, which training skips): the model will not "
        "learn to detect it; list images holding it in train.txt (`splitdet data split "
        f"'{root}' --overwrite` gives each split its share of every class), or leave it out "
        "of --classes and relabel or remove its objects in "
        f"{root / 'Annotations'}: img_000.xml (train and eval refuse an object of a class "
        "--classes does not name)"
    ]
    assert f"warning: {train_txt}: class 'rust'" in text and "ok, 1 warning(s)" in text

    dented = root / "Annotations" / "img_001.xml"  # difficult boxes are not trained on
    dented.write_text(dented.read_text().replace("<difficult>0<", "<difficult>1<"))
    code, report, _ = _check(root, capsys, "--classes", "scratch,dent,Pit mark")
    assert code == 0 and len(report["warnings"]) == 1
    assert report["warnings"][0].startswith(
        f"{train_txt}: no box of classes 'dent' and 'Pit mark' to train on (the dataset holds "
        "2 'dent', 1 'Pit mark' elsewhere"
    )

    code, report, _ = _check(root, capsys)  # without --classes: the classes the dataset holds
    assert code == 0
    assert any(w.startswith(f"{train_txt}: no box of classes 'Pit mark' and 'dent'")
               for w in report["warnings"])  # fmt: skip
    # the command it suggests pastes as it is (it said --classes Pit mark,dent,scratch)
    assert any("train with --classes 'Pit mark,dent,scratch' (check" in w
               for w in report["warnings"])  # fmt: skip
    hint = voc.check_hint(voc.VocError("x.xml: malformed XML"), root)
    assert hint.endswith(f"(`splitdet data check '{root}'` lists every problem at once)")


def test_every_image_size_is_listed_or_counted(tmp_path, capsys):
    """It said "4 different image sizes" and listed the 3 most common."""
    import numpy as np

    from support import write_voc_image

    root = make_tiny_voc(tmp_path / "voc", n_defective=4, n_free=0)  # 160x128
    ids = voc.read_split_ids(root, "train")[:2]
    voc.write_split(root, "val", ["img_002"])
    voc.write_split(root, "test", ["img_003"])
    for k, (width, height) in enumerate([(320, 240), (240, 320), (256, 256), (300, 200),
                                         (200, 300), (64, 64)]):  # fmt: skip
        image = np.zeros((height, width, 3), np.uint8)
        ids.append(write_voc_image(root, f"size_{k}", image, ()))
        voc.write_split(root, "train", ids)
        code, _, text = _check(root, capsys)
        assert code == 0
        (line,) = [line for line in text.splitlines() if "image sizes:" in line]
        if k < 4:  # up to 5 sizes: all of them
            for size in ["160x128 (4)", "320x240 (1)", "240x320 (1)", "256x256 (1)"][: k + 2]:
                assert size in line, line
        elif k == 4:  # 6 sizes: all of them rather than "and 1 more"
            assert line.count("x") == 6 and "more" not in line, line
        else:
            assert line.count("x") == 5, line
            assert line.endswith(", and 2 more sizes (2 images; --json FILE lists all)"), line
