"""Whether an exception says the machine ran short of memory or threads: the machine's fault,
not the input's. The edge then keeps an image to read again later instead of quarantining it
(`edge.intake`), the cloud answers RESOURCE_EXHAUSTED, which edges retry, instead of INTERNAL
(`cloud.call_status`), and `predict` names the memory limit instead of a missing install.
"""

from __future__ import annotations

#: What a failed allocation says, lower case: CPython and numpy raise MemoryError ("Unable to
#: allocate 1.2 GiB for an array"); torch's CPU allocator "can't allocate memory: you tried to
#: allocate N bytes" (its name, DefaultCPUAllocator, alone is no shortage: it heads other
#: errors too), CUDA's "out of memory"; ONNX Runtime "Failed to allocate memory"; C++
#: "std::bad_alloc"; strerror(ENOMEM) "Cannot allocate memory"; a shared library loaded under
#: an address-space limit "failed to map segment".
MEMORY_TEXTS = (
    "can't allocate memory",
    "cannot allocate memory",
    "failed to allocate memory",
    "unable to allocate",
    "bad_alloc",
    "out of memory",
    "failed to map segment",
)
#: What CPython's `Thread.start` says when no thread can start (e.g. under `prlimit --as`).
THREAD_TEXTS = ("can't start new thread",)


def short_of(exc: BaseException) -> str | None:
    """ "memory" or "threads" when `exc` itself (not what it was raised from or while
    handling) says the process ran short of them, else None."""
    if isinstance(exc, MemoryError):
        return "memory"
    text = str(exc).lower()
    if any(words in text for words in MEMORY_TEXTS):
        return "memory"
    if any(words in text for words in THREAD_TEXTS):
        return "threads"
    return None
