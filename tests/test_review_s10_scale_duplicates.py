"""`data check` on a dataset holding one image under many ids (hard links, a merge repeated):
the warning names a few copies of each group and counts the rest, not every copy (an image
copied 667 times in 20,000 made one warning line of 50 kB)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from splitdet.training import voc

from support import make_tiny_voc

COPIES = 40


def test_duplicate_warning_names_a_few_copies_per_group(tmp_path: Path):
    root = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=1)
    ids = voc.read_split_ids(root, "train")
    for k in range(COPIES):  # the first image under 40 more ids, hard-linked
        os.link(root / "JPEGImages" / "img_000.png", root / "JPEGImages" / f"copy_{k:03d}.png")
        shutil.copy(
            root / "Annotations" / "img_000.xml", root / "Annotations" / f"copy_{k:03d}.xml"
        )
        ids.append(f"copy_{k:03d}")
    voc.write_split(root, "train", ids)
    done = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", "data", "check", str(root), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "stored twice" in line]
    assert len(lines) == 1, done.stdout + done.stderr
    warning = lines[0]
    named = sum(warning.count(f"copy_{k:03d}.png") for k in range(COPIES))
    assert named <= 3, f"{named} copies named: {warning[:300]}"
    assert f"{COPIES + 1 - 3} more copies" in warning
    assert len(warning) < 1000
