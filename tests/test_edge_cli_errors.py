"""`splitdet edge run` and `splitdet edge results` given bad input: one line naming the option
and its value (exit status 2), no traceback, found at start-up rather than when the first
flagged image is sent, and nothing in the hot folder or the database lost or touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.store import ResultStore
from splitdet.shared.cli import main

from support import edge_error_line, nobody_scratch

pytestmark = pytest.mark.timeout(120)  # a check that regressed would run the daemon forever
CLI = "import sys; from splitdet.shared.cli import main; sys.exit(main(sys.argv[1:]))"


_error_line = edge_error_line


def _edge_run(model_dir: Path, watch: Path, db: Path, *options: str) -> int:
    """`splitdet edge run --once` against a closed port, so it never waits long (unless
    `options` give their own --cloud: it is taken once)."""
    cloud = () if "--cloud" in options else ("--cloud", "127.0.0.1:9")
    return main(
        ["edge", "run", "--model", str(model_dir), "--watch", str(watch), "--db", str(db),
         *cloud, "--once", "--drain-timeout", "0", "--settle", "0",
         "--unreadable-grace", "0", "--threads", "1", "--log-format", "text", *options]
    )  # fmt: skip


@pytest.fixture
def hot(tmp_path) -> Path:
    """A hot folder holding one image."""
    watch = tmp_path / "hot"
    watch.mkdir()
    Image.fromarray(np.full((64, 80, 3), 99, np.uint8)).save(watch / "a.png")
    return watch


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("127.0.0.1:99999", "1-65535"),  # gRPC wraps it to port 34463
        ("127.0.0.1:abc", "1-65535"),
        ("127.0.0.1", "no port"),
        ("dns:", "empty address"),  # gRPC fails to build the channel: a dead letter
        ("dns://8.8.8.8/cloud:50051", "DNS server"),  # likewise
        ("::1", "brackets"),  # gRPC would call [::1]:443
        ("127.0.0.1:50051,10.0.0.1:x", "'10.0.0.1:x'"),
        ("http://cloud:50051", "unknown scheme"),
        ("bad host:50051", "not a host name"),
        ("10.0.0.256:50051", "not an IPv4 address"),
        ("", "no address"),
    ],
)
def test_cloud_addresses_grpc_would_misread_are_refused(tiny_model_dir, hot, tmp_path, capsys,
                                                        address, needle):  # fmt: skip
    db = tmp_path / "edge.sqlite"
    assert _edge_run(tiny_model_dir, hot, db, "--cloud", address) == 2
    _error_line(capsys, f"--cloud {address!r}", needle)
    assert not db.exists() and (hot / "a.png").exists()


@pytest.mark.parametrize(
    "address", ["[::1]:50051", "dns:///cloud.example:50051", "127.0.0.1:1, 127.0.0.1:2"]
)
def test_well_formed_cloud_addresses_are_accepted(address):
    from splitdet.edge.cloud_args import check_cloud_addresses

    assert check_cloud_addresses(f" {address} ") == address


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--threshold", "nan"),  # flags nothing: every defect would be "ok"
        ("--poll", "inf"),  # the idle wait overflows
        ("--retry-max", "inf"),  # the sender's pause overflows and the thread ends
        ("--settle", "nan"),
        ("--timeout", "nan"),
        ("--outbox-max-mb", "nan"),
        ("--outbox-max-items", "0"),
        ("--threads", "-2"),
        ("--threads", "100000"),  # predict stalled building a pool that large
        ("--metrics-port", "70000"),  # was a traceback (OverflowError from bind)
    ],
)
def test_numeric_options_name_the_option_and_its_value(tiny_model_dir, hot, tmp_path, capsys,
                                                       flag, value):  # fmt: skip
    assert _edge_run(tiny_model_dir, hot, tmp_path / "edge.sqlite", flag, value) == 2
    _error_line(capsys, f"{flag} {value}")


@pytest.mark.parametrize("flag", ["--outbox-max-mb", "--dead-letter-max-mb"])
def test_a_cap_past_what_bytes_can_count_is_refused(tiny_model_dir, hot, tmp_path, capsys, flag):
    """1e303 MB passed as finite, then overflowed to infinity in bytes: a traceback
    ("cannot convert float infinity to integer") from `edge run` and `edge abandon`."""
    assert _edge_run(tiny_model_dir, hot, tmp_path / "edge.sqlite", flag, "1e303") == 2
    _error_line(capsys, f"{flag} 1e+303", "at most 1e+09 MB")
    if flag == "--dead-letter-max-mb":
        ResultStore(tmp_path / "edge.sqlite").close()
        with pytest.raises(SystemExit) as refused:
            main(["edge", "abandon", "--db", str(tmp_path / "edge.sqlite"), "--fingerprint",
                  "abababab", flag, "1e303"])  # fmt: skip
        assert refused.value.code == 2
        assert "must be 0-1e+09" in capsys.readouterr().err


def test_archive_without_after_archive_is_refused(tiny_model_dir, hot, tmp_path, capsys):
    code = _edge_run(tiny_model_dir, hot, tmp_path / "edge.sqlite", "--archive", str(tmp_path))
    assert code == 2
    _error_line(capsys, "--archive", "--after archive")


def test_a_db_that_is_a_folder_is_named_as_one(tiny_model_dir, hot, tmp_path, capsys):
    """It was "cannot open it (unable to open database file); check the disk holding it: its
    free space ..."."""
    folder = tmp_path / "results"
    folder.mkdir()
    assert _edge_run(tiny_model_dir, hot, folder) == 2
    _error_line(capsys, f"--db {folder}: is a folder; --db names the database file")
    assert list(folder.iterdir()) == [] and (hot / "a.png").is_file()


@pytest.mark.parametrize("flag", ["--db", "--quarantine", "--archive", "--save-annotated"])
def test_the_daemon_never_writes_into_its_own_hot_folder(tiny_model_dir, hot, tmp_path, capsys,
                                                         flag):  # fmt: skip
    """A database there was quarantined as an unreadable image (with its WAL beside it); files
    archived or quarantined there came back as new images, over and over."""
    db = tmp_path / "edge.sqlite"
    if flag == "--db":
        db = hot / "edge.sqlite"
        ResultStore(db).close()
        options = ()
    else:
        options = (flag, str(hot), *(("--after", "archive") if flag == "--archive" else ()))
    before = sorted(p.name for p in hot.iterdir())
    assert _edge_run(tiny_model_dir, hot, db, *options) == 2
    _error_line(capsys, flag, "--watch folder")
    assert sorted(p.name for p in hot.iterdir()) == before


def test_recursive_refuses_a_database_in_a_subfolder_but_not_in_the_quarantine(
    tiny_model_dir, hot, tmp_path, capsys
):
    """With --recursive a subfolder is part of the hot folder; the quarantine is not."""
    (hot / "day").mkdir()
    assert _edge_run(tiny_model_dir, hot, hot / "day" / "edge.sqlite", "--recursive") == 2
    _error_line(capsys, "--db", "--watch folder")
    assert not (hot / "day" / "edge.sqlite").exists()
    quarantined_db = hot / "quarantine" / "edge.sqlite"
    assert _edge_run(tiny_model_dir, hot, quarantined_db, "--recursive", "--threshold", "2") == 0


@pytest.mark.parametrize(
    ("flag", "target"),
    [
        ("--quarantine", "a-file/quarantine"),
        ("--archive", "a-file"),
        ("--save-annotated", "a-file"),
        ("--ready-file", "missing/ready.json"),
        ("--db", "a-file/edge.sqlite"),
    ],
)
def test_folders_that_cannot_be_made_are_named(tiny_model_dir, hot, tmp_path, capsys, flag,
                                               target):  # fmt: skip
    (tmp_path / "a-file").write_text("a file, not a folder\n")
    db = tmp_path / "edge.sqlite"
    options = ("--after", "archive") if flag == "--archive" else ()
    if flag == "--db":
        db = tmp_path / target
    else:
        options += (flag, str(tmp_path / target))
    assert _edge_run(tiny_model_dir, hot, db, *options) == 2
    _error_line(capsys, str(tmp_path / target), "--db" if flag == "--db" else flag)


@pytest.mark.parametrize("flag", ["--root-certs", "--client-key"])
def test_tls_files_that_are_not_pem_are_refused(tiny_model_dir, hot, tmp_path, capsys, flag):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert = tmp_path / "cert.pem"  # only its marker is checked before the key's
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    options = (flag, str(garbage))
    if flag == "--client-key":
        options += ("--client-cert", str(cert))
    assert _edge_run(tiny_model_dir, hot, tmp_path / "edge.sqlite", *options) == 2
    _error_line(capsys, f"{flag} {garbage}", "not a PEM")


@pytest.mark.parametrize("since", ["", "-5m", "nan", "inf", "1e400", "infh"])
def test_results_since_garbage_is_refused(tmp_path, capsys, since):
    db = tmp_path / "edge.sqlite"
    ResultStore(db).close()
    assert main(["edge", "results", "--db", str(db), f"--since={since}"]) == 2
    _error_line(capsys, f"--since {since!r}")
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------- permissions (not root)


@pytest.mark.parametrize("case", ["quarantine", "archive", "watch", "db"])
def test_unwritable_places_are_named_at_start_up(tiny_model_dir, case):
    """Root ignores permissions, so this runs the daemon as an unprivileged user."""
    with nobody_scratch(tiny_model_dir) as (prefix, root, model):
        read_only = root / "read-only"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        watch = root / "hot"
        watch.mkdir()
        watch.chmod(0o777)
        db = root / "edge.sqlite"
        options = ["--quarantine", str(root / "q")]
        if case == "quarantine":
            options = ["--quarantine", str(read_only)]
        elif case == "archive":
            options += ["--after", "archive", "--archive", str(read_only)]
        elif case == "watch":
            watch = read_only
            options += ["--after", "delete"]
        else:
            ResultStore(db).close()
            db.chmod(0o444)  # was accepted, then failed at the first image
        result = subprocess.run(
            [*prefix, sys.executable, "-c", CLI, "edge", "run",
             "--model", str(model), "--watch", str(watch), "--db", str(db),
             "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--threads", "1",
             *options],
            capture_output=True, text=True, timeout=100,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    expected = {"quarantine": "--quarantine", "archive": "--archive", "watch": "--watch",
                "db": "readonly"}[case]  # fmt: skip
    assert expected in result.stderr.splitlines()[-1], result.stderr


def test_a_full_database_names_it_and_leaves_the_image(
    tiny_model_dir, hot, tmp_path, capsys, monkeypatch
):
    """A full disk, as SQLite reports it (SQLITE_FULL: here by a page limit two pages above
    the new database's size, so the flagged image's request cannot be stored): one line naming
    the database and what to do; the image stays in the hot folder for the next start."""
    opened = ResultStore.__init__

    def nearly_full(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages + 2}")

    monkeypatch.setattr(ResultStore, "__init__", nearly_full)
    db = tmp_path / "edge.sqlite"
    assert _edge_run(tiny_model_dir, hot, db, "--threshold", "0") == 2
    _error_line(capsys, f"--db {db}", "full", "stays in --watch", "--keep-results")
    assert (hot / "a.png").exists()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--cloud", ""], "--cloud '': no address given"),  # was: the heads run here, rc 0
        (
            ["--root-certs", "/nonexistent.pem", "--timeout", "-5"],
            "--timeout, --root-certs: for --cloud only",
        ),
    ],
)
def test_predict_refuses_connection_options_it_would_ignore(tiny_model_dir, hot, capsys,
                                                            options, needle):  # fmt: skip
    """Without --cloud, predict runs the cloud half in this process: a connection option given
    then was ignored without a word, and `--cloud ""` meant no cloud."""
    code = main(["predict", str(hot / "a.png"), "--model", str(tiny_model_dir), "--no-progress",
                 *options])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
