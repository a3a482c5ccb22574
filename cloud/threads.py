"""How many threads the cloud detection server runs, and its gRPC handler pools.

The default number of torch threads for the heads (`ServerConfig.threads`) is
`cores.usable_cores`. This module sizes and makes the thread pools gRPC hands calls to: one
for Detect (its running and queued calls, and spare threads to refuse more as busy), one for
GetManifest, one for the server's other methods (health checks, reflection, refusals of a
missing token), and the few threads that refuse calls beyond a pool's threads
(`call_guard.CallGuard`). The pools' sizes are read here when a server is made, so a test
may change them on this module first.
"""

from __future__ import annotations

from concurrent import futures
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from splitdet.cloud.server_config import ServerConfig

#: gRPC handler threads beyond --max-concurrent + --max-queued for Detect (calls to refuse as
#: busy need one), and the threads of GetManifest and of the rest (health checks, refusals of a
#: missing token), each method its own pool: a call holds its thread from its first byte, so
#: callers that never finish sending a request can use up their method's threads (until
#: --max-receive ends their calls), never the health checks'.
SPARE_RPC_THREADS = 8
#: Threads of the server's own pool: health checks, reflection, refusals of a missing token.
#: Many, so that callers stalling health checks (exempt from the token) must open many calls
#: before a probe is refused; each pool's calls beyond its threads are refused at once with
#: RESOURCE_EXHAUSTED (call_guard.CallGuard), never left waiting for a thread.
SERVER_RPC_THREADS = 32
#: Threads refusing calls beyond their pool's threads (each refusal ends at once).
REFUSAL_THREADS = 2


class PoolBound(NamedTuple):
    """The bound `CallGuard` keeps on one pool's calls.

    Attributes:
        pool: the pool (None: the server's own).
        threads: calls it may hold at once (its threads).
        receive_s: seconds a call may take to receive its request from its headers on
            (--max-receive); then it is ended with DEADLINE_EXCEEDED and its thread freed.
    """

    pool: futures.ThreadPoolExecutor | None
    threads: int
    receive_s: float


class HandlerPools(NamedTuple):
    """The thread pools of a server's gRPC methods, and the bound `CallGuard` keeps on each.

    Attributes:
        detect: Detect's threads.
        manifest: GetManifest's threads.
        refusal: the threads refusing calls beyond their pool's threads.
        bounds: pool name ("server", "detect", "manifest") -> its `PoolBound`.
    """

    detect: futures.ThreadPoolExecutor
    manifest: futures.ThreadPoolExecutor
    refusal: futures.ThreadPoolExecutor
    bounds: dict[str, PoolBound]


def handler_pools(config: ServerConfig) -> HandlerPools:
    """Detect's, GetManifest's and the refusing threads' pools, sized for `config`."""
    # a waiting call holds its thread; the spare ones refuse calls beyond the queue
    detect_workers = config.max_concurrent + config.max_queued + SPARE_RPC_THREADS
    detect_threads = futures.ThreadPoolExecutor(
        max_workers=detect_workers, thread_name_prefix="splitdet-detect"
    )
    manifest_threads = futures.ThreadPoolExecutor(
        SPARE_RPC_THREADS, thread_name_prefix="splitdet-manifest"
    )
    refusal_threads = futures.ThreadPoolExecutor(
        REFUSAL_THREADS, thread_name_prefix="splitdet-refuse"
    )
    receive_s = config.max_receive_s
    bounds = {
        "server": PoolBound(None, SERVER_RPC_THREADS, receive_s),
        "detect": PoolBound(detect_threads, detect_workers, receive_s),
        "manifest": PoolBound(manifest_threads, SPARE_RPC_THREADS, receive_s),
    }
    return HandlerPools(detect_threads, manifest_threads, refusal_threads, bounds)


def server_pool() -> futures.ThreadPoolExecutor:
    """The pool of the server's other methods: health checks, reflection, token refusals."""
    return futures.ThreadPoolExecutor(SERVER_RPC_THREADS, thread_name_prefix="splitdet-rpc")
