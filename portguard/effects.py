"""The effect worker: conntrack healing after repairs, the periodic effect audit, and the bypass survey.

It runs on a worker of its own, so a repair is never queued behind a conntrack read (which may take
seconds on a large table, or hang): the sync only *requests* healing.  Requests coalesce: however
many repairs happened while a heal ran, one more heal follows.  Every call is time-limited and every
failure is logged and counted, never raised into the supervisor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from portguard.audit import audit_stream
from portguard.backends.bypass import find_bypasses
from portguard.config import Config
from portguard.conntrack import ConntrackError, heal
from portguard.logs import Logger
from portguard.metrics import Metrics

__all__ = ["EffectWorker"]


class EffectWorker:
    def __init__(self, config: Callable[[], Config], metrics: Metrics, log: Logger, *,
                 clock: Callable[[], float] = time.monotonic,
                 heal: Callable[[Config], int] | None = None,
                 audit: Callable[[Config], tuple[int, list[str]]] | None = None,
                 bypasses: Callable[[Config], list[str]] | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._heal = heal or _heal
        self._audit = audit or _audit
        self._bypasses = bypasses or (lambda cfg: find_bypasses(cfg.families))
        self._wake = threading.Event()
        self._heal_wanted = False
        self._lock = threading.Lock()
        self.audit_count = 0
        self.bypass_report: list[str] = []

    def request_heal(self) -> None:
        """A repair happened: heal soon, on this worker (never on the sync's thread)."""
        with self._lock:
            self._heal_wanted = True
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        next_audit = self._clock() + self._config().daemon_audit_interval
        while not stop.is_set():
            self._wake.wait(min(0.5, max(0.0, next_audit - self._clock())))
            self._wake.clear()
            with self._lock:
                wanted, self._heal_wanted = self._heal_wanted, False
            if wanted and self._config().daemon_conntrack_heal:
                self.heal_once()
            if self._clock() >= next_audit:
                self.audit_once()
                next_audit = self._clock() + self._config().daemon_audit_interval

    def heal_once(self) -> int:
        try:
            cleared = self._heal(self._config())
        except ConntrackError as exc:
            self._metrics.sync_failures.labels("conntrack").inc()
            self._log.warning("conntrack.heal_failed", error=str(exc))
            return 0
        if cleared:
            self._metrics.conntrack_healed.inc(cleared)
            self._log.info("conntrack.healed", entries=cleared)
        return cleared

    def audit_once(self) -> int:
        cfg = self._config()
        try:
            count, first = self._audit(cfg)
        except ConntrackError as exc:
            self._metrics.sync_failures.labels("audit").inc()
            self._log.warning("audit.failed", error=str(exc))
            return self.audit_count
        self._metrics.untranslated.set(count)
        if count != self.audit_count and count:
            self._log.warning("audit.untranslated", flows=count, first=first)
        self.audit_count = count
        bypasses = self._bypasses(cfg)
        self._metrics.bypasses.set(len(bypasses))
        if bypasses != self.bypass_report:
            if bypasses:
                self._log.error("rule.bypassed", bypasses=bypasses,
                                hint="connections these rules match get no conntrack entry, so no NAT at all")
            self.bypass_report = bypasses
        return count


def _heal(cfg: Config) -> int:
    return heal(cfg.families, cfg.protocols, cfg.source_ports, cfg.to_ports)


def _audit(cfg: Config) -> tuple[int, list[str]]:
    count, first = audit_stream(cfg.families, cfg.protocols, source=cfg.source_ports, target=cfg.to_ports,
                                interfaces=cfg.egress_interfaces, excluded=cfg.egress_exclude_interfaces)
    return count, [f"{f.protocol} {f.src}:{f.sport} -> {f.dst}:{f.dport}" for f in first]
