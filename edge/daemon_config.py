"""The edge daemon's settings (no torch): `DaemonConfig`, checked as it is made (a folder it
writes into reached through a symbolic link inside --watch is refused then:
`check_folder_links`), and `check_paths`, which refuses a daemon writing into its own hot
folder."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from splitdet.edge.client import ClientConfig
from splitdet.edge.file_moves import names_below
from splitdet.edge.liveness import STALL_AFTER_S, Liveness
from splitdet.edge.preprocess import IMAGE_SUFFIXES
from splitdet.edge.sender import Backoff
from splitdet.edge.store import OutboxCap
from splitdet.edge.watcher import normalize_extensions
from splitdet.shared.regular_file import file_kind

AFTER_POLICIES = ("keep", "archive", "delete")
#: Symbolic links `_link_inside` follows at most on one path (Linux's own limit): more is a loop.
_MAX_LINKS = 40


@dataclass(frozen=True)
class DaemonConfig:
    """Every setting of the edge daemon.

    Attributes:
        model_dir: exported model directory (`splitdet export`).
        watch: the hot folder.
        recursive: take the images of its subfolders too (not the quarantine or archive).
        extensions: take only the files whose name ends in one of these (any case); the
            others (Thumbs.db, desktop.ini, sidecar .json/.xml/.txt files) are left where
            they are, logged once each and counted in `splitdet_edge_skipped_files`. None
            takes every file (what does not decode is quarantined).
        cloud: cloud address(es), as ClientConfig.addresses.
        db: the SQLite results + outbox file.
        after: what happens to a processed image file: keep, archive or delete.
        archive_dir: where --after archive moves files (default WATCH/archive).
        quarantine_dir: where unreadable files go, as ID_NAME, with ID_NAME.reason.txt beside each
            (default WATCH/quarantine).
        once: process what is in the folder, try to deliver the outbox, exit.
        drain_timeout_s: with `once`, how long to keep delivering before giving up (and
            to wait for outbox room, or for a database another program holds locked).
        threshold: gate threshold (default: the manifest's).
        codec: feature codec (default: the manifest's).
        threads, device: ONNX Runtime settings.
        settle_s: a file must be unchanged this long before it is read.
        unreadable_grace_s: an unchanged file that does not decode waits this much longer
            before it is quarantined.
        poll_s: seconds between scans of an idle hot folder.
        outbox: the outbox caps and full policy.
        retry_initial_s, retry_max_s: sender backoff.
        client: how to reach the cloud (timeout, TLS, token), addresses included.
        metrics_port: Prometheus endpoint port (0: any free port; None: off).
        metrics_host: its address.
        stall_after_s: the endpoint's /healthz answers 503 once the daemon's loop has not
            gone round for this many seconds (`liveness.Liveness`).
        save_annotated: write annotated defect images here.
        ready_file: once running, write {"pid", "metrics_port", "fingerprint"} JSON here.
        keep_results_s: delete final results older than this (seconds) from the database,
            checked at start and then hourly (ResultStore.prune); None keeps every result.
    """

    model_dir: Path
    watch: Path
    cloud: str
    db: Path
    after: str = "keep"
    archive_dir: Path | None = None
    quarantine_dir: Path | None = None
    once: bool = False
    drain_timeout_s: float = 60.0
    threshold: float | None = None
    codec: str | None = None
    threads: int | None = None
    device: str = "auto"
    settle_s: float = 1.0
    unreadable_grace_s: float = 10.0
    poll_s: float = 0.25
    outbox: OutboxCap = field(default_factory=OutboxCap)
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    client: ClientConfig | None = None
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    stall_after_s: float = STALL_AFTER_S
    save_annotated: Path | None = None
    ready_file: Path | None = None
    recursive: bool = False
    keep_results_s: float | None = None
    extensions: tuple[str, ...] | None = IMAGE_SUFFIXES

    def __post_init__(self) -> None:
        """ValueError naming the option when a setting is one the daemon cannot run with
        (a folder it writes into reached through a link inside --watch included)."""
        if self.after not in AFTER_POLICIES:
            raise ValueError(f"--after must be one of {AFTER_POLICIES}, got {self.after!r}")
        if self.save_annotated is not None and self.after == "delete":
            raise ValueError(
                "--save-annotated needs the image after the cloud answers: use --after keep "
                "or archive"
            )
        if min(self.settle_s, self.unreadable_grace_s, self.drain_timeout_s) < 0:
            raise ValueError("settle, grace and drain times must be non-negative")
        if self.poll_s <= 0:
            raise ValueError("--poll must be positive")
        Liveness(self.stall_after_s)  # validates
        if self.keep_results_s is not None and not 0 <= self.keep_results_s < float("inf"):
            raise ValueError("--keep-results must be a finite age")
        if self.extensions is not None:
            try:
                normalize_extensions(self.extensions)
            except ValueError as exc:
                raise ValueError(f"--extensions: {exc}") from None
        Backoff(self.retry_initial_s, self.retry_max_s)  # validates
        check_folder_links(self)

    @property
    def archive(self) -> Path:
        """Where --after archive moves files: `archive_dir`, or WATCH/archive."""
        return self.archive_dir or self.watch / "archive"

    @property
    def quarantine(self) -> Path:
        """Where unreadable files go: `quarantine_dir`, or WATCH/quarantine."""
        return self.quarantine_dir or self.watch / "quarantine"

    def output_folders(self) -> list[tuple[str, Path]]:
        """(option, folder) of every folder the daemon moves or writes images into."""
        folders = [("--quarantine", self.quarantine)]
        if self.after == "archive":
            folders.append(("--archive", self.archive))
        if self.save_annotated is not None:
            folders.append(("--save-annotated", self.save_annotated))
        return folders

    @property
    def client_config(self) -> ClientConfig:
        """How to reach the cloud: `client`, or the defaults for the `cloud` address(es)."""
        return self.client or ClientConfig(self.cloud)


def check_paths(config: DaemonConfig) -> None:
    """ValueError when the daemon would write into its own hot folder: files archived,
    quarantined or annotated there come back as new images (again and again), and a database
    or ready file there would be quarantined as an unreadable image.

    Folders are told apart by what they are, not only by their paths: an output folder that
    is the --watch folder reached through another mount (a bind mount, one NAS share mounted
    twice) has its own path but the device and inode of --watch (as `folder_lock` identifies
    folders); so has, under --recursive, a folder on the way to one inside --watch so
    reached, which the recursive scan would not know to leave out."""
    watch = config.watch.resolve()
    watch_id = _folder_id(watch)
    for flag, folder in config.output_folders():
        resolved = folder.resolve()
        if resolved == watch or (watch_id is not None and _folder_id(resolved) == watch_id):
            through = (
                ""
                if resolved == watch
                else f" {config.watch} (reached through {resolved}, another mount)"
            )
            raise ValueError(
                f"{flag} {folder} is the --watch folder{through}: its files would be processed "
                "again; give it another folder"
            )
        if config.recursive and not resolved.is_relative_to(watch):
            _refuse_inside_another_mount(flag, folder, config.watch, watch_id)
    outputs = [folder.resolve() for _, folder in config.output_folders()]

    def scanned(path: Path) -> bool:
        """Whether the hot folder would list this file."""
        if not config.recursive:
            return path.parent == watch
        inside = path.is_relative_to(watch)
        return inside and not any(path.is_relative_to(folder) for folder in outputs)

    files = [("--db", config.db), ("--ready-file", config.ready_file)]
    for flag, path in files:
        if path is not None and scanned(path.resolve()):
            raise ValueError(
                f"{flag} {path} is in the --watch folder, which would take it for an image; "
                "put it elsewhere"
            )


def _folder_id(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the folder `path` leads to, as `folder_lock` identifies folders;
    None when it cannot be stat'ed (missing: made at start) or is not a folder."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _refuse_inside_another_mount(
    flag: str, folder: Path, watch: Path, watch_id: tuple[int, int] | None
) -> None:
    """ValueError when `folder` (resolved: not below --watch by its path) lies inside the
    --watch folder all the same, reached through another mount of it: under --recursive
    the scan would enter it and take the files moved there again, endlessly."""
    if watch_id is None:
        return
    resolved = folder.resolve()
    for above in resolved.parents:
        if _folder_id(above) == watch_id:
            below = resolved.relative_to(above)
            raise ValueError(
                f"{flag} {folder} lies inside the --watch folder {watch}, reached through "
                f"{above} (another mount of it): --recursive would take its files again; "
                f"give {flag} {watch / below} or a folder outside --watch"
            )


def folder_problem(flag: str, path: Path, what: str) -> str | None:
    """Why the folder `path` given as `flag` cannot be used, one line naming it ("no such
    folder"; "is not a folder (a FIFO)", or a file, a device, a link to one; "cannot look at
    it (...)"), ending with `what` to do when it is not a folder; None when it is one."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"{flag} {path}: is not a folder (a symbolic link to nothing); {what}"
        return f"{flag} {path}: no such folder"
    except OSError as exc:  # ELOOP, EACCES on the way
        return f"{flag} {path}: cannot look at it ({exc.strerror or exc})"
    if stat.S_ISDIR(info.st_mode):
        return None
    return f"{flag} {path}: is not a folder ({path_kind(path, info)}); {what}"


def path_kind(path: Path, info: os.stat_result) -> str:
    """What `path` is, by its stat `info` (links followed): "a file", "a FIFO", ..., or "a
    symbolic link to" one of those when `path` is a link."""
    kind = "a file" if stat.S_ISREG(info.st_mode) else file_kind(info.st_mode)
    return f"a symbolic link to {kind}" if os.path.islink(path) else kind


def check_folder_links(config: DaemonConfig) -> None:
    """ValueError when a folder the daemon writes into (`output_folders`: the quarantine,
    the archive, --save-annotated) is, or lies under, a symbolic link inside --watch, given
    or by default (WATCH/archive, WATCH/quarantine). The camera's account may write --watch
    and could point such a link anywhere on the machine, where the daemon, often root, would
    then move, write and delete files. A link there is refused even when the admin named it
    (--archive WATCH/link): it can be changed by that account at any time; the admin names
    its target instead. A link outside --watch (/data/archive to a mount) stays allowed."""
    for flag, folder in config.output_folders():
        try:
            link = _link_inside(folder, config.watch)
        except OSError as exc:  # (a folder on the way this user may not look into)
            raise ValueError(
                f"{flag} {folder}: cannot look at it ({exc.strerror or exc})"
            ) from None
        if link is None:
            continue
        what = "is" if Path(os.path.abspath(folder)) == link else f"leads through {link},"
        raise ValueError(
            f"{flag} {folder} {what} a symbolic link inside --watch {config.watch}, where the "
            "camera's account could point it anywhere: links there are not followed; remove "
            f"the link (the daemon makes a real folder), or give {flag} a folder outside --watch"
        )


def _link_inside(folder: Path, watch: Path) -> Path | None:
    """The first symbolic link lying inside `watch` that the path `folder` leads through
    (itself included), or None. Its names are followed one at a time as the system would
    (the links outside `watch` too, up to _MAX_LINKS), so that a link outside leading back
    into --watch through one there is found as well."""
    try:
        inside = watch.resolve()
    except (OSError, RuntimeError):  # (a --watch that loops: refused where it is used)
        return None
    path = folder if folder.is_absolute() else Path.cwd() / folder
    current, todo, followed = Path(path.anchor), list(path.parts[1:]), 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        step = current / name
        if not step.is_symlink():  # a folder, or missing (made at start), or a file
            current = step
            continue
        if step.is_relative_to(inside):
            return step
        followed += 1
        try:
            target = Path(os.readlink(step))
        except OSError:
            return None  # (its use says why)
        if followed > _MAX_LINKS:
            return None  # a loop: its use says so
        if target.is_absolute():
            current = Path(target.anchor)
            todo = [*target.parts[1:], *todo]
        else:
            todo = [*target.parts, *todo]
    return None


def resolved_below(folder: Path, watch: Path, resolved_watch: Path) -> Path:
    """`folder` made absolute as the daemon records it: one lying inside `watch` (by its path
    as given) is `resolved_watch` (`watch` resolved) joined with the names below, never
    resolved itself: a symbolic link the camera's account swapped in for it since
    `check_folder_links` would otherwise be followed for the whole run (and, resolved to its
    target outside --watch, never checked again); a folder outside --watch is resolved."""
    names = names_below(folder, watch)
    return folder.resolve() if names is None else resolved_watch.joinpath(*names)
