"""Prometheus metrics and the /healthz endpoint of `portguard run` (prometheus-client).

The registry is injected (one per daemon, never the process-global default), so tests and
several daemons in one process don't share counters.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from portguard import __version__
from portguard.backends import Observation, State
from portguard.errors import FatalError

__all__ = ["Metrics", "serve"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rule_healthy = Gauge("portguard_rule_healthy", "1 when the rule is present once and first to decide NAT",
                                  ["rule", "backend"], registry=r)
        self.repairs = Counter("portguard_repairs", "Rules brought back to healthy, by what was wrong",
                               ["rule", "reason"], registry=r)
        self.sync_duration = Histogram("portguard_sync_duration_seconds", "Duration of full syncs", registry=r,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.last_success = Gauge("portguard_last_successful_sync_timestamp_seconds",
                                  "Unix time of the last sync that ended healthy", registry=r)
        self.docker_connected = Gauge("portguard_docker_connected", "1 while the Docker event stream is open",
                                      registry=r)
        self.conntrack_healed = Counter("portguard_conntrack_healed", "Stuck untranslated conntrack entries deleted",
                                        registry=r)
        self.untranslated = Gauge("portguard_untranslated_flows",
                                  "Flows in the scope that left with a matched but untranslated source port",
                                  registry=r)
        self.build_info = Gauge("portguard_build_info", "Version and backend", ["version", "backend"], registry=r)
        self._backend = ""

    def set_backend(self, backend: str) -> None:
        if backend != self._backend:
            if self._backend:
                self.build_info.remove(__version__, self._backend)
                self.rule_healthy.clear()
            self._backend = backend
            self.build_info.labels(__version__, backend).set(1)

    def observed(self, obs: Observation, *, ok: bool, seconds: float, now: float) -> None:
        self.sync_duration.observe(seconds)
        for status in obs.statuses:
            self.rule_healthy.labels(status.rule.name, obs.backend).set(1 if status.state is State.HEALTHY else 0)
        if ok:
            self.last_success.set(now)

    def repaired(self, repaired: Sequence[tuple[str, State]]) -> None:
        for name, reason in repaired:
            self.repairs.labels(name, reason.value).inc()


def serve(metrics: Metrics, listen: str, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on ``listen`` (HOST:PORT) from a daemon thread."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server dispatches to
            if self.path.split("?")[0] == "/metrics":
                body, code, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] == "/healthz":
                ok = healthy()
                body, code, ctype = (b"ok\n" if ok else b"unhealthy\n"), (200 if ok else 503), "text/plain"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not events
            return

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = Server((host, int(port)), Handler)
    except OSError as exc:
        raise FatalError(f"metrics.listen {listen}: {exc.strerror}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
