"""Health and systemd notification of ``portguard run``, and the storm meter; injected clocks, no threads.

:class:`Health` answers /healthz and drives sd_notify: ``READY=1`` after the first healthy sync,
``STATUS=`` on every change, ``WATCHDOG=1`` from the sync loop's heartbeat (a hung loop stops the
pings), ``RELOADING=1`` with ``MONOTONIC_USEC`` while a reload runs.  :class:`StormMeter` says when
repairs come often enough to be a fight with another writer: reported, never slowed down.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from portguard.sdnotify import Notifier

__all__ = ["Health", "StormMeter"]


class Health:
    def __init__(
        self,
        notifier: Notifier,
        *,
        reconcile_interval: float,
        workers_alive: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notify = notifier
        self._clock = clock
        self._workers_alive = workers_alive
        self.reconcile_interval = reconcile_interval
        self.heartbeat_interval = min(5.0, notifier.watchdog_interval or 5.0)
        self.ready = False
        self.status = "starting"
        self.last_healthy = False
        self._last_ok: float | None = None
        self._last_beat = clock()
        self._last_watchdog = float("-inf")

    def beat(self) -> None:
        """The sync loop is alive (called on every wake-up); pings systemd's watchdog when due."""
        now = self._clock()
        self._last_beat = now
        interval = self._notify.watchdog_interval
        if interval is not None and now - self._last_watchdog >= interval * 0.9:
            self._last_watchdog = now
            self._notify.send("WATCHDOG=1")

    def synced(self, healthy: bool, status: str, *, settled: bool | None = None) -> bool:
        """Record a sync's outcome; True when this made the daemon ready.

        Ready means settled: everything a write of portguard's can fix is done (``settled``, default
        ``healthy``).  A condition portguard must not touch keeps /healthz at 503 and shows in STATUS, but
        must not keep READY=1 back: systemd would kill and restart a daemon that is doing all it can.
        """
        self.last_healthy = healthy
        if healthy:
            self._last_ok = self._clock()
        self.set_status(status)
        if (healthy if settled is None else settled) and not self.ready:
            self.ready = True
            self._notify.send("READY=1", f"STATUS={self.status}")
            return True
        return False

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self._notify.send(f"STATUS={status}")

    def reloading(self, monotonic_usec: int) -> None:
        self._notify.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading the config")

    def reloaded(self) -> None:
        self._notify.send("READY=1", f"STATUS={self.status}")

    def stopping(self) -> None:
        self._notify.send("STOPPING=1")

    def healthy(self) -> bool:
        """For /healthz: every worker alive, the loop beating, and the last sync healthy and recent."""
        now = self._clock()
        alive = now - self._last_beat <= max(10.0, 2 * self.heartbeat_interval)
        recent = self._last_ok is not None and now - self._last_ok <= 2 * self.reconcile_interval + 30
        return alive and recent and self.last_healthy and self._workers_alive()


class StormMeter:
    """Repairs within a sliding window; a fight is reported once per window, and never slows a repair."""

    def __init__(self, repairs: int, window: float) -> None:
        self.repairs = repairs
        self.window = window
        self._times: collections.deque[float] = collections.deque()
        self._reported_at = float("-inf")

    def count(self, now: float) -> int:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
        return len(self._times)

    def repaired(self, now: float) -> bool:
        """Record a repair; True when a fight should be reported now."""
        self._times.append(now)
        if self.count(now) >= self.repairs and now - self._reported_at >= self.window:
            self._reported_at = now
            return True
        return False
