"""The `splitdet` command under a locale that is not UTF-8 (a review: an edge daemon restarted
under `LC_ALL=de_DE.ISO-8859-1` read `café.jpg` as `cafÃ©.jpg`, took every kept image with such
a name for a new one and processed it again; `edge status` then failed with a
UnicodeEncodeError traceback on a stored `日本.jpg`). The command runs in Python's UTF-8 mode
whatever the locale (`shared/utf8_mode.py`).

Real processes of the installed `splitdet` command, a real Latin-1 locale made with `localedef`
into the test's own folder (LOCPATH), a real export, real SQLite.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import image_rows

pytestmark = pytest.mark.timeout(300)

SPLITDET = str(Path(sys.executable).with_name("splitdet"))
LATIN1 = "de_DE.ISO-8859-1"
NAMES = ("café.png", "日本.png", "plain.png")


@pytest.fixture(scope="module")
def latin1_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a process under a Latin-1 locale (made here with localedef)."""
    localedef = shutil.which("localedef")
    if localedef is None:
        pytest.skip("no localedef on this machine to make a Latin-1 locale with")
    folder = tmp_path_factory.mktemp("locales")
    made = subprocess.run([localedef, "-i", "de_DE", "-f", "ISO-8859-1", str(folder / LATIN1)],
                          capture_output=True, text=True)  # fmt: skip
    if not (folder / LATIN1).is_dir():
        pytest.skip(f"localedef could not make {LATIN1}: {made.stderr.strip()[:200]}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    env.update(LOCPATH=str(folder), LC_ALL=LATIN1)
    probe = "import sys; print(sys.getfilesystemencoding())"
    encoding = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    if encoding.lower().replace("-", "") not in ("iso88591", "latin1"):
        pytest.skip(f"the made locale gives Python the file system encoding {encoding!r}")
    return env


def utf8_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8"))}
    return {**env, "LC_ALL": "C.UTF-8"}


def png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def edge_once(model: Path, watch: Path, db: Path, env: dict[str, str], *extra: str):
    return subprocess.run(
        [SPLITDET, "edge", "run", "--model", str(model), "--watch", str(watch), "--db", str(db),
         "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--settle", "0",
         "--threads", "1", "--threshold", "2", "--log-format", "text", *extra],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_a_daemon_restarted_under_a_latin1_locale_takes_no_kept_image_again(
    tiny_model_dir, tmp_path, latin1_env
):
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    for level, name in enumerate(NAMES):
        (watch / name).write_bytes(png(10 + level))
    first = edge_once(tiny_model_dir, watch, db, utf8_env())
    assert first.returncode == 0, first.stderr
    assert sorted(Path(r["path"]).name for r in image_rows(db)) == sorted(NAMES)
    again = edge_once(tiny_model_dir, watch, db, latin1_env)
    assert again.returncode == 0, again.stderr
    assert sorted(Path(r["path"]).name for r in image_rows(db)) == sorted(NAMES), again.stderr
    status = subprocess.run([SPLITDET, "edge", "status", "--db", str(db)], env=latin1_env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr


def test_status_under_a_latin1_locale_reads_an_archived_name_it_cannot_encode(
    tiny_model_dir, tmp_path, latin1_env
):
    watch, db, archive = tmp_path / "hot", tmp_path / "edge.sqlite", tmp_path / "archive"
    watch.mkdir()
    (watch / "日本.png").write_bytes(png(30))
    done = edge_once(tiny_model_dir, watch, db, utf8_env(), "--after", "archive",
                     "--archive", str(archive))  # fmt: skip
    assert done.returncode == 0, done.stderr
    [row] = image_rows(db)
    assert Path(row["stored_path"]).name.endswith("日本.png")
    status = subprocess.run([SPLITDET, "edge", "status", "--db", str(db)], env=latin1_env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert "in --watch    no processed image waiting" in status.stdout, status.stdout


def test_the_command_keeps_its_name_and_pid_through_the_utf8_reexecution(
    tiny_model_dir, tmp_path, latin1_env
):
    """(A review: re-executed as `python -X utf8 …` the process was named `python`, and
    `pgrep -x splitdet`, `pidof splitdet` and process monitors lost it.) The console script
    runs itself again: the same pid, the same name, a JSON 'stopped' line on SIGTERM."""
    import signal
    import time

    watch = tmp_path / "hot"
    watch.mkdir()
    log = tmp_path / "edge.log"
    argv = [SPLITDET, "edge", "run", "--model", str(tiny_model_dir), "--watch", str(watch),
            "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9",
            "--threads", "1"]  # fmt: skip
    with log.open("wb") as err:
        process = subprocess.Popen(argv, env=latin1_env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while b'"started"' not in log.read_bytes():
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        name = Path(f"/proc/{process.pid}/comm").read_text().strip()
        assert name == "splitdet", name
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_pythonutf8_0_keeps_reading_names_by_the_locale(tiny_model_dir, tmp_path, latin1_env):
    """The way back for an edge whose store an earlier splitdet wrote under a Latin-1 locale
    (its names decoded by it): PYTHONUTF8=0 is honoured, no re-execution."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    (watch / "café.png").write_bytes(png(40))
    done = edge_once(tiny_model_dir, watch, db, {**latin1_env, "PYTHONUTF8": "0"})
    assert done.returncode == 0, done.stderr
    [row] = image_rows(db)
    assert Path(row["path"]).name == "cafÃ©.png"  # (the UTF-8 bytes read as Latin-1)
