"""Machine-readable outputs are strict JSON: no NaN/Infinity token (jq, JavaScript's JSON.parse
and most JSON libraries refuse the whole document), and keys that do not come and go.

`--threshold inf` (or 1e999) was taken as "flag nothing" by predict, eval --model and edge run,
and written as the bare token ``Infinity`` in predict --json, eval's JSON, the edge's JSON log
lines and every `edge results --json` / `edge status --json` of the store after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
from pathlib import Path

import numpy as np
from PIL import Image

from support import edge_run_once_offline, run_main


def _strict(text: str):
    """`text` parsed as strict JSON: a NaN/Infinity token raises ValueError."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _image(path: Path) -> Path:
    """A small grey PNG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 200, (96, 128), dtype=np.uint8)).save(path)
    return path


def test_predict_refuses_an_infinite_threshold(tiny_model_dir, tmp_path, capsys):
    image = _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out.json"
    for value in ("inf", "1e999"):
        code, _, err = run_main(
            capsys, "predict", image, "--model", tiny_model_dir, "--json", out,
            "--threshold", value, "--threads", "1", "--no-progress",
        )  # fmt: skip
        assert code == 2, err
        assert "--threshold inf: must be a finite number" in err and "such as 2" in err
        assert not out.exists()
    # a value above 1 still flags nothing, and its records are strict JSON
    code, _, err = run_main(
        capsys, "predict", image, "--model", tiny_model_dir, "--json", out, "--threshold", "2",
        "--threads", "1", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    [record] = _strict(out.read_text())
    assert record["verdict"] == "ok" and record["gate_threshold"] == 2.0


def test_eval_model_refuses_an_infinite_threshold(tiny_voc, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, _, err = run_main(
        capsys, "eval", "--data", tiny_voc, "--model", tiny_model_dir, "--split", "val",
        "--threshold", "inf", "--json", out, "--no-progress",
    )  # fmt: skip
    assert code == 2, err
    assert "--threshold inf: must be a finite number" in err
    assert not out.exists()


def test_edge_run_refuses_an_infinite_threshold(tiny_model_dir, tmp_path, capsys):
    """The edge stored the infinity in every row it judged; it is refused before it starts."""
    db, watch = tmp_path / "edge.sqlite", tmp_path / "watch"
    _image(watch / "a.png")
    code, _, err = run_main(
        capsys, "edge", "run", "--model", tiny_model_dir, "--watch", watch, "--db", db,
        "--cloud", "127.0.0.1:9", "--once", "--threshold", "inf", "--threads", "1",
    )  # fmt: skip
    assert code == 2, err
    assert "--threshold inf: must be a finite number" in err
    assert not db.exists()


def test_edge_results_and_status_of_a_store_holding_infinity(tiny_model_dir, tmp_path, capsys):
    """A store an edge run with --threshold inf wrote (edge run takes it) still lists as strict
    JSON: the infinite threshold as null."""
    db, watch = tmp_path / "edge.sqlite", tmp_path / "watch"
    _image(watch / "a.png")
    assert edge_run_once_offline(db, watch, tiny_model_dir) == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:  # as `edge run --threshold inf` stores
        conn.execute("UPDATE images SET threshold = ?", (math.inf,))
        conn.commit()
    code, out, err = run_main(capsys, "edge", "results", "--db", db, "--json")
    assert code == 0, err
    [row] = _strict(out)
    assert row["verdict"] == "ok" and row["threshold"] is None
    code, out, err = run_main(capsys, "edge", "status", "--db", db, "--json")
    assert code == 0, err
    status = _strict(out)
    [threshold] = status["results_by_model"][row["fingerprint"]]["thresholds"]
    assert threshold == {"threshold": None, "results": 1}


def test_json_log_lines_hold_no_infinity_or_nan():
    from splitdet.shared.logs import json_line

    line = json_line(logging.WARNING, "override", threshold=math.inf, p=math.nan, ok=0.5)
    entry = _strict(line)
    assert entry["threshold"] is None and entry["p"] is None and entry["ok"] == 0.5


def test_metrics_json_holds_no_nan(tmp_path):
    from splitdet.training.epoch_records import write_metrics

    write_metrics(tmp_path, [{"epoch": 0, "loss": math.nan, "val_map": 0.25}])
    [row] = _strict((tmp_path / "metrics.json").read_text())
    assert row == {"epoch": 0, "loss": None, "val_map": 0.25}
