"""Docker engine events and inventory (docker-py): every network or daemon event requests a full sync.

The desired rules depend on Docker's networks, so on every (re)connect and every network event the
watcher reads ``GET /networks`` *before* it requests the sync: the sync an event triggers already
has the new network's rules.  While Docker is unreachable the last inventory stays in force.

dockerd sends no start or stop events.  When it stops, docker-py's ``events()`` generator just
ends (no exception), so the end of the stream means "dockerd gone": reconnect with backoff
(probing ``/_ping``) and, on every reconnect, sync at once and again 1, 2 and 4 s later, because
Docker keeps reprogramming its rules for a while after it first answers.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from portguard.logs import Logger
from portguard.networks import DockerNetwork, parse_networks

__all__ = ["DockerWatcher", "read_networks"]

EVENT_FILTERS = {
    "type": ["network", "daemon"],
    "event": ["create", "connect", "destroy", "disconnect", "reload"],
}
RECHECKS = (1.0, 2.0, 4.0)
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
        on_networks: Callable[[tuple[DockerNetwork, ...]], None] = lambda _nets: None,
    ) -> None:
        self._request = request
        self._request_in = request_in
        self._log = log
        self._docker_host = docker_host
        self._max_backoff = max_backoff
        self._on_connection = on_connection
        self._on_networks = on_networks
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
                    self._log.warning("docker.unavailable", error=str(exc).splitlines()[0][:200], attempts=failures)
                    last_unavailable_log = now
                self._stop.wait(min(self._max_backoff, 0.25 * 2 ** min(failures - 1, 10)) * (0.5 + random.random()))  # noqa: S311
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

    def _refresh(self, client: Any) -> None:
        """Read the networks; on failure keep the last inventory (nothing is removed because Docker is away)."""
        try:
            networks = parse_networks(client.networks())
        except Exception as exc:  # noqa: BLE001  # any failure to read means "no news"
            self._log.warning("docker.inventory_failed", error=str(exc).splitlines()[0][:200] if str(exc) else "?")
            return
        self._on_networks(networks)

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


def read_networks(docker_host: str = "", timeout: float = 2.0) -> tuple[DockerNetwork, ...] | None:
    """Docker's bridge networks once (for one-shot commands); None when Docker cannot be asked."""
    try:
        import docker  # deferred: commands that never ask Docker don't pay for it

        kwargs = {"base_url": docker_host} if docker_host else docker.utils.kwargs_from_env()
        client = docker.APIClient(timeout=timeout, **kwargs)
        try:
            return parse_networks(client.networks())
        finally:
            client.close()
    except Exception:  # noqa: BLE001  # unreachable, refused, not installed: unknown, never an error here
        return None
