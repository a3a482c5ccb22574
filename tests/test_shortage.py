"""One recogniser of a machine short of memory or threads (`shared.shortage.short_of`) for the
edge's model runs, the cloud's calls and `predict`'s torch load: what one side learnt to
recognise, the others recognise too."""

from __future__ import annotations

import grpc
import pytest

from splitdet.cloud.call_status import status_for
from splitdet.edge.intake import memory_shortage
from splitdet.shared.shortage import short_of

#: Messages of real failed allocations or thread starts, and what they ran short of.
SHORT = [
    (MemoryError(), "memory"),
    (
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
        "memory",
    ),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "memory"),
    (
        RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory"),
        "memory",
    ),
    (RuntimeError("std::bad_alloc"), "memory"),
    (OSError(12, "Cannot allocate memory"), "memory"),
    (RuntimeError("can't start new thread"), "threads"),
]


@pytest.mark.parametrize(("exc", "what"), SHORT, ids=[f"{w}-{i}" for i, (_, w) in enumerate(SHORT)])
def test_every_side_takes_a_shortage_for_the_machines_fault(exc, what):
    """Before: the edge held back an image only for the allocation texts it knew (a model run
    whose thread pool could not start quarantined the image for good), the cloud only for
    torch's CPU allocator (a CUDA out-of-memory was INTERNAL: the edge kept a dead letter)."""
    assert short_of(exc) == what
    assert memory_shortage(exc) is not None
    code, message = status_for(exc)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert f"short of {what}" in message


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("DefaultCPUAllocator: not enough channels"),  # the name alone is no shortage
        ValueError("tensor 'p2': shape [1, 256, 0, 8] is empty"),
        RuntimeError("thread pool already started"),
    ],
)
def test_other_errors_are_no_shortage(exc):
    assert short_of(exc) is None
    assert memory_shortage(exc) is None
    assert status_for(exc)[0] == grpc.StatusCode.INTERNAL


def test_what_a_shortage_was_raised_while_handling_is_a_failure_of_its_own():
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise KeyError("a bug in the handler") from None
    except KeyError as exc:
        assert status_for(exc)[0] == grpc.StatusCode.INTERNAL
