"""The cloud detection server's run until a signal: `serve`, what `splitdet cloud` calls.

`serve` makes a `CloudServer`, starts it and keeps it serving: SIGHUP reloads its exports
(a failed reload logged, the exports served before kept), SIGTERM or SIGINT drains it (health
NOT_SERVING, in-flight calls given --grace to finish) and a second one, sent once the drain
has begun, ends the grace at once. The signal handlers it replaces are put back when it ends.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.shared.signal_event import event_setter, safe_setter

# the logger these lines had before they moved out of server.py: log pipelines filter on it
log = logging.getLogger("splitdet.cloud.server")

#: A SIGTERM or SIGINT at least this many seconds into a drain ends its grace (`serve`): not
#: one sent with the first (a terminal's and a wrapper's come within milliseconds).
HURRY_AFTER_S = 0.25


def serve(
    config: ServerConfig,
    on_ready: Callable[[CloudServer], object] | None = None,
    stop: threading.Event | None = None,
    reload: threading.Event | None = None,
    on_reload: Callable[[CloudServer], object] | None = None,
    on_draining: Callable[[], object] | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the
    exports (`CloudServer.reload`). Returns 0; raises `server.StopIncomplete` when gRPC's stop
    did not complete within --grace + 5 s (the process must then end at once: `cli_cloud.run`).

    Args:
        config: the settings.
        on_ready: called with the started CloudServer (e.g. to write a ready file).
        stop: the event that ends serving; if a caller's signal handler set it while the model
            loaded, the server never starts.
        reload: the event that asks for a reload (SIGHUP sets it); one set while the model
            loaded is honoured once serving.
        on_reload: called with the server after each reload (e.g. to rewrite the ready file).
        on_draining: called once the drain begins (health NOT_SERVING from then: e.g. to
            remove the ready file).
    """
    stop = threading.Event() if stop is None else stop
    reload = threading.Event() if reload is None else reload
    server = CloudServer(config)
    received: list[int] = []

    hurry = threading.Event()
    draining_since: list[float] = []  # monotonic s the drain began

    # (a handler takes no lock: the Events are set by a helper thread, `signal_event`)
    set_hurry, set_stop = safe_setter(hurry), safe_setter(stop)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        # another SIGTERM or SIGINT once draining: no more grace (not one sent with the first,
        # as a terminal's and a wrapper's SIGINT often are)
        if draining_since and time.monotonic() - draining_since[0] >= HURRY_AFTER_S:
            set_hurry()
        set_stop()

    # before start(): once it serves, a signal drains it rather than killing it
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, event_setter(reload))
    try:
        if stop.is_set():
            log.info("stopped before serving", extra={"fields": {"event": "stopped"}})
            return 0
        server.start()
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(0.1):
            if reload.is_set():
                reload.clear()
                reloaded = False
                try:
                    server.reload()
                    reloaded = True
                    if on_reload is not None:
                        on_reload(server)
                except Exception as exc:  # never the end of serving: the exports stay
                    error = f"{type(exc).__name__}: {exc}"
                    log.error("%s (%s)", "reloaded, but what follows it failed" if reloaded
                              else "reload failed; serving as before", error,
                              extra={"fields": {"event": "reload_failed",
                                                "error": error}})  # fmt: skip
                    log.debug("reload failed", exc_info=True)  # (the traceback, for a bug)
                    if not reloaded:  # (counted by the reload itself otherwise)
                        server.metrics.reloads.labels("refused").inc()
        name = signal.Signals(received[0]).name if received else "stop"
        draining_since.append(time.monotonic())
        log.info("%s: draining for up to %.1f s", name, config.grace_s,
                 extra={"fields": {"event": "draining", "signal": name,
                                   "grace_s": config.grace_s}})  # fmt: skip
        if on_draining is not None:
            on_draining()
        server.stop(hurry=hurry)
    finally:
        for sig, handler in previous.items():  # (the CLI's keep the ending process from a late
            signal.signal(sig, handler)  # signal's default action: `cli_cloud.run`)
        server.stop(0)
    return 0
