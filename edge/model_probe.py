"""Whether the cloud serves the model exports this edge sends for, asked beside the daemon's
work (no torch): `ModelProbe`, a thread the daemon starts with its services and joins at its
shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from splitdet.edge.client import ClientConfig, CloudClient, CloudError, RetryLater
from splitdet.edge.daemon_log import log_event
from splitdet.edge.sender import OPERATOR_PROBLEMS, PER_EXPORT

#: What `ModelProbe` found of an export: served, refused, or no use asking further; or, for a
#: first check, the cloud unreachable (ask again later).
_SERVED, _REFUSED, _UNREACHABLE, _STOP = "served", "refused", "unreachable", "stop"


class ModelProbe:
    """Ask the cloud, at start-up and beside the work, whether it serves each model
    export the edge sends for: its own, and any earlier one whose requests wait in the
    outbox. A cloud on another export, or refusing the credentials, is logged now, not at
    the first defect, which on a good line may come hours later. Nothing waits for the
    answer: the outbox holds requests until the cloud takes them, whatever the probe found.
    An unreachable cloud is asked again every `every_s` (--retry-max) seconds until it answers
    (logged once), and an export it refused until it is served (`model_served_again`): an idle
    edge has no send to show the fix. An export found served again is passed to
    `on_served(fingerprint)` (the daemon's `Sender.release_export`), which ends the sender's
    hold on its requests and returns how many it released (`released` in the line).
    Setting `stop` ends it."""

    def __init__(
        self,
        client_config: ClientConfig,
        current: str,
        earlier: tuple[str, ...],
        every_s: float,
        stop: threading.Event,
        on_served: Callable[[str], int] | None = None,
    ) -> None:
        self.client_config = client_config
        self.current = current  # the export the edge runs; `earlier`: outbox requests' exports
        self.fingerprints = (current, *earlier)
        self.every_s = every_s
        self._stop = stop
        self._on_served = on_served
        self._thread = threading.Thread(target=self.run, name="cloud-probe", daemon=True)

    def start(self) -> None:
        """Start asking, in a thread of its own."""
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the thread to end (once `stop` is set)."""
        self._thread.join(timeout)

    def run(self) -> None:
        """Ask until the cloud serves every export, refuses us, or `stop` is set."""
        try:
            client = CloudClient(self.client_config)
        except Exception as exc:  # e.g. certificate files gone since start-up
            log_event(logging.WARNING, "cloud_check_failed", error=str(exc))
            return
        try:
            self._ask(client)
        finally:
            client.close()

    def _ask(self, client: CloudClient) -> None:
        """One loop over the exports not yet served, a round every `every_s` seconds. The
        first check of each is made in turn (`_check`), each logged once; an unreachable cloud
        (a cloud booting after its edges) ends the round, and the check is made again next
        round, the miss logged once. Once the cloud has answered about every export, those it
        refused are asked again each round (`_ask_again`) until it serves each."""
        pending = dict.fromkeys(self.fingerprints, False)  # fingerprint -> refused at its check
        quiet = False  # (an unreachable cloud: logged once)
        while True:
            checked = all(pending.values())  # (refused ones wait for the first checks)
            for fingerprint, refused in list(pending.items()):
                if not refused:
                    outcome = self._check(client, fingerprint, quiet)
                elif checked:
                    outcome = self._ask_again(client, fingerprint)
                else:
                    continue
                if outcome == _STOP:
                    return
                if outcome == _UNREACHABLE:
                    quiet = True
                    break
                if outcome == _SERVED:
                    del pending[fingerprint]
                else:
                    pending[fingerprint] = True
            if not pending or self._stop.wait(self.every_s):
                return

    def _role(self, fingerprint: str) -> str:
        """The export's role in the log lines: "current" (the edge runs it) or "earlier"."""
        return "current" if fingerprint == self.current else "earlier"

    def _check(self, client: CloudClient, fingerprint: str, quiet: bool = False) -> str:
        """Log whether the cloud serves `fingerprint`: _SERVED, _REFUSED (it does not serve
        that export; ask about the next), _UNREACHABLE (ask again later; logged at DEBUG when
        `quiet`), or _STOP when asking again is pointless (the cloud refuses us)."""
        role = self._role(fingerprint)  # (outbox requests)
        try:
            served = client.manifest(fingerprint)
        except RetryLater as exc:
            cause = exc.likely_cause  # a TLS handshake refused, or None
            log_event(logging.DEBUG if quiet else logging.WARNING, "cloud_unreachable",
                      code=exc.code.name, error=exc.message,
                      note="requests wait in the outbox until it answers; asked again every "
                      "--retry-max", **({"likely_cause": cause} if cause else {}))  # fmt: skip
            return _UNREACHABLE
        except CloudError as exc:
            event = OPERATOR_PROBLEMS.get(exc.code, ("cloud_check_failed", ""))[0]
            log_event(logging.ERROR, event, code=exc.code.name, error=exc.message,
                      fingerprint=fingerprint, role=role,
                      note="requests wait in the outbox until this is fixed")  # fmt: skip
            return _REFUSED if exc.code in PER_EXPORT else _STOP
        except Exception as exc:  # a probe never ends the daemon
            log_event(logging.WARNING, "cloud_check_failed", error=f"{type(exc).__name__}: {exc}")
            return _STOP
        if served.fingerprint != fingerprint:  # a server too old to choose by model
            note = "requests wait in the outbox until the cloud serves this model"
            log_event(logging.ERROR, "model_refused", served=list(served.served),
                      fingerprint=fingerprint, role=role, note=note)  # fmt: skip
            return _REFUSED
        # (no release here: what waits in the outbox now waits for its own backoff, e.g. a
        # busy cloud's, which a release at each start-up would send all at once; requests an
        # earlier run held for a refused export wait out that hold, at most its --retry-max)
        log_event(logging.INFO, "cloud_checked", served=list(served.served),
                  fingerprint=fingerprint, role=role)  # fmt: skip
        return _SERVED

    def _release(self, fingerprint: str) -> tuple[int, str | None]:
        """`on_served(fingerprint)`: (how many held requests it released, None), or (0, why)
        when it failed (e.g. the database locked past its timeout; a probe never ends the
        daemon: the requests then go out when their hold ends)."""
        if self._on_served is None:
            return 0, None
        try:
            return self._on_served(fingerprint), None
        except Exception as exc:
            return 0, f"{type(exc).__name__}: {exc}"

    def _ask_again(self, client: CloudClient, fingerprint: str) -> str:
        """Ask again about an export the cloud refused at its check: _SERVED, logged as
        `model_served_again` (INFO, with the requests `on_served` released), when the cloud
        serves it now; _REFUSED while not. Failures meanwhile (the cloud down, still refusing)
        are logged at DEBUG only: the refusal was logged once, and the sender logs its own.
        _STOP when the daemon stopped meanwhile."""
        try:
            served = client.manifest(fingerprint)
        except Exception as exc:  # (CloudError, or anything: a probe never ends it)
            log_event(logging.DEBUG, "model_probe", fingerprint=fingerprint,
                      error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return _REFUSED
        if served.fingerprint != fingerprint:
            return _REFUSED
        if self._stop.is_set():
            return _STOP  # (the daemon has stopped meanwhile: no line after "stopped")
        released, error = self._release(fingerprint)
        if error is not None:
            note = ("the cloud serves this export now; its held requests could not be released: "
                    "they go out when their hold ends, within --retry-max")  # fmt: skip
        elif released:
            note = f"the cloud serves this export now: its held requests ({released}) go out now"
        else:
            note = "the cloud serves this export now: none of its requests was held"
        log_event(logging.INFO, "model_served_again", fingerprint=fingerprint,
                  role=self._role(fingerprint), served=list(served.served), released=released,
                  note=note, **({"error": error} if error else {}))  # fmt: skip
        return _SERVED
