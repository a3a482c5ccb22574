"""The token of a call's `authorization: Bearer <token>` metadata (no gRPC, no torch)."""

from __future__ import annotations

#: The authorization scheme the server takes (compared case-insensitively: RFC 7235).
BEARER = "bearer"


def bearer_token(supplied: str) -> str | None:
    """The token of an authorization metadata value `Bearer <token>` (the scheme in any case,
    RFC 7235), all after the first space (a token given with a leading space, as
    $SPLITDET_CLOUD_TOKEN may hold one, is sent so); None when the value has no Bearer scheme
    (a bare token, another scheme). "" for the scheme alone."""
    scheme, _, token = supplied.partition(" ")
    return token if scheme.lower() == BEARER else None
