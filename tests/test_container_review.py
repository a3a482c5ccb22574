"""The container-platform review: what `splitdet` did in a container.

1. No writable temporary folder (a read-only root file system, no TMPDIR): a raw traceback of
   torch's imports, exit 1, even under JSON logs; and any unexpected exception of a command
   logging JSON escaped as a raw traceback.
2. As PID 1 (no init), a SIGTERM before the command installed its handler was dropped by the
   kernel: the cloud and the edge then ran until SIGKILL.
3. An --answers-db in a folder the user may not write was refused only after the model loaded,
   with a bare "unable to open database file" and a relative path.
4. The cloud's "stopped before serving" line had no `event`.
5. A --ready-file naming pid 1 (a daemon that ran as PID 1) was kept by the next start as "still
   running", and claimed ready for good when that start failed.

Real processes where the behaviour is about processes: mount and PID namespaces (`unshare`, as
root) stand for the container; skipped where they cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cloud_fixtures import shared_model_dir

from splitdet.shared import cli
from splitdet.shared.cli import main, remove_ready_file, write_ready_file

from support import nobody_scratch, wait_for

pytestmark = pytest.mark.timeout(240)

SPLITDET = [sys.executable, "-m", "splitdet.shared.cli"]
#: The temp-folder refusal's words (`cli.no_temp_folder_message`).
NO_TEMP = "no writable temporary folder (TMPDIR, /tmp, /var/tmp): torch needs one"


def _env(**more: str) -> dict[str, str]:
    """This environment without any temp-folder variable, plus `more`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    return {**env, "OMP_NUM_THREADS": "1", **more}


def _unshare(*options: str) -> list[str]:
    """`unshare OPTIONS` when it works here (root, namespaces allowed), else pytest.skip."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare here")
    probe = subprocess.run([unshare, *options, "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare {' '.join(options)} fails here: {probe.stderr.decode()[-200:]}")
    return [unshare, *options]


def _last_json(stderr: str) -> dict:
    """The last stderr line, which must be one JSON object."""
    lines = stderr.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


# ------------------------------------------------------------ 1. no writable temporary folder

#: Run "$@" with /tmp and /var/tmp read-only and the working directory in one (tempfile's last
#: resort): no folder `tempfile.gettempdir` tries can be written, root or not.
READ_ONLY_TEMP = (
    "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp && "
    "mount --bind /var/tmp /var/tmp && mount -o remount,bind,ro /var/tmp && "
    'cd /var/tmp && exec "$@"'
)


def _without_temp_folder(*argv: str) -> subprocess.CompletedProcess:
    """`splitdet ARGV` in a mount namespace where no temporary folder can be written."""
    prefix = _unshare("--mount", "--propagation", "private")
    return subprocess.run(
        [*prefix, "sh", "-c", READ_ONLY_TEMP, "sh", *SPLITDET, *argv],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip


def test_a_cloud_without_a_temporary_folder_says_so_in_one_json_line():
    """Before: one JSON line, then ~60 lines of torch's traceback ending `FileNotFoundError:
    No usable temporary directory found in [...]`, exit 1."""
    _, model_dir, _ = shared_model_dir(0)
    done = _without_temp_folder("cloud", "--model", str(model_dir), "--listen", "127.0.0.1:0",
                                "--threads", "1", "--answers-cap", "0",
                                "--log-format", "json")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = _last_json(done.stderr)
    assert last["event"] == "fatal" and last["command"] == "cloud", last
    assert last["msg"].startswith(f"splitdet cloud: error: {NO_TEMP}"), last
    assert "emptyDir or tmpfs volume" in last["msg"], last


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "d", "--out", "o"],
        ["eval", "--data", "d", "--model", "m"],
        ["export", "--checkpoint", "c", "--out", "o"],
        ["predict", "--model", "m", "x.png"],
        ["bench", "--model", "m", "--checkpoint", "c", "--data", "d", "--out", "o"],
        ["demo", "--workdir", "w"],
        ["cloud", "--model", "m", "--answers-cap", "0"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_torch_command_names_the_missing_temporary_folder(argv):
    """Every command that imports torch says, as its one last line (exit 2), that it needs a
    writable temporary folder, before anything else: not a traceback from torch's imports, or
    (predict) "torch is installed but could not be loaded (FileNotFoundError: …)"."""
    done = _without_temp_folder(*argv)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"splitdet {argv[0]}: error: {NO_TEMP}"), done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_an_unexpected_exception_under_json_logs_is_one_fatal_line(monkeypatch, capsys):
    """Before: under JSON logs (`--log-format json`; `edge run`'s default) an exception no
    command foresaw printed Python's raw traceback, lines no log pipeline reads. Now one JSON
    line, event "fatal", the traceback in "exc", exit 1; text logs keep the traceback."""
    from splitdet.cloud import cli_cloud
    from splitdet.edge import cli_edge_run

    def boom(_args: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_cloud, "run", boom)
    monkeypatch.setattr(cli_edge_run, "run", boom)
    for argv, command in (
        (["cloud", "--model", "m", "--log-format", "json"], "cloud"),
        (["edge", "run", "--model", "m", "--watch", "w", "--db", "d", "--cloud", "h:1"], "edge"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        line = json.loads(err)
        assert line["event"] == "fatal" and line["command"] == command, line
        assert line["msg"] == f"splitdet {command}: error: RuntimeError: boom", line
        assert line["exc"].startswith("Traceback") and "RuntimeError: boom" in line["exc"], line
    with pytest.raises(RuntimeError, match="boom"):  # text logs: the traceback, as before
        main(["cloud", "--model", "m"])


# ------------------------------------------------------------ 2. PID 1 and an early SIGTERM


def _child_of(pid: int, timeout: float = 30) -> int:
    """The pid (in this namespace) of the process `unshare --fork` (pid `pid`) started."""

    def child() -> int | None:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        return int(text[0]) if text else None

    return wait_for(child, timeout, "unshare's child")


def _signal_mask(pid: int, field: str) -> int:
    """A signal mask of process `pid`'s /proc/PID/status (SigBlk: those its main thread
    blocks; SigCgt: those it has a handler for), 0 if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(status.split(f"{field}:")[1].split()[0], 16)


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def _as_pid1(argv: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    """`splitdet ARGV` as PID 1 of a new PID namespace (as in a container without an init):
    the unshare process, and the command's pid in this namespace."""
    prefix = _unshare("--pid", "--fork", "--mount-proc")
    with open(log, "wb") as out:
        process = subprocess.Popen([*prefix, *SPLITDET, *argv], stdout=out,
                                   stderr=subprocess.STDOUT, env=_env())  # fmt: skip
    return process, _child_of(process.pid)


def _end(process: subprocess.Popen, pid: int) -> None:
    """Kill the command (and so its namespace) if still there, and reap unshare."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)


def _daemon_argv(kind: str, model_dir: Path, tmp_path: Path) -> list[str]:
    if kind == "cloud":
        return ["cloud", "--model", str(model_dir), "--listen", "127.0.0.1:0", "--threads", "1",
                "--log-format", "json",
                "--answers-db", str(tmp_path / "answers.sqlite")]  # fmt: skip
    watch = tmp_path / "hot"
    watch.mkdir()
    return ["edge", "run", "--model", str(model_dir), "--watch", str(watch),
            "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9"]  # fmt: skip


@pytest.mark.parametrize("kind", ["cloud", "edge"])
def test_a_sigterm_to_pid_1_while_it_imports_ends_it(kind, tmp_path):
    """Before: a SIGTERM to `splitdet cloud` / `edge run` running as PID 1, sent once `main`
    had begun (SIGUSR1 blocked for its stacks thread) but before the command's own SIGTERM
    handler, was dropped by the kernel (PID 1 ignores a signal it has no handler for): the
    process loaded and served until SIGKILL. Now `main` handles SIGTERM from its start: it
    ends at once, exit 143, as SIGTERM's default action ends any other process."""
    _, model_dir, _ = shared_model_dir(0)
    log = tmp_path / "pid1.log"
    process, pid = _as_pid1(_daemon_argv(kind, model_dir, tmp_path), log)
    try:
        # main's first step blocks SIGUSR1 (`stacks_on_sigusr1`): main has begun; then a
        # SIGTERM handler: main's own (old code: none until the command's, 0.1-0.2 s later,
        # once build_parser has imported the commands: its SIGTERM would give exit 0)
        wait_for(lambda: _signal_mask(pid, "SigBlk") & _bit(signal.SIGUSR1), 30, "main")
        term = _bit(signal.SIGTERM)
        wait_for(lambda: _signal_mask(pid, "SigCgt") & term, 30, "a SIGTERM handler", 0.001)
        os.kill(pid, signal.SIGTERM)
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 128 + signal.SIGTERM, f"exit {code} after SIGTERM:\n{log.read_text()}"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        _end(process, pid)


# ------------------------------------------------------------ 3. an --answers-db not writable


def test_an_answers_db_the_user_may_not_write_is_refused_before_the_load(tmp_path):
    """Before: a root-owned folder (or file) under --answers-db and a non-root cloud: refused
    only after the model loaded, `--answers-db PATH: unable to open database file`; the
    default, relative path not shown absolute. Now refused at once, naming the absolute path,
    the folder, and the user."""
    _, model_dir, _ = shared_model_dir(0)
    with nobody_scratch(model_dir) as (prefix, root, model):
        if not prefix:
            pytest.skip("needs root, to run the cloud as another user")
        closed = root / "rootowned"
        closed.mkdir(mode=0o755)
        (root / "open").mkdir(mode=0o777)
        (root / "open").chmod(0o777)
        kept = root / "open" / "a.sqlite"
        kept.write_bytes(b"")  # root's, 0644: nobody may not write it
        kept.chmod(0o644)

        def refused(*extra: str, cwd: Path | None = None) -> str:
            argv = ["cloud", "--model", str(model), "--listen", "127.0.0.1:0", "--threads", "1",
                    "--log-format", "json", *extra]  # fmt: skip
            done = subprocess.run([*prefix, *SPLITDET, *argv], capture_output=True, text=True,
                                  timeout=120, env=_env(), cwd=cwd)  # fmt: skip
            assert done.returncode == 2, done.stderr
            assert "loading model" not in done.stderr, f"refused after the load:\n{done.stderr}"
            last = _last_json(done.stderr)
            assert last["event"] == "fatal", last
            return last["msg"]

        db = closed / "a.sqlite"
        message = refused("--answers-db", str(db))
        expected = f"--answers-db {db}: cannot create or write it in {closed} (permission denied"
        assert message.startswith(f"splitdet cloud: error: {expected} for uid 65534)"), message
        message = refused("--answers-db", str(kept))
        assert f"--answers-db {kept}: cannot create or write it in {kept.parent} " in message
        default = "splitdet-cloud-answers.sqlite"
        message = refused(cwd=closed)  # the default: relative, in the working directory
        shown = f"--answers-db {default} ({closed / default})"
        expected = f"{shown}: cannot create or write it in {closed} (permission denied for uid"
        assert expected in message, message


# ------------------------------------------------------------ 4. a stop while loading


def test_a_stop_while_loading_logs_its_event(tmp_path):
    """Before: "stopped before serving", the last line of a cloud stopped while it loaded,
    was the one lifecycle line without an `event`."""
    _, model_dir, _ = shared_model_dir(0)
    log = tmp_path / "cloud.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*SPLITDET, "cloud", "--model", str(model_dir), "--listen", "127.0.0.1:0",
             "--threads", "1", "--log-format", "json",
             "--answers-db", str(tmp_path / "answers.sqlite")],
            stdout=out, stderr=subprocess.STDOUT, env=_env(),
        )  # fmt: skip
    try:
        wait_for(lambda: "loading model" in log.read_text(), 60, "loading")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    last = _last_json(log.read_text())
    assert last["msg"] == "stopped before serving" and last.get("event") == "stopped", last


# ------------------------------------------------------------ 5. a ready file naming pid 1


def test_the_ready_file_records_the_process_instance(tmp_path):
    """Beside the pid, the ready file records the process's start time (clock ticks after
    boot) and the boot id: what tells it from a later process given the same pid."""
    ready = tmp_path / "ready.json"
    write_ready_file(ready, {"pid": os.getpid(), "port": 1})
    info = json.loads(ready.read_text())
    stat_text = Path(f"/proc/{os.getpid()}/stat").read_text()
    ticks = int(stat_text[stat_text.rindex(")") + 1 :].split()[19])
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert info == {"pid": os.getpid(), "port": 1, "pid_start_ticks": ticks, "boot_id": boot}
    write_ready_file(ready, {"pid": 4_000_000})  # (another process's: nothing to add)
    assert json.loads(ready.read_text()) == {"pid": 4_000_000}


def test_a_ready_file_naming_a_reused_pid_is_stale(tmp_path, caplog):
    """A live pid whose start time or boot differ from what the file records is another
    process (pid 1 of every container; a pid reused after a reboot): its file is removed at a
    start, and a stop does not remove a file that names its pid but another instance. A file
    without them (an earlier version's) is judged by its pid alone, as before."""
    ready = tmp_path / "ready.json"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = cli.process_identity(sleeper.pid)
        assert set(live) == {"pid_start_ticks", "boot_id"}, live
        other_boot = "00000000-0000-0000-0000-000000000000"
        for stale in ({"pid_start_ticks": live["pid_start_ticks"] + 1},
                      {"boot_id": other_boot}):  # fmt: skip
            ready.write_text(json.dumps({"pid": sleeper.pid, **live, **stale}))
            remove_ready_file(ready, unless_running=True)
            assert not ready.exists(), f"kept, naming another instance ({stale})"
        for kept in (live, {}):  # the same instance; an earlier version's file
            ready.write_text(json.dumps({"pid": sleeper.pid, **kept}))
            remove_ready_file(ready, unless_running=True)
            assert ready.exists(), f"removed, naming the live process ({kept})"
    finally:
        sleeper.kill()
        sleeper.wait()
    mine = cli.process_identity(os.getpid())
    ready.write_text(json.dumps({"pid": os.getpid(), **mine, "boot_id": "another boot"}))
    remove_ready_file(ready, os.getpid())  # a stop: not this instance's file
    assert ready.exists(), "a stop removed another instance's file naming its pid"
    ready.write_text(json.dumps({"pid": os.getpid(), **mine}))
    remove_ready_file(ready, os.getpid())
    assert not ready.exists(), "a stop left its own file"


def _ready_pid1_cloud(tmp_path: Path, ready: Path) -> tuple[subprocess.Popen, int, Path]:
    """A cloud run as PID 1 (`_as_pid1`) with `ready` as its --ready-file, once it wrote it:
    (its process, its pid outside its namespace, its log)."""
    _, model_dir, _ = shared_model_dir(0)
    log = tmp_path / "pid1.log"
    argv = [*_daemon_argv("cloud", model_dir, tmp_path), "--ready-file", str(ready)]
    process, pid = _as_pid1(argv, log)
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, 120, "ready")
        assert ready.exists(), log.read_text()
    except BaseException:
        _end(process, pid)
        raise
    return process, pid, log


def test_an_edge_start_failing_its_checks_removes_a_stale_ready_file(tmp_path):
    """The container review: an edge's stale ready file (its pid long gone) was removed only
    once the daemon was built, after the option checks: a start refused for a missing --watch
    left the file saying a daemon was ready."""
    ready = tmp_path / "ready.json"
    write_ready_file(ready, {"pid": 2**22 + 7, "metrics_port": None, "fingerprint": "f"})
    done = subprocess.run(
        [*SPLITDET, "edge", "run", "--model", str(tmp_path / "m"), "--watch",
         str(tmp_path / "no-such-folder"), "--db", str(tmp_path / "edge.sqlite"),
         "--cloud", "127.0.0.1:9", "--ready-file", str(ready)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no such folder" in done.stderr
    assert not ready.exists()


def test_a_ready_file_a_pid_1_cloud_left_does_not_say_the_next_one_runs(tmp_path):
    """The reviewer's case: a cloud that ran as PID 1 (a container without an init) killed
    with SIGKILL leaves its ready file naming pid 1. The next start, not PID 1 (under an init,
    or here: on this host, where pid 1 lives too), kept it as "still running" and, when that
    start failed, the file claimed a ready server for good. Now the file records the PID-1
    process's start time: another process's pid 1 is not it, and the file goes at start."""
    ready = tmp_path / "ready.json"
    process, pid, _log = _ready_pid1_cloud(tmp_path, ready)
    _end(process, pid)  # (SIGKILL: the file stays, as a container's kill leaves it)
    info = json.loads(ready.read_text())
    assert info["pid"] == 1 and "pid_start_ticks" in info and "boot_id" in info, info

    done = subprocess.run(  # a start that fails (no such model): the file must not stay
        [*SPLITDET, "cloud", "--model", str(tmp_path / "no-such-model"), "--listen",
         "127.0.0.1:0", "--answers-cap", "0", "--ready-file", str(ready)],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "still running" not in done.stderr, done.stderr
    assert not ready.exists(), f"kept: {ready.read_text()}"


def test_a_pid_1_cloud_stops_gracefully_once_serving(tmp_path):
    """The PID-1 SIGTERM handler of `main` is replaced by the cloud's own: a SIGTERM once it
    serves drains it (exit 0, its ready file gone), and its ready file recorded which
    process instance pid 1 was."""
    ready = tmp_path / "ready.json"
    process, pid, log = _ready_pid1_cloud(tmp_path, ready)
    try:
        info = json.loads(ready.read_text())
        assert info["pid"] == 1 and "pid_start_ticks" in info, info
        os.kill(pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert not ready.exists()
        events = [json.loads(line).get("event") for line in log.read_text().splitlines()]
        assert events[-1] == "stopped" and "draining" in events, events
    finally:
        _end(process, pid)
