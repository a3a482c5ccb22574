"""The name an edge gives itself on every call (gRPC metadata), so that the operator of a cloud
shared by many cameras sees which one sends what (torch-free).

    ("splitdet-edge", "line3-cam2")    # sent by the edge with every Detect and GetManifest

A name is 1-64 characters of letters, digits and ``. _ - : @ /``; `splitdet edge run` uses the
host name unless given --name. The cloud labels its per-edge metrics with it and names it in its
log lines beside the peer address.
"""

from __future__ import annotations

import re
import socket

#: gRPC metadata key carrying the edge's name.
EDGE_NAME_KEY = "splitdet-edge"
MAX_EDGE_NAME = 64
_CHARACTERS = r"A-Za-z0-9._:@/-"
_NAME = re.compile(rf"[{_CHARACTERS}]{{1,{MAX_EDGE_NAME}}}")
_NOT_NAME = re.compile(rf"[^{_CHARACTERS}]+")


def is_edge_name(name: str) -> bool:
    """Whether `name` is a usable edge name (see the module docstring)."""
    return _NAME.fullmatch(name) is not None


def check_edge_name(name: str) -> str:
    """`name`, or ValueError saying what a name may hold."""
    if not is_edge_name(name):
        shown = name if len(name) <= MAX_EDGE_NAME else name[:MAX_EDGE_NAME] + "…"
        raise ValueError(
            f"edge name {shown!r}: 1-{MAX_EDGE_NAME} characters of letters, digits and . _ - : @ /"
        )
    return name


def default_edge_name() -> str:
    """This machine's host name, made a usable edge name ("edge" when there is none)."""
    name = _NOT_NAME.sub("-", socket.gethostname()).strip("-")[:MAX_EDGE_NAME]
    return name or "edge"
