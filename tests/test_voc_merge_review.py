"""`splitdet data merge`, as a review reproduced its faults:

1. a source whose JPEGImages holds relative symbolic links (``../../store/a.png``) gave a
   merged tree of those links, dangling there, and reported "(hard-linked)": the image file
   itself is to be linked (or copied);
2. a source's split files other than train, val and test (a custom split `eval --split NAME`
   reads, VOC's ``trainval``) were dropped without a word: every one is merged, its ids
   renamed as the others', and the summary counts it.
"""

from __future__ import annotations

import json
from pathlib import Path

from splitdet.shared.cli import main
from splitdet.training import voc

from support import make_tiny_voc


def _source(root: Path, seed: int) -> Path:
    """A tiny VOC tree of 6 images split train 3 / val 2 / test 1."""
    make_tiny_voc(root, n_defective=4, n_free=2, seed=seed)
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", ids[:2] + ids[4:5])
    voc.write_split(root, "val", ids[2:3] + ids[5:])
    voc.write_split(root, "test", ids[3:4])
    return root


def _merge(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "merge", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_images_that_are_relative_symbolic_links_are_merged_as_their_files(tmp_path, capsys):
    a, b = _source(tmp_path / "ds", seed=0), _source(tmp_path / "dsb", seed=1)
    store = tmp_path / "store"
    store.mkdir()
    for image in sorted((a / "JPEGImages").iterdir()):  # ds/JPEGImages/x -> ../../store/x
        image.rename(store / image.name)
        image.symlink_to(Path("..", "..", "store", image.name))
    out = tmp_path / "deep" / "er" / "merged"  # (a link's relative target dangles from here)

    code, text, err = _merge(capsys, str(a), str(b), "--out", str(out), "--prefix")

    assert code == 0, err
    assert "12 images (hard-linked)" in text
    merged = sorted((out / "JPEGImages").iterdir())
    assert len(merged) == 12 and not [p.name for p in merged if p.is_symlink()]
    for stored in sorted(store.iterdir()):  # the stored file itself, one more link of it
        assert (out / "JPEGImages" / f"ds_{stored.name}").samefile(stored)
    report = tmp_path / "report.json"
    code = main(["data", "check", str(out), "--no-progress", "--json", str(report)])
    assert code == 0 and json.loads(report.read_text())["problems"] == []


def test_every_split_file_of_the_sources_is_merged_and_counted(tmp_path, capsys):
    a, b = _source(tmp_path / "ds", seed=0), _source(tmp_path / "dsb", seed=1)
    for source in (a, b):  # VOC's trainval, in both
        ids = voc.read_split_ids(source, "train") + voc.read_split_ids(source, "val")
        voc.write_split(source, "trainval", ids)
    voc.write_split(a, "free", ["img_004", "img_005"])  # a custom split, in one source only
    # a per-class list (CVAT's and VOC's `CLASS_SPLIT.txt`): each line's flag is kept
    (a / "ImageSets" / "Main" / "scratch_train.txt").write_text("img_000  1\nimg_001 -1\n")
    out = tmp_path / "merged"

    code, text, err = _merge(capsys, str(a), str(b), "--out", str(out), "--prefix")

    assert code == 0, err
    main_dir = out / "ImageSets" / "Main"
    assert sorted(p.name for p in main_dir.iterdir()) == [
        "free.txt", "scratch_train.txt", "test.txt", "train.txt", "trainval.txt", "val.txt"
    ]  # fmt: skip
    assert (main_dir / "scratch_train.txt").read_text() == "ds_img_000  1\nds_img_001 -1\n"
    assert voc.read_split_ids(out, "free") == ["ds_img_004", "ds_img_005"]
    assert voc.read_split_ids(out, "trainval") == (
        [f"ds_{i}" for i in voc.read_split_ids(a, "trainval")]
        + [f"dsb_{i}" for i in voc.read_split_ids(b, "trainval")]
    )
    assert f"{a} (ids ds_...): train 3, val 2, test 1, free 2, scratch_train 2, trainval 5" in text
    assert f"{b} (ids dsb_...): train 3, val 2, test 1, trainval 5" in text
    assert (
        f"merged: train 6, val 4, test 2, free 2 ({a} alone), scratch_train 2 ({a} alone), "
        "trainval 10"
    ) in text
    assert main(["data", "check", str(out), "--no-progress"]) == 0


def test_a_text_file_in_image_sets_that_lists_no_ids_is_refused_by_name(tmp_path, capsys):
    a, b = _source(tmp_path / "ds", seed=0), _source(tmp_path / "dsb", seed=1)
    notes = b / "ImageSets" / "Main" / "notes.txt"
    notes.write_text("relabelled on Monday\n")
    out = tmp_path / "merged"

    code, _, err = _merge(capsys, str(a), str(b), "--out", str(out), "--prefix")

    assert code == 2 and f"{notes}: lists 'relabelled', which has no" in err
    assert "if it is no split file, move it elsewhere" in err and not out.exists()
