"""The exports the cloud detection server serves: found on disk, verified, loaded or kept.

`export_dirs` lists the model directories a `ServerConfig` names (--model) and the exports
found in its --models-dir now, newest first; a subfolder without a manifest.json is logged
once per process. `gather_models` turns those directories into the models to serve, the
default first, with one problem line per directory that cannot be served: it loads a new
export, keeps one already loaded from the same directory (its files hashed again only once
their sizes or times change), verifies a copy before it counts and, at a reload, keeps
serving what a directory held while it cannot be served (damaged, half re-exported, away).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from splitdet.cloud.core import ServedModel, check_decoded_bound, load_cloud
from splitdet.cloud.server_config import ServerConfig
from splitdet.shared.manifest import (
    MANIFEST_NAME,
    PUBLISHING_MARKER,
    ManifestError,
    read_manifest,
)

# the logger these lines had before they moved out of server.py: log pipelines filter on it
log = logging.getLogger("splitdet.cloud.server")


def export_dirs(config: ServerConfig) -> tuple[list[Path], list[Path]]:
    """(named, found): the model directories `config` names (model_dir, then more_model_dirs),
    and the exports found in models_dir now (subfolders holding a manifest.json, newest
    manifest first; one named too is left out; one that cannot be read is logged and skipped).

    Raises:
        ManifestError: models_dir cannot be listed.
    """
    named = [] if config.model_dir is None else [config.model_dir, *config.more_model_dirs]
    if config.models_dir is None:
        return named, []
    try:
        entries = list(Path(config.models_dir).iterdir())
    except OSError as exc:
        raise ManifestError(
            f"--models-dir {config.models_dir}: cannot list ({exc.strerror or exc})"
        ) from None
    found = []
    for entry in entries:
        if entry.name.startswith(".") or entry in named:
            continue  # (a folder being copied in under a dot name)
        try:
            exported = (entry / MANIFEST_NAME).stat().st_mtime
        except NotADirectoryError:
            continue  # a file: not an export
        except FileNotFoundError:
            _note_not_an_export(entry)
            continue
        except OSError as exc:  # e.g. a lost+found the server may not read
            why = exc.strerror or str(exc)
            log.warning("%s: cannot read (%s); skipped", entry, why, extra={"fields": {
                "event": "export_unreadable", "folder": str(entry), "error": why}})  # fmt: skip
            continue
        found.append((exported, entry.name, entry))
    found.sort(reverse=True)
    return named, [entry for _, _, entry in found]


def no_export_problem(models_dir: Path) -> str:
    """What to say of a --models-dir `models_dir` in which no export that can be served was
    found. A folder that is an export itself (it holds a manifest.json: `--models-dir M` given
    for `--model M`) is said to be one: --models-dir serves its subfolders."""
    if (Path(models_dir) / MANIFEST_NAME).is_file():
        return (
            f"--models-dir {models_dir}: is an export itself (it holds {MANIFEST_NAME}), not a "
            f"folder of exports: serve it with --model {models_dir}, or put it in a folder of "
            "exports and give that folder"
        )
    return (
        f"--models-dir {models_dir}: holds no export that can be served (a folder with "
        f"{MANIFEST_NAME}, made by splitdet export)"
    )


#: --models-dir subfolders logged as holding no export (each once per process).
_NOT_EXPORTS: set[Path] = set()


def _note_not_an_export(folder: Path) -> None:
    """Log once that the --models-dir subfolder `folder` holds no manifest.json: not served."""
    if folder in _NOT_EXPORTS:
        return
    _NOT_EXPORTS.add(folder)
    log.info("%s: no %s in it, so no export; not served (logged once)", folder, MANIFEST_NAME,
             extra={"fields": {"event": "not_an_export", "folder": str(folder)}})  # fmt: skip


def gather_models(
    named: Sequence[Path],
    found: Sequence[Path],
    loaded: dict[str, ServedModel] | None = None,
    strict: bool = True,
    held: dict[Path, str] | None = None,
    checked: dict[Path, tuple] | None = None,
    max_decoded_bytes: int | None = None,
) -> tuple[list[ServedModel], list[str], dict[Path, str]]:
    """The models to serve from the directories, in order (the default first), one line per
    directory that could not be read, saying what became of it, and the fingerprint each
    directory served from or holds a verified copy of (the next reload's `held`; the copies
    first, so that mapped back by fingerprint the last directory is the serving one). An
    export already in `loaded`, read from a directory `held` says it came from, keeps its
    loaded model (its files are still verified: damage on disk is a problem line, as a restart
    would not serve them); any other directory's files are verified against its manifest in
    full first (a new export is loaded, one already loaded may be a broken copy that a restart
    could not serve). A found export that cannot be served, or one served already from another
    directory, is skipped (the latter with a warning only, once its files are verified). With
    `strict`, a named directory's problem raises instead, and so does an export named twice;
    without, a directory that cannot be served keeps serving the export `held` says it held, if
    loaded and served from no other directory: a named one that cannot be read (a copy in
    progress, a file server's hiccup), one holding a re-export killed while it replaced its
    files (`PUBLISHING_MARKER`, checked in full even where `held` says it served), one whose
    manifest or files were damaged since. A problem line says so, as a restart would refuse
    that folder until it is exported again: an export is dropped only once no directory that
    held it is left (removed, or holding another export that is served). `checked` (updated
    here) holds the file sizes and times of each directory whose files last matched their
    manifest: a kept export whose files still show them is not hashed again.
    `max_decoded_bytes` (--max-decoded-mib; None: unchecked): an export whose largest input's
    features decode to more is not served (`check_decoded_bound`), as a broken one is not:
    every request of such an image would be refused.

    Raises:
        ManifestError, OSError: with `strict`, a named directory that cannot be served.
    """
    loaded = loaded or {}
    held = held or {}
    models: list[ServedModel] = []
    where: dict[str, Path] = {}
    copies: dict[Path, str] = {}  # directory -> the export it holds a verified copy of
    fallbacks: list[tuple[int, str, str, str, Path]] = []  # folders that held one, damaged
    rank: dict[str, int] = {}  # fingerprint -> the walk index of the first folder that holds it
    problems = []
    for index, model_dir in enumerate([*named, *found]):
        is_named = index < len(named)
        signature = _file_signature(model_dir)  # (before loading: a change meanwhile shows)
        try:
            # kept: an export served from this directory before, its model kept as loaded
            model, kept = _load_or_keep(model_dir, is_named and strict, loaded, held, where, copies)
            if model is not None and max_decoded_bytes is not None:
                check_decoded_bound(model, model_dir, max_decoded_bytes)
        except Exception as exc:  # whatever one export's loading raises is that export's
            problem = _problem_of(model_dir, exc, is_named and strict)
            # (a folder still there that served an export keeps it: a restart would not serve
            # it, but dropping it refuses its edges at once; another folder serving it wins)
            before = held.get(model_dir)
            if before is None or before not in loaded or before in where:
                problems.append(f"{problem}; skipped")
                continue
            if is_named or (model_dir / PUBLISHING_MARKER).exists():  # away, or interrupted
                line = f"{problem}; still serving the export it held ({before[:16]})"
            else:  # damaged on disk: as one kept (below) whose files no longer match
                line = f"{problem}; {_still_serving(before)}"
            # decided once every folder is walked: an intact one met later serves it instead
            # (a damaged copy, its manifest now the newest, is met before its original)
            fallbacks.append((index, before, problem, line, model_dir))
            continue
        if model is None:  # a copy of an export served from another directory: skipped
            continue
        if kept and (checked or {}).get(model_dir) != signature:
            damage = _damage(model_dir)
            if damage is not None:
                signature = None  # (checked again at the next reload)
                problems.append(f"{damage}; {_still_serving(model.fingerprint)}")
        if checked is not None and signature is not None:
            checked[model_dir] = signature
        where[model.fingerprint] = model_dir
        rank[model.fingerprint] = index
        models.append(model)
    for index, before, problem, line, model_dir in fallbacks:
        if before in where:  # (another folder holds it intact, or an earlier damaged one)
            if index < len(named):  # a --model folder away: its export keeps its place
                problems.append(f"{problem}; its export ({before[:16]}) is served from "
                                f"{where[before]}")  # fmt: skip
                rank[before] = min(rank[before], index)
            else:
                problems.append(f"{problem}; skipped")
            continue
        problems.append(line)
        where[before] = model_dir
        rank[before] = index
        models.append(loaded[before])
    # in walk order (named first, then newest first: the default first), whichever folder
    # served each export in the end
    models.sort(key=lambda model: rank[model.fingerprint])
    return models, problems, {**copies, **{d: fp for fp, d in where.items()}}


def _still_serving(fingerprint: str) -> str:
    """What a problem line says of the export `fingerprint`, served from memory though its
    folder no longer holds it intact."""
    return (
        f"still serving the export loaded from it ({fingerprint[:16]}), which a restart would "
        "not serve: export into it again, or restore its files"
    )


def _load_or_keep(
    model_dir: Path,
    once_only: bool,
    loaded: dict[str, ServedModel],
    held: dict[Path, str],
    where: dict[str, Path],
    copies: dict[Path, str],
) -> tuple[ServedModel | None, bool]:
    """The model to serve from `model_dir`, and whether it is the one loaded from it before,
    kept (not verified here). An export `loaded` already, read from another directory than
    `held` says, or from one a re-export was killed in, is verified in full; one not loaded is
    loaded. (None, False): the export is served already from the directory `where` names, and
    this copy is skipped with a warning once its files are verified (and noted in `copies`:
    it serves the export at a later reload if that directory is gone).

    Raises:
        ManifestError: with `once_only`, the export is served already (named twice); and
            whatever reading, verifying or loading the export raises.
    """
    fingerprint = read_manifest(model_dir, verify=False).fingerprint
    if fingerprint in where:
        if once_only:
            raise ManifestError(
                f"--model {model_dir} is the same export as --model "
                f"{where[fingerprint]} (fingerprint {fingerprint[:16]}): give each "
                "export once"
            )
        read_manifest(model_dir)  # a broken copy is a problem, not a served export
        log.warning("%s: the same export as %s, which serves it; skipped", model_dir,
                    where[fingerprint], extra={"fields": {
                        "event": "export_duplicate_skipped", "folder": str(model_dir),
                        "served_from": str(where[fingerprint]), "fingerprint": fingerprint,
                    }})  # fmt: skip
        copies[model_dir] = fingerprint
        return None, False
    model = loaded.get(fingerprint)
    if model is None:
        model = ServedModel(*load_cloud(model_dir))
        if model.fingerprint != fingerprint:  # (its manifest replaced between the two reads)
            raise ManifestError(
                f"{model_dir}: changed while it was read (export {fingerprint[:16]}, then "
                f"{model.fingerprint[:16]}): renamed or copied into meanwhile; send SIGHUP "
                "again once the copy is done"
            )
    elif (
        held.get(model_dir) != fingerprint or (model_dir / PUBLISHING_MARKER).exists()
    ):  # loaded from another directory, or a re-export killed midway in it
        read_manifest(model_dir)  # verify this one
    else:
        return model, True
    return model, False


def _problem_of(model_dir: Path, exc: Exception, fatal: bool) -> str:
    """The problem line of `model_dir`, which could not be served because of `exc` (called
    while handling it). With `fatal`, raises it instead: a ManifestError or OSError as it is,
    anything else as a ManifestError naming the folder."""
    if not isinstance(exc, (ManifestError, OSError)):
        what = f"{type(exc).__name__}: {exc}"
        exc = ManifestError(f"{model_dir}: cannot be served ({what})")
    if fatal:
        raise exc from None
    return _naming(model_dir, exc)


def _file_signature(model_dir: Path) -> tuple | None:
    """(name, inode, size, mtime ns, ctime ns) of each file in `model_dir`, sorted; None if it
    cannot be read. Any write or replacement changes the ctime, which no tool can set back
    (`touch -r`, `cp -p` and restores keep the mtime only)."""
    try:
        with os.scandir(model_dir) as entries:
            stats = [(e.name, e.stat()) for e in entries if e.is_file()]
    except OSError:
        return None
    return tuple(sorted(
        (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats
    ))  # fmt: skip


def _naming(model_dir: Path, exc: BaseException) -> str:
    """`exc`'s text, led by the export folder it concerns unless it names it already."""
    return f"{model_dir}: {exc}" if str(model_dir) not in str(exc) else str(exc)


def _damage(model_dir: Path) -> str | None:
    """What is wrong with the files of an export served from `model_dir` (a file changed,
    truncated or gone since it was loaded: its hashes are checked in full), or None."""
    try:
        read_manifest(model_dir)
    except (ManifestError, OSError) as exc:
        return _naming(model_dir, exc)
    return None
