"""Whether the cloud serves the model exports this edge sends for, asked beside the daemon's
work (no torch): `ModelProbe`, a thread the daemon starts with its services and joins at its
shutdown; and whether the export in the daemon's --model folder is still the one it runs
(`ModelOnDisk`: a re-export into that folder is noticed, not followed)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.edge.client import ClientConfig, CloudClient, CloudError, RetryLater
from splitdet.edge.daemon_log import log, log_event
from splitdet.edge.sender import OPERATOR_PROBLEMS, PER_EXPORT
from splitdet.shared.manifest import (
    ALL_ARTIFACTS,
    MANIFEST_NAME,
    PUBLISHING_MARKER,
    ManifestError,
    read_manifest,
)

if TYPE_CHECKING:
    from splitdet.edge.daemon_metrics import EdgeMetrics

#: Seconds between two looks at the --model folder's manifest (`ModelOnDisk.check`): one
#: os.stat, the manifest read only when the file changed.
MODEL_CHECK_EVERY_S = 5.0

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


def short(fingerprint: str) -> str:
    """A fingerprint as the cloud's refusals show it: its first 16 hex digits and "…"."""
    return f"{fingerprint[:16]}…" if len(fingerprint) > 16 else fingerprint


class ModelOnDisk:
    """Whether the export in the daemon's --model folder is still the one it runs.

    The daemon loads its export once, at start; a `splitdet export --out` into the same folder
    (or a copy over it) while it runs changes nothing it does, and a cloud reloaded onto the new
    export then refuses every request of the old one. `check` (from the daemon's loop, at most
    once per `every_s` seconds) stats the folder's manifest and reads its fingerprint only when
    the file changed (a new inode, size or time); another export than the one running is
    logged once per change (WARNING `model_changed_on_disk`, naming both: the daemon keeps
    running the loaded one until restarted), and shown in splitdet_edge_model_changed_on_disk.
    A manifest that cannot be read just now (being rewritten) is looked at again next time.
    Another export's manifest is believed only once the folder's files match it (hashed once
    per change of the folder's files): a manifest copied ahead of its files, or beside another
    export's, is said as such instead (WARNING `model_on_disk_incomplete`: a restart would
    refuse to start on it), and looked at again when a file of the folder changes.
    The daemon never switches exports by itself. `refusal_hint` says, for the sender's
    `model_refused` line, when a restart is the fix. Thread-safe (the loop and the sender)."""

    def __init__(
        self,
        model_dir: Path,
        running: str,
        every_s: float = MODEL_CHECK_EVERY_S,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.running = running  # the fingerprint of the export the daemon loaded
        self.every_s = every_s
        self.metrics = metrics
        self.on_disk = running  # the fingerprint the manifest named, when last read
        self.incomplete: str | None = None  # why its files do not match that manifest, or None
        self._identity: tuple[int, ...] | None = None  # (None: read it at the first check)
        self._checked = float("-inf")  # monotonic s of the last stat
        self._lock = threading.Lock()

    @property
    def changed(self) -> str | None:
        """The fingerprint of the export now in --model when it is another than the running
        one (as last read), else None."""
        return None if self.on_disk == self.running else self.on_disk

    def check(self, force: bool = False) -> str | None:
        """Look at the manifest in --model (now with `force`, else at most once per `every_s`
        seconds); returns `changed`."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < self.every_s:
                return self.changed
            self._checked = now
            identity = self._folder_identity()
            if identity is None or identity == self._identity:
                return self.changed
            try:
                fingerprint = read_manifest(self.model_dir, verify=False).fingerprint
            except (OSError, ManifestError, ValueError, KeyError, TypeError) as exc:
                log.debug("--model %s: manifest not read (%s); looked at again later",
                          self.model_dir, exc)  # fmt: skip
                return self.changed
            incomplete = None
            if fingerprint != self.running:  # (believed once its files match it)
                try:
                    read_manifest(self.model_dir)
                except (OSError, ManifestError, ValueError, KeyError, TypeError) as exc:
                    incomplete = str(exc)
            self._identity = identity
            news = fingerprint != self.on_disk or (incomplete is None) != (self.incomplete is None)
            self.on_disk, self.incomplete = fingerprint, incomplete
            if news:
                self._report()
            return self.changed

    def _folder_identity(self) -> tuple | None:
        """(device, inode, size, mtime, ctime) of the manifest and of each artifact the folder
        may hold (None for one missing), and whether an export is being published into it;
        None when the manifest cannot be stat'ed (a folder being replaced: looked at again
        next time). ctime too: a copy over a file in place keeps its inode, may keep its size
        and mtime."""
        identity: list[object] = [os.path.lexists(self.model_dir / PUBLISHING_MARKER)]
        for name in (MANIFEST_NAME, *ALL_ARTIFACTS):
            try:
                st = os.stat(self.model_dir / name)
            except OSError:
                if name == MANIFEST_NAME:
                    return None
                identity.append(None)
                continue
            identity.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(identity)

    def _report(self) -> None:
        """Log the change just read (once per change) and set the gauge."""
        if self.metrics is not None:
            self.metrics.model_changed_on_disk.set(0 if self.changed is None else 1)
        folder, running = self.model_dir, short(self.running)
        if self.changed is None:
            log_event(logging.INFO, "model_on_disk_restored", model=str(folder),
                      fingerprint=self.running,
                      note=f"--model {folder} holds the export this daemon runs again")  # fmt: skip
            return
        if self.incomplete is not None:
            log.warning(
                f"--model {folder} now holds the manifest of another export "
                f"({short(self.on_disk)}), but not that export's files ({self.incomplete}): "
                "a copy still in progress, or files pieced together from several exports. "
                f"This daemon keeps running {running}; a restart now would refuse to start: "
                "copy the new export into the folder whole (or let the copy finish) first",
                extra={"fields": {"event": "model_on_disk_incomplete", "model": str(folder),
                                  "fingerprint": self.running, "on_disk": self.on_disk}},
            )  # fmt: skip
            return
        log.warning(
            f"--model {folder} now holds another export ({short(self.on_disk)}) than the one "
            f"this daemon runs ({running}, loaded at its start): it keeps running {running} "
            "until restarted; restart the edge to run the new one (a cloud serving only the "
            "new export refuses this edge's requests meanwhile: they wait in the outbox)",
            extra={"fields": {"event": "model_changed_on_disk", "model": str(folder),
                              "fingerprint": self.running, "on_disk": self.on_disk}},
        )  # fmt: skip

    def refusal_hint(self, refused: str, client: CloudClient) -> str | None:
        """For the cloud's refusal of export `refused` (FAILED_PRECONDITION): when it is the
        running export, --model now holds another, and the cloud serves exactly that one
        (asked with `client`), the line's fix: restart the edge; else None (the cloud's own
        words stand)."""
        if refused != self.running:
            return None
        on_disk = self.check(force=True)
        if on_disk is None or self.incomplete is not None:  # (a restart would not start)
            return None
        try:
            served = client.manifest(on_disk).fingerprint
        except Exception as exc:  # (CloudError or anything: the refusal is logged all the same)
            log.debug("--model %s: the cloud not asked about its export (%s)", self.model_dir, exc)
            return None
        if served != on_disk:
            return None
        return (
            f"--model {self.model_dir} now holds the export the cloud serves ({short(on_disk)}): "
            f"restart the edge to run it (requests already made with {short(self.running)} "
            "wait in the outbox for a cloud that serves that export too)"
        )
