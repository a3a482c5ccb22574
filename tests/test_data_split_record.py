"""`splitdet data split` records how it split: ``ImageSets/Main/split.json`` holds the seed,
the shares and options, splitdet's version, the time and what each split holds; `data check`
shows it and says when the split files were edited since; `data merge`, `train` and `eval`
read split files by name and leave it alone. The default seed (0) is fixed: the same
annotations split the same way again.

A tiny VOC tree (`make_tiny_voc`) in tmp_path; no torch.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from splitdet.training import voc
from splitdet.training.voc_merge import split_names

from support import make_tiny_voc, run_main

pytestmark = pytest.mark.timeout(60)

RECORD = Path("ImageSets") / "Main" / "split.json"


def unsplit_voc(root: Path, seed: int = 0) -> Path:
    """A VOC tree of 8 defective and 4 defect-free images without split files."""
    make_tiny_voc(root, n_defective=8, n_free=4, seed=seed)
    for path in (root / "ImageSets" / "Main").glob("*.txt"):
        path.unlink()
    return root


def split_files(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((root / "ImageSets" / "Main").glob("*.txt"))}


def test_data_split_records_its_seed_options_version_time_and_counts(tmp_path, capsys):
    root = unsplit_voc(tmp_path / "ds")
    before = datetime.now(UTC).replace(microsecond=0)
    code, out, _ = run_main(capsys, "data", "split", root, "--val", "0.25", "--test", "0.15",
                            "--seed", "7", "--classes", "scratch")  # fmt: skip
    assert code == 0
    assert f"{root / RECORD}: seed 7" in out
    record = json.loads((root / RECORD).read_text(encoding="utf-8"))
    assert (record["seed"], record["val"], record["test"]) == (7, 0.25, 0.15)
    assert (record["mode"], record["classes"], record["write_empty"]) == ("new", ["scratch"], False)
    assert record["written_by"] == "splitdet data split"
    assert record["splitdet_version"]
    written = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
    assert before <= written <= datetime.now(UTC)
    for split, counts in record["counts"].items():
        ids = voc.read_split_ids(root, split)
        samples = [voc.read_annotation(root, i) for i in ids]
        defective = sum(s.is_defective for s in samples)
        assert counts == {"images": len(ids), "defective": defective,
                          "defect_free": len(ids) - defective, "added": len(ids)}  # fmt: skip
    assert sum(c["images"] for c in record["counts"].values()) == 12


def test_the_default_seed_gives_the_same_split_again(tmp_path, capsys):
    root = unsplit_voc(tmp_path / "ds")
    assert run_main(capsys, "data", "split", root)[0] == 0
    first, record = split_files(root), json.loads((root / RECORD).read_text())
    assert record["seed"] == 0
    assert run_main(capsys, "data", "split", root, "--overwrite")[0] == 0
    again = json.loads((root / RECORD).read_text())
    assert split_files(root) == first
    assert (again["mode"], again["ids_sha256"]) == ("overwrite", record["ids_sha256"])


def test_data_split_json_names_the_record(tmp_path, capsys):
    root = unsplit_voc(tmp_path / "ds")
    code, out, _ = run_main(capsys, "data", "split", root, "--seed", "2", "--json")
    summary = json.loads(out)
    assert (code, summary["seed"], summary["record"]) == (0, 2, str(root / RECORD))


def test_data_check_shows_the_record_and_an_edit_since(tmp_path, capsys):
    root = unsplit_voc(tmp_path / "ds")
    assert run_main(capsys, "data", "split", root, "--seed", "5")[0] == 0
    code, out, _ = run_main(capsys, "data", "check", root, "--no-progress")
    assert code == 0
    line = next(x for x in out.splitlines() if "split by splitdet data split" in x)
    assert "--seed 5 --val 0.2 --test 0.1" in line
    assert "edited since" not in out
    report = tmp_path / "report.json"
    assert run_main(capsys, "data", "check", root, "--no-progress", "--json", report)[0] == 0
    assert json.loads(report.read_text())["split_record"]["seed"] == 5
    # an id moved by hand: the record no longer describes the split files
    train, val = voc.read_split_ids(root, "train"), voc.read_split_ids(root, "val")
    voc.write_split(root, "train", train[1:])
    voc.write_split(root, "val", [*val, train[0]])
    code, out, _ = run_main(capsys, "data", "check", root, "--no-progress")
    assert code == 0
    assert f"warning: {root / RECORD}: train.txt, val.txt no longer list what" in out


def test_a_damaged_record_is_a_warning_not_a_problem(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "ds", n_defective=4, n_free=2)
    voc.write_split(root, "train", ["img_000", "img_001", "img_004"])
    voc.write_split(root, "val", ["img_002", "img_005"])
    voc.write_split(root, "test", ["img_003"])
    (root / RECORD).write_text("{not json")
    code, out, _ = run_main(capsys, "data", "check", root, "--no-progress")
    assert code == 0
    assert f"warning: {root / RECORD}: cannot read the split record" in out


def test_add_keeps_the_earlier_record_in_its_history(tmp_path, capsys):
    root = unsplit_voc(tmp_path / "ds")
    assert run_main(capsys, "data", "split", root, "--seed", "4")[0] == 0
    first = json.loads((root / RECORD).read_text())
    make_tiny_voc(tmp_path / "more", n_defective=1, n_free=0, seed=9)
    for kind, suffix in (("JPEGImages", ".png"), ("Annotations", ".xml")):
        (root / kind / f"new_000{suffix}").write_bytes(
            (tmp_path / "more" / kind / f"img_000{suffix}").read_bytes()
        )
    assert run_main(capsys, "data", "split", root, "--add", "--seed", "6")[0] == 0
    record = json.loads((root / RECORD).read_text())
    assert (record["mode"], record["seed"]) == ("add", 6)
    assert sum(c["added"] for c in record["counts"].values()) == 1
    assert record["history"] == [{k: v for k, v in first.items() if k != "history"}]


def test_the_readers_of_a_voc_tree_leave_the_record_alone(tmp_path, capsys):
    root = unsplit_voc(tmp_path / "ds")
    assert run_main(capsys, "data", "split", root)[0] == 0
    assert "split" not in split_names(root)  # merge reads *.txt split files only
    assert voc.read_split(root, "train")  # train and eval read split files by name
    other = unsplit_voc(tmp_path / "other", seed=1)
    assert run_main(capsys, "data", "split", other, "--seed", "1")[0] == 0
    out = tmp_path / "merged"
    code, _, err = run_main(
        capsys, "data", "merge", root, other, "--out", out, "--prefix", "--no-progress"
    )
    assert code == 0, err
    assert not (out / RECORD).exists()  # a merged split is no split that one seed made


def test_add_over_a_damaged_record_says_the_history_is_lost(tmp_path, capsys, caplog):
    """(A review: `--add` read a damaged split.json as none, and its history went without a
    word.)"""
    root = unsplit_voc(tmp_path / "ds")
    assert run_main(capsys, "data", "split", root, "--seed", "4")[0] == 0
    (root / RECORD).write_text("{not json")
    code, _, err = run_main(capsys, "data", "split", root, "--add", "--seed", "6")
    assert code == 0, err
    (line,) = [r.getMessage() for r in caplog.records if "history" in r.getMessage()]
    assert line.startswith(f"{root / RECORD}: cannot read the split record"), line
    assert line.endswith("; the earlier splits are not kept in the new record's history"), line
    assert json.loads((root / RECORD).read_text())["history"] == []
