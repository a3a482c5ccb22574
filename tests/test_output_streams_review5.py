"""What the commands do with their output streams and names (review 5):

F1. A stdout whose encoding cannot hold a path (PYTHONIOENCODING=ascii or latin-1) failed the
    closing lines of synth, data check, train and eval with a UnicodeEncodeError traceback once
    their work was done (exit 1: "problems found" to `data check`): now written escaped, as
    `edge results`' table does; an error handler PYTHONIOENCODING names is kept.
F2. `edge run --save-annotated` named a copy ID_STEM.jpg, never shortened ("File name too long":
    no copy of a long name), a name that is not UTF-8 with its stored `\\xNN` as text: now by
    the rule of the archive and quarantine (`file_moves.stored_name`).
F3. `export --out` a folder whose name is not UTF-8 failed in torch's ONNX exporter with a
    TypeError traceback ("incompatible function arguments").
F4. A stdout that cannot be written (`>/dev/full`) or is closed (`>&-`) gave a traceback, exit
    1 (or a silent exit 0, or `predict` did all its work first): now one line, exit status 2;
    refused before any work where stdout is what the command writes. A reader gone (`| head`)
    still ends it quietly, exit 0.
F6. `data check --json` and `synth --json` wrote a name that is not UTF-8 as lone surrogates
    (`"syn\\udce9"`): now as `\\xNN`, as `predict --json` and `edge results` write it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.file_identity import path_text
from splitdet.edge.file_moves import stored_name
from splitdet.shared.cli import main

from support import make_tiny_voc, run_main, with_fd_closed

#: A folder name whose bytes are not UTF-8 (a Latin-1 name), as Python reads it.
NOT_UTF8 = os.fsdecode(b"syn\xe9_\xfd")
#: A name no ASCII or Latin-1 stream can print.
CJK = "合成 İı"
FULL = "cannot write to standard output: No space left on device"


def _cli(*argv: object, **kwargs) -> subprocess.CompletedProcess:
    """`splitdet ARGV` in a subprocess (its console-script path: `main()`), text output."""
    return subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", *map(str, argv)],
        stderr=subprocess.PIPE, text=True, timeout=120, **kwargs,
    )  # fmt: skip


def _one_error_line(err: str, *needles: str) -> str:
    """The one line of `err`, with no traceback, holding each needle."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    """A VOC tree of 2 images (1 defective) in a folder named in CJK and Turkish letters."""
    return make_tiny_voc(tmp_path_factory.mktemp("voc") / CJK, n_defective=1, n_free=1)


# --------------------------------------------------------------- F1. an unencodable stdout


def test_synth_says_what_it_wrote_under_an_ascii_stdout(tmp_path):
    """The reviewer's command: the dataset was complete, but its summary failed (exit 1)."""
    out = tmp_path / CJK
    done = _cli(
        "synth", "--out", out, "--size", "256x256", "--defective", "1", "--free", "1",
        "--test-defective", "0", "--test-free", "0", "--workers", "1", "--no-progress",
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "wrote " + str(out).encode("ascii", "backslashreplace").decode() in done.stdout
    assert json.loads((out / "dataset.json").read_text())["complete"] is True


def _stdout_in(monkeypatch, encoding: str) -> io.TextIOWrapper:
    """A stdout of `encoding` as PYTHONIOENCODING makes it (errors strict), put in place of
    the process's own (sys.__stdout__ too: the stream the environment variable sets up)."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "__stdout__", stream)
    return stream


def test_data_check_reports_under_a_latin1_stdout(monkeypatch, capsys, voc):
    code, out, _ = run_main(capsys, "data", "check", voc)  # (the status of this dataset)
    assert str(voc) in out
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1")
    stream = _stdout_in(monkeypatch, "latin-1")
    assert main(["data", "check", str(voc)]) == code  # before: UnicodeEncodeError
    stream.flush()
    assert "\\u5408\\u6210 \\u0130\\u0131" in stream.buffer.getvalue().decode("latin-1")


def test_an_error_handler_pythonioencoding_names_is_kept(monkeypatch, voc):
    """`PYTHONIOENCODING=latin-1:strict` asks for failures: they are not escaped away."""
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1:strict")
    _stdout_in(monkeypatch, "latin-1")
    with pytest.raises(UnicodeEncodeError):
        main(["data", "check", str(voc)])


# ------------------------------------------------------------ F4. a stdout that fails


class _FullRaw(io.RawIOBase):
    """/dev/full: every write fails with ENOSPC while `full`."""

    full = True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)


@contextlib.contextmanager
def _full_stdout(monkeypatch):
    """sys.stdout on a full disk (buffered, as a file's is) while in it. Set in the test's
    body: capsys puts its own stream in place as the test starts."""
    raw = _FullRaw()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(raw), "utf-8"))
    try:
        yield
    finally:
        raw.full = False  # (what is left in it flushed to nowhere when it is collected)
        monkeypatch.undo()


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["data", "check", "VOC"],
        ["data", "check", "VOC", "--json", "-"],
        ["edge", "results", "--db", "DB"],
        ["edge", "results", "--db", "DB", "--json"],
        ["edge", "results", "--db", "DB", "--csv"],
        ["edge", "status", "--db", "DB"],
        ["edge", "status", "--db", "DB", "--json"],
    ],
    ids=" ".join,
)
def test_a_full_stdout_is_one_line_and_exit_status_2(capsys, monkeypatch, voc, store_db, argv):
    """Before: a traceback and exit 1, or exit 0 (or 1) with the output lost unsaid."""
    argv = [{"VOC": voc, "DB": store_db}.get(a, a) for a in argv]
    with _full_stdout(monkeypatch):
        code, _, err = run_main(capsys, *argv)
    assert code == 2, err
    _one_error_line(err, FULL)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_dev_full_as_stdout_is_one_line_and_exit_status_2(voc):
    with open("/dev/full", "w") as full:
        done = _cli("data", "check", voc, stdout=full)
    assert done.returncode == 2
    _one_error_line(done.stderr, "splitdet data: error: " + FULL)


def _one_png(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(folder / "a.png")
    return folder / "a.png"


#: Commands whose output stdout is, and what their refusal says of it.
CLOSED_REFUSALS = [
    ("predict IMG --model MODEL --threshold 2 --json - --no-progress",
     "--json - writes the results there"),
    ("data check VOC", "data check prints its report there"),
    ("data check VOC --json -", "--json - writes the results there"),
    ("edge results --db DB --csv", "edge results prints the results there"),
    ("edge results --db DB", "edge results prints the results there"),
    ("edge status --db DB", "edge status prints the summary there"),
    ("synth --out OUT --size 256x256 --defective 1 --free 0 --test-defective 0 --test-free 0 "
     "--no-progress --json", "--json prints the summary there"),
    ("eval --data VOC --model MODEL", "eval prints its JSON there"),
    ("train --data NOWHERE --out OUT --json", "--json prints the run's result"),
    # a review: these did their work (the cloud loaded, bound and came up) and then ended, exit 2
    ("cloud --model MODEL --listen 127.0.0.1:0 --json", "--json prints the ready line there"),
    ("edge collect --db DB --out OUT --json", "--json prints the summary there"),
    ("edge check --model MODEL", "edge check prints its steps there"),
    ("data split VOC --json --overwrite", "--json prints the split there"),
    ("loadtest IMG --model MODEL --cloud 127.0.0.1:9 --json -", "--json - writes the results"),
]  # fmt: skip


@pytest.mark.parametrize("command, says", CLOSED_REFUSALS, ids=[c for c, _ in CLOSED_REFUSALS])
def test_a_closed_stdout_is_refused_before_the_work(
    capsys, monkeypatch, tmp_path, voc, store_db, not_utf8_export, command, says
):
    """Before: predict judged every image, then AttributeError (exit 1, "images had
    errors"); edge results --csv a TypeError; data check, edge status, synth --json: exit 0,
    their output gone without a word (synth after writing the dataset). (train is given a
    missing dataset: refused first, it never trains, whatever it would do with one.)"""
    given = {"VOC": voc, "DB": store_db, "MODEL": not_utf8_export[0], "OUT": tmp_path / "out",
             "IMG": _one_png(tmp_path / "images"), "NOWHERE": tmp_path / "nowhere"}  # fmt: skip
    argv = [given.get(a, a) for a in command.split()]
    capsys.readouterr()
    with monkeypatch.context() as closed:
        closed.setattr(sys, "stdout", None)  # as Python gives a process started with it closed
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    _one_error_line(err, "standard output is closed", says, "nothing was done")
    assert not (tmp_path / "out").exists()


def test_a_closed_stdout_for_real(store_db):
    """A process started with stdout closed: nothing takes its file descriptor either."""
    for argv in (["edge", "results", "--db", store_db, "--csv"], ["--version"]):
        done = subprocess.run(
            with_fd_closed(1, [sys.executable, "-m", "splitdet.shared.cli", *argv]),
            stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        _one_error_line(done.stderr, "standard output is closed")


def test_a_reader_gone_ends_a_command_quietly(voc, store_db):
    """`| head` that has read enough: exit 0, nothing said (before, data check's output,
    flushed at exit into the closed pipe, gave "Exception ignored ... BrokenPipeError")."""
    for argv in (["data", "check", voc], ["edge", "results", "--db", store_db]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # every write fails: EPIPE
        try:
            done = _cli(*argv, stdout=write_end)
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (0, ""), argv


# ------------------------------------------------ F6. names that are not UTF-8, in JSON


def test_data_check_json_writes_a_name_that_is_not_utf8_as_escapes(capsys, monkeypatch, tmp_path):
    root = make_tiny_voc(tmp_path / NOT_UTF8, n_defective=1, n_free=1)
    code, out, err = run_main(capsys, "data", "check", root, "--json", "-")
    assert code in (0, 1), err
    assert "\\udc" not in out
    assert json.loads(out)["root"] == path_text(str(root)) == str(tmp_path / "syn\\xe9_\\xfd")
    # --json FILE (its report for people on stdout as the console's UTF-8 mode writes it)
    text_out = io.TextIOWrapper(io.BytesIO(), "utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdout", text_out)
    assert main(["data", "check", str(root), "--json", str(tmp_path / "report.json")]) == code
    text = (tmp_path / "report.json").read_text("utf-8")
    assert "\\udc" not in text and json.loads(text)["root"] == path_text(str(root))


def test_synth_json_writes_a_name_that_is_not_utf8_as_escapes(capsys, tmp_path):
    out = tmp_path / NOT_UTF8
    code, text, err = run_main(
        capsys, "synth", "--out", out, "--size", "256x256", "--defective", "1", "--free", "1",
        "--test-defective", "0", "--test-free", "0", "--workers", "1", "--no-progress", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "\\udc" not in text
    summary = json.loads(text)
    json.dumps(summary, ensure_ascii=False).encode("utf-8")  # (lone surrogates would fail)
    assert summary["root"] == path_text(str(out)) == str(tmp_path / "syn\\xe9_\\xfd")


# ----------------------------------------------- F3. export into a folder not named in UTF-8


def _splitdet_temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("splitdet-export-*")}


@pytest.fixture(scope="module")
def not_utf8_export(tiny_model, tmp_path_factory):
    """(folder, manifest, splitdet-export-* temporary folders before): `tiny_model` exported
    into a folder whose name is not UTF-8."""
    from splitdet.training.export import export_model

    out = tmp_path_factory.mktemp("export") / os.fsdecode(b"mod\xe9l_\xfd")
    before = _splitdet_temp_folders()
    return out, export_model(tiny_model, out, gate_threshold=0.5, default_codec="int8"), before


def test_export_into_a_folder_whose_name_is_not_utf8(not_utf8_export):
    """Before: TypeError from torch.onnx.export (the path's surrogates), a page of traceback."""
    from splitdet.edge.runtime import EdgeRuntime
    from splitdet.shared.manifest import read_manifest
    from splitdet.training.export import STAGING_PREFIX

    out, manifest, before = not_utf8_export
    assert read_manifest(out).fingerprint == manifest.fingerprint
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    assert _splitdet_temp_folders() <= before  # (the link made for it removed)
    EdgeRuntime(out, threads=1)  # the edge loads it, every file checked against the manifest


# --------------------------------------------------- F2. --save-annotated copies' names


def _annotate(save_dir: Path, source: Path, path: str) -> list[Path]:
    """The edge daemon's --save-annotated hook on image 1, stored under `path` (its row's
    path, as stored), whose file is `source`; the files in `save_dir` after it."""
    from splitdet.edge.client import CloudDetections
    from splitdet.edge.sender import annotate_hook
    from splitdet.edge.store import OutboxItem

    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    boxes, scores = np.array([[4.0, 4.0, 40.0, 30.0]], np.float32), np.array([0.9], np.float32)
    answer = CloudDetections("r1", "f" * 64, boxes, scores, np.array([1]), ("scratch",), {}, False)
    item = OutboxItem(1, "r1", b"", 0.0, 0, None, path, "f" * 64, digest)
    save_dir.mkdir(exist_ok=True)
    annotate_hook(save_dir, pixel_bits=8)(item, answer)
    return list(save_dir.iterdir())


def test_an_annotated_copy_of_a_long_name_is_shortened_as_an_archived_one(tmp_path, caplog):
    """Before: "File name too long" (annotate_failed) and no copy for a stem over 242 bytes."""
    source = _one_png(tmp_path / "hot")
    long_source = source.with_name("é" * 120 + "x" * 5 + ".png")  # 245 + 4 bytes
    source.rename(long_source)
    with caplog.at_level(logging.WARNING, logger="splitdet"):
        written = _annotate(tmp_path / "annotated", long_source, str(long_source))
    assert [p.name for p in written] == [stored_name(1, long_source.stem + ".jpg")]
    assert len(os.fsencode(written[0].name)) <= 255 and written[0].name.endswith("é.jpg")
    assert not caplog.records, caplog.text
    with Image.open(written[0]) as image:
        assert image.format == "JPEG"


def test_an_annotated_copy_of_a_name_that_is_not_utf8_is_named_as_archived(tmp_path):
    """Before: `00000001_caf\\xe9.jpg`, the stored escape as text; the archive and the
    quarantine write U+FFFD in its place."""
    source = _one_png(tmp_path / "hot")
    latin1 = source.with_name(os.fsdecode(b"caf\xe9.png"))
    source.rename(latin1)
    written = _annotate(tmp_path / "annotated", latin1, path_text(str(latin1)))
    assert [p.name for p in written] == ["00000001_caf\ufffd.jpg"]
    assert stored_name(1, latin1.name) == "00000001_caf\ufffd.png"  # the archived copy's
