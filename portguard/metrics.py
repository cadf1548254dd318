"""Prometheus metrics and the /healthz endpoint of `portguard run` (prometheus-client).

The registry is injected (one per daemon, never the process-global default), so tests and
several daemons in one process don't share counters.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from portguard import __version__
from portguard.backends import Observation, State
from portguard.logs import Logger
from portguard.supervisor import wait_readable

__all__ = ["Metrics", "MetricsServer"]


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
        self.sync_failures = Counter("portguard_sync_failures", "Syncs and effect checks that failed, by kind",
                                     ["kind"], registry=r)
        self.worker_restarts = Counter("portguard_worker_restarts", "Workers restarted after a crash", ["worker"],
                                       registry=r)
        self.bypasses = Gauge("portguard_nat_bypasses", "Rules elsewhere that make matched traffic skip NAT",
                              registry=r)
        self.malformed = Counter("portguard_netlink_malformed", "nf_tables notifications skipped as malformed",
                                 registry=r)
        self.conntrack_malformed = Counter("portguard_conntrack_malformed",
                                           "ctnetlink messages of conntrack reads skipped as malformed", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
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


class MetricsServer:
    """/metrics and /healthz on ``listen``: a fixed pool of handler threads, a socket timeout per connection,
    connections beyond the pool and a short queue closed at once.  A bind failure (the port taken, by anyone)
    is logged and retried: it never stops enforcement."""

    POOL = 4
    QUEUE = 16
    TIMEOUT = 5.0

    def __init__(self, metrics: Metrics, listen: str, healthy: Callable[[], bool], log: Logger) -> None:
        self._metrics = metrics
        self.listen = listen
        self._healthy = healthy
        self._log = log
        self._bound: socketserver.TCPServer | None = None

    def bind(self) -> bool:
        """Bind now, before the daemon reports READY=1, so that whoever reads READY can scrape at once.  A
        failure is not an error here: run() logs it and keeps trying."""
        try:
            self._bound = self._server()
        except OSError:
            return False
        return True

    def _server(self) -> socketserver.TCPServer:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        metrics, healthy = self._metrics, self._healthy

        class Handler(BaseHTTPRequestHandler):
            timeout = MetricsServer.TIMEOUT  # StreamRequestHandler puts it on the socket: idle clients go

            def do_GET(self) -> None:  # the name http.server dispatches to
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, code, ctype = generate_latest(metrics.registry), 200, CONTENT_TYPE_LATEST
                elif path == "/healthz":
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

        pool = ThreadPoolExecutor(max_workers=self.POOL, thread_name_prefix="metrics-handler")
        slots = threading.BoundedSemaphore(self.POOL + self.QUEUE)

        class Server(socketserver.TCPServer):
            allow_reuse_address = True
            request_queue_size = 128  # the kernel's backlog: a burst of clients is refused at speed, not left hanging
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):
                    self.shutdown_request(request)  # more clients than the pool and its queue: refuse, stay bounded
                    return
                pool.submit(self._handle, request, client_address)

            def _handle(self, request: Any, client_address: Any) -> None:
                try:
                    self.finish_request(request, client_address)
                except (OSError, ValueError):
                    return  # a client that times out or misbehaves costs its own connection only
                finally:
                    self.shutdown_request(request)
                    slots.release()

            def server_close(self) -> None:
                super().server_close()
                pool.shutdown(wait=False, cancel_futures=True)

        return Server((host, int(port)), Handler)

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop``; retry a failed bind with backoff, logging the first failure and then rarely."""
        failures = 0
        while not stop.is_set():
            try:
                server, self._bound = self._bound or self._server(), None
            except OSError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    self._log.error("metrics.bind_failed", listen=self.listen, error=exc.strerror, attempts=failures,
                                    detail="enforcement continues; retrying")
                stop.wait(min(30.0, 0.25 * 2 ** min(failures, 7)))
                continue
            if failures:
                self._log.info("metrics.listening", listen=self.listen, after_attempts=failures)
            failures = 0
            server.timeout = 0  # handle_request only once wait_readable saw a client: idle, nothing wakes
            try:
                while wait_readable(stop, server):
                    server.handle_request()
            finally:
                server.server_close()
