"""splitdet's version as every record of it says it: the package's, and the commit run when
that is a git work tree (`splitdet_version`). Stdlib only: the edge uses it too."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path


@functools.cache
def splitdet_version() -> str:
    """splitdet's version, as `splitdet --version` prints it (the package's metadata, e.g.
    "0.1.1.dev5+g1a2b3c4"; "0+unknown" in a source tree that was never installed), and, when
    the code runs from a git work tree (an editable install, whose metadata keeps the version
    of the commit it was installed at), the commit it runs: "0.1.1.dev5+g1a2b3c4 (git
    9f8e7d6c5b4a, modified)", "modified" when the tree has uncommitted changes."""
    from splitdet.shared import __version__

    source = _git_source(Path(__file__).resolve().parent.parent)
    return f"{__version__} ({source})" if source else __version__


def _git_source(folder: Path) -> str | None:
    """ "git HASH12" (", modified" added for uncommitted changes) of the work tree `folder`
    lies in; None when it lies in none, or git is missing or slow."""
    if not (folder / ".git").exists():
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # (a read: take no lock on the index)
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, env=env, check=True,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, env=env, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"git {head[:12]}" + (", modified" if status else "") if head else None
