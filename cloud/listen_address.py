"""A check of the cloud detection server's --listen address before gRPC binds it.

gRPC says only "Failed to bind" when it cannot listen; `check_listen_address` binds a probe
socket first and raises an OSError that names the cause: the port held by another server,
one that needs privileges (a port below 1024 without root or CAP_NET_BIND_SERVICE), or a host
that is not an address of this machine.
"""

from __future__ import annotations

import errno
import socket

from splitdet.shared.cli import privileged_port_hint


def check_listen_address(listen: str) -> None:
    """OSError naming the cause when `listen` ("host:port") is held by another server, needs
    privileges or names an address this host lacks; gRPC says only "Failed to bind". Port 0
    and other failures are left to gRPC."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
    bound = lacking = False
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
            bound = True
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                hint = privileged_port_hint(int(port)) if exc.errno == errno.EACCES else ""
                raise OSError(f"cannot listen on {listen}: {exc.strerror}{hint}") from None
            lacking |= exc.errno == errno.EADDRNOTAVAIL
    # gRPC binds every address the name gives and fails only when none binds ("localhost"
    # is 127.0.0.1 and ::1; with IPv6 off, ::1 is not there, and 127.0.0.1 serves)
    if lacking and not bound:
        raise OSError(
            f"cannot listen on {listen}: {host} is not an address of this machine "
            "(listen on one it has, or on 0.0.0.0 for all of them)"
        )
