"""A split file besides train, val and test (CVAT's ``default.txt``, VOC's ``trainval.txt``)
listing an id whose annotation was deleted: `data merge` refused the dataset, naming the line
and sending the user to `data check`, which read only train, val and test and said "ok". It
now checks every split file `data merge` merges."""

from __future__ import annotations

from support import make_tiny_voc, run_main


def _dataset_with_a_stale_default_split(root):
    data = make_tiny_voc(root, n_defective=3, n_free=1)
    ids = ["img_000", "img_001", "img_002", "img_003"]
    split_dir = data / "ImageSets" / "Main"
    (split_dir / "train.txt").write_text("img_000\nimg_001\nimg_003\n")
    (split_dir / "val.txt").write_text("img_002\n")
    (split_dir / "test.txt").write_text("")
    (split_dir / "default.txt").write_text("\r\n".join([*ids, "deleted_img"]) + "\r\n")
    return data


def test_data_check_names_an_id_without_annotation_in_another_split_file(tmp_path, capsys):
    data = _dataset_with_a_stale_default_split(tmp_path / "cvat")
    code, out, err = run_main(capsys, "data", "check", data)
    default = data / "ImageSets" / "Main" / "default.txt"
    assert code == 1, out + err
    assert (
        f"problem: {default}: lists 'deleted_img', which has no Annotations/deleted_img.xml" in out
    )
    # the same line `data merge` refuses it with, pointing to `data check`
    other = make_tiny_voc(tmp_path / "other", n_defective=2, n_free=1, seed=1)
    for path in (other / "Annotations").iterdir():  # (ids of their own)
        path.rename(path.with_name("b" + path.name))
    for path in (other / "JPEGImages").iterdir():
        path.rename(path.with_name("b" + path.name))
    for split in ("train", "val", "test"):
        split_file = other / "ImageSets" / "Main" / f"{split}.txt"
        split_file.write_text("".join(f"b{line}\n" for line in split_file.read_text().split()))
    code, _, err = run_main(capsys, "data", "merge", data, other, "--out", tmp_path / "merged")
    assert code == 2
    assert f"{default}: lists 'deleted_img', which has no Annotations/deleted_img.xml" in err
    assert "splitdet data check" in err


def test_sound_other_split_files_pass(tmp_path, capsys):
    data = _dataset_with_a_stale_default_split(tmp_path / "cvat")
    split_dir = data / "ImageSets" / "Main"
    (split_dir / "default.txt").write_text("img_000\nimg_001\r\n")
    (split_dir / "scratch_train.txt").write_text("img_000  1\nimg_003 -1\n")
    code, out, err = run_main(capsys, "data", "check", data)
    assert "problem" not in out + err
    assert code == 0, out + err
