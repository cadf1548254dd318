"""Docker engine events and inventory (docker-py): the source of Docker's part of the inventory.

The desired rules depend on Docker's networks, so on every (re)connect and every network ``create`` or
``destroy`` the watcher reads ``GET /networks`` *before* it requests the sync: the sync an event triggers
already has the new network's rules.  While Docker is unreachable the last inventory stays in force.

Container life is not followed: starting or stopping a container (network ``connect``/``disconnect``)
changes no network and none of Docker's nat rules, so it costs portguard nothing (the engine filters the
events before they are sent).  A rule Docker does write is seen by the kernel watcher anyway.

dockerd sends no start or stop events.  When it stops, docker-py's ``events()`` generator just
ends (no exception), so the end of the stream means "dockerd gone": reconnect with backoff
(probing ``/_ping``) and, on every reconnect, sync at once and again 1, 2 and 4 s later, because
Docker keeps reprogramming its rules for a while after it first answers.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portguard.inventory import Part
from portguard.logs import Logger
from portguard.runtimes.docker import parse_networks, skipped
from portguard.watch.runtimes import DirectoryWatch

__all__ = ["DockerWatcher"]

EVENT_FILTERS = {
    "type": ["network", "daemon"],
    "event": ["create", "destroy", "reload"],
}
RECHECKS = (1.0, 2.0, 4.0)
_SOCKET_POLL = 0.1  # while Docker is away and inotify is not there: how often to look for its socket coming back
_UNAVAILABLE_LOG_EVERY = 300.0  # after the first, "still unavailable" at most every 5 minutes


class DockerWatcher:
    def __init__(
        self,
        request: Callable[[str], None],
        request_in: Callable[..., None],
        log: Logger,
        *,
        docker_host: str = "",
        max_backoff: float = 30.0,
        on_connection: Callable[[bool], None] = lambda _up: None,
        on_part: Callable[[str, Part | None], None] = lambda _name, _part: None,
    ) -> None:
        self._request = request
        self._request_in = request_in
        self._log = log
        self._docker_host = docker_host
        self._max_backoff = max_backoff
        self._on_connection = on_connection
        self._on_part = on_part
        self._skipped: list[str] = []
        self._stop = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()

    def _client(self) -> Any:
        import docker  # deferred: the daemon can enforce rules without docker-py ever loading

        kwargs = {"base_url": self._docker_host} if self._docker_host else docker.utils.kwargs_from_env()
        # Ping with a timeout; the event stream itself is read without one (docker-py passes
        # timeout=None for events), so a quiet engine never looks like a dead one.
        return docker.APIClient(timeout=10, **kwargs)

    def stop(self) -> None:
        """End run(): set the event and close the event stream it may be blocked on."""
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001  # closing a half-dead HTTP stream may raise anything
                self._log.debug("docker.close_failed", exc_info=True)

    def run(self, stop: threading.Event | None = None) -> None:
        if stop is not None:
            self._stop = stop  # the supervisor's event; stop() still closes a blocked stream
        failures = 0
        last_unavailable_log = float("-inf")
        while not self._stop.is_set():
            client = None
            try:
                client = self._client()
                client.ping()
            except Exception as exc:  # noqa: BLE001  # DockerException, ConnectionError, socket errors alike
                if client is not None:
                    self._close(client)  # a client per attempt: left open, each would keep its session
                failures += 1
                now = time.monotonic()
                if failures == 1 or now - last_unavailable_log >= _UNAVAILABLE_LOG_EVERY:
                    # No socket at all is a host without dockerd (a containerd or Podman node): information.  A socket
                    # that does not answer is a dockerd in trouble: a warning.
                    socket = self._socket()
                    level = self._log.info if socket is not None and not socket.exists() else self._log.warning
                    level("docker.unavailable", error=str(exc).splitlines()[0][:200], attempts=failures)
                    last_unavailable_log = now
                backoff = min(self._max_backoff, 0.25 * 2 ** min(failures - 1, 10)) * (0.5 + random.random())  # noqa: S311
                self._wait_for_engine(backoff)
                continue
            self._log.info("docker.connected", after_attempts=failures)
            failures = 0
            self._on_connection(True)
            self._refresh(client)
            self._request("docker.connected")
            self._request_in(*RECHECKS)
            connected_at = time.monotonic()
            self._follow(client)
            self._on_connection(False)
            if not self._stop.is_set():
                self._log.warning("docker.disconnected", connected_s=round(time.monotonic() - connected_at, 1))
                self._request("docker.disconnected")
                if time.monotonic() - connected_at < 1.0:
                    # A stream that breaks at once must not become a reconnect loop.
                    self._stop.wait(1.0)

    def _socket(self) -> Path | None:
        host = self._docker_host or os.environ.get("DOCKER_HOST", "") or "unix:///var/run/docker.sock"
        return Path(host.removeprefix("unix://")) if host.startswith("unix://") else None

    def _wait_for_engine(self, backoff: float) -> None:
        """Wait out a backoff, but not beyond the moment dockerd creates its socket anew: until Docker's networks
        are known, their traffic leaves with the ports Docker's own MASQUERADE gives it.  Asleep on inotify on the
        socket's directory (a host without dockerd, a Kubernetes or Podman node, wakes only when that directory
        changes); polled every 0.1 s where inotify is not to be had."""
        path = self._socket()

        def fingerprint() -> tuple[int, int] | None:
            try:
                st = path.stat() if path is not None else None
            except OSError:
                return None
            return (st.st_ino, st.st_mtime_ns) if st is not None else None

        watch: DirectoryWatch | None = None
        if path is not None:
            try:
                watch = DirectoryWatch()
                watch.watch([path])
            except OSError:
                if watch is not None:
                    watch.close()
                watch = None
        before = fingerprint()
        deadline = time.monotonic() + backoff
        try:
            while not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if watch is not None:
                    watch.wait(remaining, self._stop)
                elif self._stop.wait(min(_SOCKET_POLL, remaining)):
                    return
                if path is not None and fingerprint() not in (before, None):
                    return
        finally:
            if watch is not None:
                watch.close()

    def _refresh(self, client: Any) -> None:
        """Read the networks; on failure keep the last inventory (nothing is removed because Docker is away)."""
        try:
            raw = client.networks()
            networks = parse_networks(raw)
        except Exception as exc:  # noqa: BLE001  # any failure to read means "no news"
            self._log.warning("docker.inventory_failed", error=str(exc).splitlines()[0][:200] if str(exc) else "?")
            return
        left_out = skipped(raw)
        if left_out != self._skipped:
            self._skipped = left_out
            if left_out:
                self._log.warning("docker.networks_skipped", networks=left_out,
                                  detail="bridge names no backend can represent identically: no rules of their own")
        self._on_part("docker", Part(networks))

    def _follow(self, client: Any) -> None:
        try:
            stream = client.events(decode=True, filters=EVENT_FILTERS)
            with self._lock:
                self._stream = stream
            if self._stop.is_set():
                return
            for event in stream:
                kind = f"{event.get('Type', '?')}.{event.get('Action', '?')}" if isinstance(event, dict) else "?"
                self._log.debug("docker.event", kind=kind)
                if kind.startswith("network."):
                    self._refresh(client)
                self._request(f"docker.{kind}")
        except Exception as exc:  # noqa: BLE001  # a broken stream is the same as an ended one
            if not self._stop.is_set():
                self._log.debug("docker.stream_error", error=str(exc))
        finally:
            with self._lock:
                self._stream = None
            self._close(client)

    def _close(self, client: Any) -> None:
        try:
            client.close()
        except Exception:  # noqa: BLE001  # closing a half-dead client may raise anything
            self._log.debug("docker.close_failed", exc_info=True)
