"""The effect worker: conntrack healing after repairs, the periodic effect audit, and the bypass survey.

It runs on a worker of its own, so a repair is never queued behind a conntrack read (which may take
seconds on a large table, or hang): the sync only *requests* healing.  Requests coalesce: however
many repairs happened while a heal ran, one more heal follows.  Every call is time-limited and every
failure is logged and counted, never raised into the supervisor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from portguard.audit import Scope, audit_stream
from portguard.backends.bypass import find_bypasses
from portguard.config import Config
from portguard.conntrack import ConntrackError, ReadStats, heal
from portguard.logs import Logger
from portguard.metrics import Metrics
from portguard.rules import Family, PortRange, Protocol
from portguard.supervisor import Flag, wait_readable

__all__ = ["EffectWorker", "Result"]


@dataclass(frozen=True, slots=True)
class Result:
    """What the child did: entries healed (or untranslated flows found, with a sample), and how it read."""

    count: int
    first: tuple[str, ...] = ()
    via: str = ""  # ctnetlink, or conntrack (the CLI fallback)
    malformed: int = 0  # ctnetlink messages skipped as malformed


class EffectWorker:
    def __init__(self, config: Callable[[], Config], metrics: Metrics, log: Logger, *,
                 clock: Callable[[], float] = time.monotonic,
                 heal: Callable[[Config], Result] | None = None,
                 audit: Callable[[Config, Scope], Result] | None = None,
                 scope: Callable[[], Scope] = Scope,
                 bypasses: Callable[[Config], list[str]] | None = None,
                 after_audit: Callable[[], None] = lambda: None) -> None:
        self._config = config
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._heal = heal or _heal
        self._audit = audit or _audit
        self._scope = scope
        self._bypasses = bypasses or (lambda cfg: find_bypasses(cfg.families))
        self._after_audit = after_audit
        self._wake = Flag()  # a heal request; waited on with the stop request, no timeout slices
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
            wait_readable(stop, self._wake, timeout=max(0.0, next_audit - self._clock()))
            self._wake.clear()  # before the request is read: a request made after it wakes the next wait
            with self._lock:
                wanted, self._heal_wanted = self._heal_wanted, False
            if wanted and self._config().daemon_conntrack_heal:
                self.heal_once()
            if self._clock() >= next_audit:
                self.audit_once()
                self._after_audit()
                next_audit = self._clock() + self._config().daemon_audit_interval

    def _malformed(self, result: Result) -> None:
        if result.malformed:
            self._metrics.conntrack_malformed.inc(result.malformed)
            self._log.debug("conntrack.malformed", messages=result.malformed, via=result.via)

    def heal_once(self) -> int:
        try:
            result = self._heal(self._config())
        except ConntrackError as exc:
            self._metrics.sync_failures.labels("conntrack").inc()
            self._log.warning("conntrack.heal_failed", error=str(exc))
            return 0
        self._malformed(result)
        if result.count:
            self._metrics.conntrack_healed.inc(result.count)
            self._log.info("conntrack.healed", entries=result.count, via=result.via)
        return result.count

    def audit_once(self) -> int:
        cfg = self._config()
        try:
            result = self._audit(cfg, self._scope())
        except ConntrackError as exc:
            self._metrics.sync_failures.labels("audit").inc()
            self._log.warning("audit.failed", error=str(exc))
            return self.audit_count
        self._malformed(result)
        count = result.count
        self._log.debug("audit.completed", flows=count, via=result.via)
        self._metrics.untranslated.set(count)
        if count != self.audit_count and count:
            self._log.warning("audit.untranslated", flows=count, first=list(result.first))
        self.audit_count = count
        bypasses = self._bypasses(cfg)
        self._metrics.bypasses.set(len(bypasses))
        if bypasses != self.bypass_report:
            if bypasses:
                self._log.error("rule.bypassed", bypasses=bypasses,
                                hint="connections these rules match get no conntrack entry, so no NAT at all")
            self.bypass_report = bypasses
        return count


# The conntrack work runs in a short-lived child process: reading 100,000 entries costs seconds of CPU
# (measured: 3.2 s of Python for 65,534 entries), which in the daemon would compete for the GIL with the
# repair path and count against its memory.  The daemon's thread only waits for the child's answer.
CHILD_TIMEOUT = 60.0


def _job(kind: str, cfg: Config, scope: Scope) -> dict[str, Any]:
    return {"kind": kind, "families": [f.value for f in cfg.families], "protocols": [p.value for p in cfg.protocols],
            "source": [cfg.source_ports.low, cfg.source_ports.high], "target": [cfg.to_ports.low, cfg.to_ports.high],
            "interfaces": list(scope.interfaces), "excluded": list(scope.excluded),
            "destinations": list(scope.destinations)}


def _child(kind: str, cfg: Config, scope: Scope = Scope()) -> dict[str, Any]:  # noqa: B008  # a frozen value
    try:
        proc = subprocess.run([sys.executable, "-P", "-m", "portguard.effects"],
                              input=json.dumps(_job(kind, cfg, scope)), capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ConntrackError(f"conntrack {kind} did not finish within {CHILD_TIMEOUT:.0f} s (killed)") from None
    except OSError as exc:
        raise ConntrackError(f"conntrack {kind}: {exc.strerror}") from None
    try:
        answer: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise ConntrackError(f"conntrack {kind}: {(proc.stderr.strip().splitlines() or ['no answer'])[-1]}") from None
    if "error" in answer:
        raise ConntrackError(str(answer["error"]))
    return answer


def _result(answer: dict[str, Any], count: str) -> Result:
    return Result(int(answer[count]), tuple(str(s) for s in answer.get("first", ())), str(answer.get("via", "")),
                  int(answer.get("malformed", 0)))


def _heal(cfg: Config) -> Result:
    return _result(_child("heal", cfg), "healed")


def _audit(cfg: Config, scope: Scope) -> Result:
    return _result(_child("audit", cfg, scope), "count")


def work(job: dict[str, Any]) -> dict[str, Any]:
    """The child's side: one heal or one audit, streamed; with how the table was read."""
    families = [Family(f) for f in job["families"]]
    protocols = [Protocol(p) for p in job["protocols"]]
    source, target = PortRange(*job["source"]), PortRange(*job["target"])
    stats = ReadStats()
    try:
        if job["kind"] == "heal":
            answer: dict[str, Any] = {"healed": heal(families, protocols, source, target, stats)}
        else:
            scope = Scope(tuple(job["interfaces"]), tuple(job["excluded"]), tuple(job.get("destinations", ())))
            count, first = audit_stream(families, protocols, source=source, target=target, scope=scope, stats=stats)
            answer = {"count": count, "first": [f"{f.protocol} {f.src}:{f.sport} -> {f.dst}:{f.dport}" for f in first]}
    except ConntrackError as exc:
        answer = {"error": str(exc)}
    return {**answer, "via": stats.via, "entries": stats.entries, "malformed": stats.malformed}


def lower_priority(step: int = 10) -> bool:
    """The daemon's repairs and the host's own work come first.  A sandbox may refuse setpriority(2) (systemd's
    ``~@resources`` filter answers EPERM): then the work runs at normal priority rather than not at all."""
    try:
        os.nice(step)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    niced = lower_priority()
    print(json.dumps({**work(json.load(sys.stdin)), "niced": niced}))
